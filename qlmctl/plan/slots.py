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

Deferral: a request the core serves after the rest of its queue (a late head) waits on
the engine (:meth:`EngineState.defer`) and takes its slot and pipeline time when the
first group due beyond the core's deferral horizon comes (:meth:`EngineState.serve_deferred`).

NOTE: every method works on all scenarios at once; callers loop over groups only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import numpy as np


class Served(NamedTuple):
    """What :meth:`EngineState.serve` gives for each request, [S, n] per scenario."""

    start_s: np.ndarray  # dispatch: its slot is free and the prompts before it are in
    prefilled_s: np.ndarray  # its prompt is in
    # when its slot freed, when the core sends it: from there to its dispatch it waits in
    # vLLM's queue, where later arrivals do not go ahead
    slot_free_s: np.ndarray


class Deferred(NamedTuple):
    """Requests the core serves after its queue's work due by ``due_s`` (late heads,
    :meth:`EngineState.defer`), [S, n] per scenario."""

    decode_s: np.ndarray
    prefill_s: np.ndarray
    due_s: np.ndarray  # inf: not deferred in that scenario (or served already)


class EngineState:
    """When each batch slot and the prefill pipeline free, per scenario, and the
    requests deferred on it that it has yet to serve."""

    __slots__ = ("_make_slots", "_slots", "deferred", "deferred_due_s", "known_mean", "pipeline_s")

    def __init__(
        self, slots: np.ndarray, pipeline_s: np.ndarray, known_mean: EngineState | None = None
    ) -> None:
        self._slots: np.ndarray | None = slots
        self._make_slots: Callable[[], np.ndarray] | None = None
        self.pipeline_s = pipeline_s  # [S]
        # its mean, when computed with others' (started_engines); dropped when it changes
        self.known_mean = known_mean
        self.deferred: tuple[Deferred, ...] = ()  # in the order they were deferred
        self.deferred_due_s = math.inf  # the earliest of their due_s

    @classmethod
    def lazy(
        cls, make_slots: Callable[[], np.ndarray], pipeline_s: np.ndarray, mean: EngineState
    ) -> EngineState:
        """An engine of known ``mean`` whose slots ``make_slots`` builds when first read.

        NOTE: planning reads every instance's mean but the slots of few (those it scores
        groups on): the others are never built.
        """
        engine = cls.__new__(cls)
        engine._slots, engine._make_slots = None, make_slots
        engine.pipeline_s, engine.known_mean = pipeline_s, mean
        engine.deferred, engine.deferred_due_s = (), math.inf
        return engine

    @property
    def slots(self) -> np.ndarray:
        """[S, B] when each slot frees, rows sorted ascending."""
        if self._slots is None:
            assert self._make_slots is not None
            self._slots, self._make_slots = self._make_slots(), None
        return self._slots

    @slots.setter
    def slots(self, value: np.ndarray) -> None:
        self._slots, self._make_slots = value, None

    @classmethod
    def idle(cls, ready_s: float, batch: int, scenarios: int) -> EngineState:
        """An engine with nothing running, free from ``ready_s``."""
        return cls(np.full((scenarios, max(batch, 1)), ready_s), np.full(scenarios, ready_s))

    def copy(self) -> EngineState:
        engine = EngineState(self.slots.copy(), self.pipeline_s.copy())
        engine.deferred, engine.deferred_due_s = self.deferred, self.deferred_due_s
        return engine

    def mean(self) -> EngineState:
        """The one scenario of the means (of the slots and pipeline: planning takes it of
        the engines it starts from, which have nothing deferred)."""
        if self.known_mean is not None:
            return self.known_mean
        # NOTE: what ndarray.mean computes (a sum, then a division by the count), without
        # its Python wrapper: planning takes the mean of every engine at every re-plan
        count = self.slots.shape[0]
        return EngineState(
            np.add.reduce(self.slots, axis=0, keepdims=True) / count,
            np.add.reduce(self.pipeline_s, keepdims=True) / count,
        )

    def serve(self, decode: np.ndarray, prefill: np.ndarray, not_before: float = -np.inf) -> Served:
        """Run requests in order; update the state.

        Args:
            decode: [S, n] seconds each request decodes once its prompt is in.
            prefill: [n] (or [S, n]) pipeline seconds of each request's prompt.
            not_before: no request starts earlier (the group's release time).

        Returns:
            Each request's dispatch, prefill end and slot-free times.
        """
        self.known_mean = None
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
            self._take_first(end + decode)
        else:
            used = np.arange(b)
            last = used + b * ((n - 1 - used) // b)  # each slot's last request
            self.slots[:] = end[:, last] + decode[:, last]
            self.slots.sort(axis=1)
        self.pipeline_s[:] = end[:, -1]
        return Served(end - prefill, end, ready)

    def serve_kept(
        self, decode: np.ndarray, prefill: np.ndarray, skip: np.ndarray, not_before: float = -np.inf
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`serve` without the requests ``skip`` ([S, n] bool) marks: per scenario
        the kept ones run in order, the skipped ones cost nothing (their times are those
        of a request of no length behind the kept ones); returns [S, n] dispatch and
        prefill ends.

        NOTE: under overload most calls skip every request in every scenario (a group whose
        deadlines have passed: :meth:`pass_through`), or the same requests in every
        scenario: those reorder whole columns, not each row (the same values, a fraction
        of the work).
        """
        if skip.all():
            starts = self.pass_through(skip.shape[1], not_before)
            return starts, starts.copy()
        pipeline = self.pipeline_s.copy()
        if (skip == skip[:1]).all():  # the same requests in every scenario
            order = np.argsort(skip[0], kind="stable")  # kept first, each in queue order
            kept = ~skip[0, order]
            starts, prefilled, _ = self.serve(
                decode[:, order] * kept, prefill[..., order] * kept, not_before
            )
            back = np.argsort(order)
            starts, prefilled = starts[:, back], prefilled[:, back]
        else:
            order = np.argsort(skip, axis=1, kind="stable")
            kept = ~np.take_along_axis(skip, order, axis=1)
            starts, prefilled, _ = self.serve(
                np.take_along_axis(decode, order, axis=1) * kept,
                np.take_along_axis(np.broadcast_to(prefill, skip.shape), order, axis=1) * kept,
                not_before,
            )
            back = np.argsort(order, axis=1)
            starts = np.take_along_axis(starts, back, axis=1)
            prefilled = np.take_along_axis(prefilled, back, axis=1)
        # the pipeline is free once the last kept prompt is in
        last_in = np.where(skip, -np.inf, prefilled).max(axis=1)
        self.pipeline_s[:] = np.maximum(pipeline, last_in)
        return starts, prefilled

    def defer(self, decode: np.ndarray, prefill: np.ndarray, due_s: np.ndarray) -> None:
        """Hold requests (each [S, n]; ``due_s`` inf where one is not deferred) until work
        due after ``due_s`` comes: :meth:`serve_deferred` serves them then."""
        self.deferred += (Deferred(decode, prefill, due_s),)
        self.deferred_due_s = min(self.deferred_due_s, float(due_s.min()))

    def serve_deferred(self, deadline_s: float) -> None:
        """Serve, in the order they were deferred, the deferred requests whose ``due_s``
        comes before ``deadline_s``: the core serves them ahead of a group due then."""
        if self.deferred_due_s >= deadline_s:
            return
        decode, prefill, due = (
            np.concatenate(parts, axis=1) for parts in zip(*self.deferred, strict=True)
        )
        take = due < deadline_s
        cols = take.any(axis=0)
        self.serve_kept(decode[:, cols], prefill[:, cols], ~take[:, cols])
        due = np.where(take, np.inf, due)
        left = np.isfinite(due).any(axis=0)
        self.deferred, self.deferred_due_s = (), math.inf
        if left.any():
            self.deferred = (Deferred(decode[:, left], prefill[:, left], due[:, left]),)
            self.deferred_due_s = float(due[:, left].min())

    def pass_through(self, n: int, not_before: float = -np.inf) -> np.ndarray:
        """:meth:`serve` of ``n`` requests that take no time (no prompt, no decode): each
        takes a slot and frees it when it could start; returns [S, n] their start times
        (also their prefill ends). The pipeline is left as it was.

        NOTE: with n <= B, every slot free time is sorted, so the pipeline recursion of
        :meth:`serve` reduces to the larger of each slot, ``not_before`` and the pipeline.
        """
        n_s, b = self.slots.shape
        pipeline = self.pipeline_s.copy()
        if n > b:
            zeros = np.zeros((n_s, n))
            starts = self.serve(zeros, zeros, not_before).start_s
        else:
            self.known_mean = None
            starts = np.maximum(np.maximum(self.slots[:, :n], not_before), pipeline[:, None])
            self._take_first(starts)
        self.pipeline_s[:] = pipeline
        return starts

    def _take_first(self, free: np.ndarray) -> None:
        """The first ``n`` slots of each row now free at ``free`` ([S, n]); rows stay sorted.

        NOTE: a slot taken usually frees after every slot not taken (an idle engine, one
        with spare slots): the sorted row is then the untouched slots followed by the new
        times sorted, the same values a sort of the whole row gives, for a sort of n.
        """
        n = free.shape[1]
        if n == self.slots.shape[1] or bool((free.min(axis=1) >= self.slots[:, -1]).all()):
            self.slots = np.concatenate((self.slots[:, n:], np.sort(free, axis=1)), axis=1)
        else:
            self.slots[:, :n] = free
            self.slots.sort(axis=1)

    def drain(self, swap_s: float, batch: int) -> None:
        """A model change: every slot and the pipeline wait until all is done, then for
        ``swap_s``; the new model may fit another batch size."""
        self.known_mean = None
        # NOTE: what the core defers behind another model is not timed
        self.deferred, self.deferred_due_s = (), math.inf
        end = np.maximum(self.slots.max(axis=1), self.pipeline_s) + swap_s
        self.slots = np.repeat(end[:, None], max(batch, 1), axis=1)
        self.pipeline_s = end.copy()


def started_engines(
    ready_s: np.ndarray,
    batch: Sequence[int],
    running_instance: np.ndarray,
    decode: np.ndarray,
    prefill: np.ndarray,
) -> list[EngineState]:
    """Per instance ``i``: an engine idle from ``ready_s[i]`` with ``batch[i]`` slots
    that has then served, in order, the running requests on it: the engines
    ``EngineState.idle`` then :meth:`EngineState.serve` give, instance by instance.

    Args:
        ready_s: [I] when each instance can start new work.
        batch: [I] slots of each instance.
        running_instance: [R] the instance of each running request, nondecreasing.
        decode: [R, S] seconds each running request still decodes, per scenario.
        prefill: [R] pipeline seconds each still needs.

    The engines may share memory: like every scenario's engine, copy one to serve on it.
    """
    slots = [max(b, 1) for b in batch]
    counts = np.bincount(running_instance, minlength=len(ready_s)).tolist()
    first = [0, *itertools.accumulate(counts)]
    engines: dict[int, EngineState] = {}
    for b in set(slots):
        # NOTE: instances whose running requests all hold a slot are served together
        together = [i for i, n in enumerate(counts) if slots[i] == b and n <= b]
        served = _serve_idle(ready_s, b, together, first, decode, prefill)
        engines.update(zip(together, served, strict=True))
    for i in range(len(ready_s)):
        if i not in engines:  # more running than slots: the rest queue in the engine
            engines[i] = EngineState.idle(float(ready_s[i]), slots[i], decode.shape[1])
            engines[i].serve(decode[first[i] : first[i + 1]].T, prefill[first[i] : first[i + 1]])
    return [engines[i] for i in range(len(ready_s))]


def _serve_idle(
    ready_s: np.ndarray,
    b: int,
    insts: list[int],
    first: list[int],
    decode: np.ndarray,
    prefill: np.ndarray,
) -> list[EngineState]:
    """:func:`started_engines` for instances ``insts``, each with ``b`` slots and at most
    ``b`` running requests (``first[i]:first[i + 1]`` of ``decode`` and ``prefill``).

    NOTE: on an idle engine every scenario's slots and pipeline are free at ``ready_s``,
    so :meth:`EngineState.serve`'s dispatch and prefill ends are the same in every
    scenario: computed once per instance (padded rows, the same operations in the same
    order). Each request's slot then frees at its prefill end plus its decode, after
    every untouched slot: each row is ``ready_s`` then those times sorted.
    """
    n_s = decode.shape[1]
    ready = ready_s[insts]
    # (instance's row, position on it, request) of every running request
    rows = [
        (j, k - first[i], k) for j, i in enumerate(insts) for k in range(first[i], first[i + 1])
    ]
    width = max((pos + 1 for _, pos, _ in rows), default=0)
    tail = np.full((len(insts), n_s, width), -np.inf)
    pipeline = ready.copy()
    if rows:
        at, pos, src = (np.array(c, int) for c in zip(*rows, strict=True))
        pad = np.zeros((len(insts), width))
        pad[at, pos] = prefill[src]
        total = np.cumsum(pad, axis=1)
        start = np.maximum.accumulate(ready[:, None] - (total - pad), axis=1)
        end = total + np.maximum(ready[:, None], start)
        tail[at, :, pos] = end[at, pos][:, None] + decode[src]
        busy = [j for j, i in enumerate(insts) if first[i + 1] > first[i]]
        pipeline[busy] = end[busy, [first[insts[j] + 1] - first[insts[j]] - 1 for j in busy]]
    tail.sort(axis=2)  # padding (-inf) first: it becomes the untouched slots below
    untouched = b - width
    # each row's last slots: up to two untouched ones (ready_s), then those taken; two, as
    # numpy adds a lone column's scenarios pairwise but several columns' in order
    kept = min(2, untouched)
    short = np.empty((len(insts), n_s, kept + width))
    short[:, :, :kept] = ready[:, None, None]
    short[:, :, kept:] = np.maximum(tail, ready[:, None, None])
    pipelines = np.repeat(pipeline, n_s).reshape(len(insts), n_s)
    # NOTE: their means at once, each the one EngineState.mean computes (planning needs
    # every instance's), from the short rows: the untouched slots all have the first's
    # mean (a column sum adds the scenarios in order: the same as over whole rows)
    sums = np.add.reduce(short, axis=1) / n_s
    mean_slots = np.empty((len(insts), b))
    mean_slots[:, :untouched] = sums[:, :1]
    mean_slots[:, untouched:] = sums[:, kept:]
    mean_pipelines = np.add.reduce(pipelines, axis=1) / n_s
    return [
        EngineState.lazy(
            partial(_whole_rows, float(ready[j]), untouched, short[j, :, kept:]),
            pipelines[j],
            EngineState(mean_slots[j : j + 1], mean_pipelines[j : j + 1]),
        )
        for j in range(len(insts))
    ]


def _whole_rows(ready_s: float, untouched: int, taken: np.ndarray) -> np.ndarray:
    """[S, B] rows of ``untouched`` slots free at ``ready_s``, then the ``taken`` ones."""
    rows = np.empty((taken.shape[0], untouched + taken.shape[1]))
    rows[:, :untouched] = ready_s
    rows[:, untouched:] = taken
    return rows
