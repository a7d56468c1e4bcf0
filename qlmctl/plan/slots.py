"""The planner's model of one engine: B batch slots and one prefill pipeline, per scenario.

Why slots: vLLM runs up to B sequences at once (``max_num_seqs``, or fewer when their KV
does not fit; the core pulls no more than that). A queued request starts when *one*
slot frees, not when all the running work has drained: with a full, staggered batch the
queue head waits about the shortest remaining time, not the mean. The fluid model (one
group at a time at full-batch throughput) predicted starts a median ~7 s late under load
for exactly this reason, and knowing the true lengths made it worse.

Why a pipeline: prompts are prefilled through a token budget per step
(``max_num_batched_tokens``, less the decodes), one chunk after another. After a burst
or a model change, slots free together but prompts still enter one by one: a burst of
200 conversation prompts takes ~40 s to admit on an A100 although 256 slots are free.

The model: an instance is B slots, each free from some time on, and a prefill pipeline
free from some time on. Requests, in queue order, take the earliest free slot; a request
enters (is dispatched) when its slot is free and the pipeline has finished the prompts
before it, and occupies the pipeline for its ``prefill`` seconds (its prompt's share of
full steps). It holds its slot until its prompt is in, then for its decode: its output
tokens times the step time of a full batch (B decodes beside the prefill chunks a
steady stream of such requests brings). A model change drains every slot and the
pipeline, then pays the swap.

Layout: ``slots`` is ``[S, B]`` (S scenarios), each row sorted ascending. A group's ``n``
requests go round-robin over the slots in that order (request ``j`` in round ``j // B``
of slot ``j % B``): exact list scheduling when a request holds its slot at least the
spread of the slots it takes, close otherwise.

NOTE: every method works on all scenarios at once; callers loop over groups only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class EngineState:
    """When each batch slot and the prefill pipeline free, per scenario."""

    slots: np.ndarray  # [S, B], rows sorted ascending
    pipeline_s: np.ndarray  # [S]

    @classmethod
    def idle(cls, ready_s: float, batch: int, scenarios: int) -> EngineState:
        """An engine with nothing running, free from ``ready_s``."""
        return cls(np.full((scenarios, max(batch, 1)), ready_s), np.full(scenarios, ready_s))

    def copy(self) -> EngineState:
        return EngineState(self.slots.copy(), self.pipeline_s.copy())

    def mean(self) -> EngineState:
        """The one scenario of the means."""
        return EngineState(
            self.slots.mean(axis=0, keepdims=True), self.pipeline_s.mean(keepdims=True)
        )

    def serve(
        self, decode: np.ndarray, prefill: np.ndarray, not_before: float = -np.inf
    ) -> tuple[np.ndarray, np.ndarray]:
        """Run requests in order; update the state.

        Args:
            decode: [S, n] seconds each request decodes once its prompt is in.
            prefill: [n] (or [S, n]) pipeline seconds of each request's prompt.
            not_before: no request starts earlier (the group's release time).

        Returns:
            ([S, n] dispatch times, [S, n] times their prefill ends).
        """
        n_s, b = self.slots.shape
        n = decode.shape[1]
        if n <= b:  # one round: the n earliest slots
            ready = np.maximum(self.slots[:, :n], not_before)
        else:
            rounds = -(-n // b)
            hold = np.zeros((n_s, rounds * b))
            hold[:, :n] = prefill + decode  # what a slot costs if the pipeline keeps up
            hold = hold.reshape(n_s, rounds, b)
            done = np.cumsum(hold, axis=1)  # [S, rounds, B]
            base = np.maximum(self.slots, not_before)[:, None, :]
            ready = (base + done - hold).reshape(n_s, rounds * b)[:, :n]
        # NOTE: pipeline recursion end_j = max(end_{j-1}, ready_j) + prefill_j, unrolled:
        # end_j = P_j + max(pipeline, max_{k<=j} (ready_k - P_{k-1})), P = cumsum(prefill)
        total = np.cumsum(prefill, axis=-1)
        end = total + np.maximum(
            self.pipeline_s[:, None], np.maximum.accumulate(ready - (total - prefill), axis=1)
        )
        if n <= b:
            self.slots[:, :n] = end + decode
        else:
            used = np.arange(b)
            last = used + b * ((n - 1 - used) // b)  # each slot's last request
            self.slots[:] = end[:, last] + decode[:, last]
        self.slots.sort(axis=1)
        self.pipeline_s[:] = end[:, -1]
        return end - prefill, end

    def drain(self, swap_s: float, batch: int) -> None:
        """A model change: every slot and the pipeline wait until all is done, then for
        ``swap_s``; the new model may fit another batch size."""
        end = np.maximum(self.slots.max(axis=1), self.pipeline_s) + swap_s
        self.slots = np.repeat(end[:, None], max(batch, 1), axis=1)
        self.pipeline_s = end.copy()
