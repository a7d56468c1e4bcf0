"""The planning problem as arrays: groups x instances, built once per snapshot.

How it works: :func:`build_problem` turns a snapshot and its groups into numpy arrays
that every policy, the scorer and the MILP share: per group its model, size, weight,
absolute deadline and release time; per request (flattened, ``req_offsets`` cut it into
groups) its deadline, its first-token time alone (``req_ttft_s``) and its prompt's time
in the prefill pipeline on each instance; per (group, instance) eligibility and the
step time of a busy engine (decode seconds per output token); per (model, instance) the
batch size B; per instance the resident model, when it is free, and the swap time from
any model (or none) to any model.

Service model (see :mod:`qlmctl.plan.slots`): B is ``max_num_seqs`` or as many
sequences as the KV cache holds when each reserves its prompt plus its expected output
(what the core's backpressure admits; never more than the core's ``max_inflight``), over
the snapshot's requests of that model. A
busy engine's step and its pipeline rate follow :func:`busy_step_s`. A request's first
token comes after the pipeline has its prompt, plus the API server's overhead, and no
sooner than its own chunked prefill allows (``req_ttft_s``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from qlmctl.domain import Request
from qlmctl.errors import BadInput
from qlmctl.perfmodel import Num, PerfModel, swap_time_s
from qlmctl.plan.groups import RequestGroup
from qlmctl.plan.types import QueueSnapshot, RunningRequest, StreamArrivals


class ExpectedOutputs(Protocol):
    """Expected output tokens of requests (a length model read for one snapshot)."""

    def many(self, requests: Sequence[Request]) -> np.ndarray:
        """[N] expected output tokens of ``requests``."""
        ...

    def of_stream(self, model: str, slo_class: str, stream: StreamArrivals) -> np.ndarray:
        """[count] expected output tokens of the requests of one recent stream."""
        ...


def busy_step_s(
    perf: PerfModel, batch: float, prompt: np.ndarray, output: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(step time, prefill pipeline seconds per prompt token) of an engine busy with a
    steady stream of requests of these mean ``prompt`` and ``output`` lengths.

    A step carries D decodes and prefill chunks within its token budget C: each request
    decodes for ``output`` steps while its prompt took ``prompt / (C - D)`` steps, so
    D = min(B, C * output / (prompt + output)); the prefill between two decode steps is
    what the stream brings, ``D * prompt / output``, at most the room left.
    """
    budget = perf.max_num_batched_tokens
    decodes = np.minimum(batch, budget * output / (prompt + output))
    room = np.maximum(budget - decodes, 1.0)
    context = decodes * (prompt + output / 2)
    step = perf.step_time_s(np.minimum(room, decodes * prompt / output), decodes, context)
    return step, perf.step_time_s(room, decodes, context) / room


def first_token_s(perf: PerfModel, prompts: Num, batch: float, context_tokens: float) -> Num:
    """Seconds from taking a slot to the first token, per prompt: the request overhead
    plus one step per prefill chunk, each beside ``batch - 1`` decodes of this context.
    Prompt lengths as a number or a numpy array.

    NOTE: the serving core asks this for one prompt at a time, tens of thousands of times
    per run: a number costs about 2 µs, a one-element array 12 µs (ceil as negated floor
    division, the same values)."""
    chunk = perf.max_num_batched_tokens
    chunks = np.maximum(-(-prompts // chunk), 1.0)
    last = prompts - (chunks - 1) * chunk
    squares = (chunks - 1) * chunk**2 + last**2
    before = chunk * (chunks - 1) * chunks / 2  # context of the earlier chunks, summed
    decodes = (batch - 1) * (perf.decode_s_per_seq + perf.decode_s_per_ctx_token * context_tokens)
    return (
        perf.ttft_overhead_s
        + chunks * (perf.step_base_s + decodes)
        + perf.prefill_work_s(prompts, squares)
        + perf.decode_s_per_ctx_token * before
    )


@dataclass(frozen=True)
class Problem:
    """Array view of one planning instance (G groups, I instances, M models)."""

    now_s: float
    groups: tuple[RequestGroup, ...]
    instance_ids: tuple[str, ...]
    models: tuple[str, ...]  # model index -> name; index M means "no model"
    class_names: tuple[str, ...]
    group_model: np.ndarray  # [G] model index
    group_class: np.ndarray  # [G] class index
    size: np.ndarray  # [G] requests
    weight: np.ndarray  # [G] class weight
    deadline_s: np.ndarray  # [G] absolute
    release_s: np.ndarray  # [G] first arrival
    eligible: np.ndarray  # [G, I] bool
    batch: np.ndarray  # [M, I] slots (full batch) of each model on each instance; 0: none
    step_s: np.ndarray  # [G, I] busy step time: decode seconds per output token (inf: n/a)
    req_offsets: np.ndarray  # [G+1] group g's requests are rows offsets[g]:offsets[g+1]
    req_deadline_s: np.ndarray  # [N] absolute TTFT deadline of each request
    req_ttft_s: np.ndarray  # [N, I] dispatch -> first token alone (inf: not eligible)
    req_prefill_s: np.ndarray  # [N, I] its prompt's time in the prefill pipeline
    overhead_s: np.ndarray  # [M, I] the API server's per-request TTFT overhead
    init_model: np.ndarray  # [I] model index, M for none
    ready_s: np.ndarray  # [I] when the instance can start new work
    swap_s: np.ndarray  # [I, M+1, M] seconds to switch from (model or none) to model
    running: tuple[RunningRequest, ...] = ()  # in flight, they delay their instance
    running_instance: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # [R]
    running_step_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [R] full step
    running_prefill_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [R] left
    # [I] the core sends a request only while fewer than this many wait in the instance's
    # engine for the prefill pipeline (0, or empty: no such limit; see simulate)
    engine_queue: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    # coming arrivals, per stream k (model, class) seen in the snapshot's recent window:
    stream_ahead: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))  # [G, K]
    stream_load: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [K, I]
    stream_seen: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [K] arrivals
    stream_model: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # [K] index
    stream_ttft_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [K] class TTFT
    stream_weight: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [K] class weight
    # [K, I] instance seconds one request of stream k takes on i in a full batch (inf: n/a)
    stream_work_s: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    arrival_window_s: float = 0.0
    # how its plans are served: a request that can no longer make its deadline when its
    # turn comes goes behind its instance's queue (ServingStyle.defers_late) due within
    # this many seconds of its turn (ServingStyle.defer_horizon_s; inf: the whole queue)
    defer_late: bool = False
    defer_horizon_s: float = math.inf

    def request_group(self) -> np.ndarray:
        """[N] the group of each request."""
        return np.repeat(np.arange(self.num_groups), self.size.astype(int))

    def due_beyond_defer_horizon(self) -> np.ndarray:
        """[G] bool: groups a deferred request goes ahead of, however soon its turn
        comes: due more than ``defer_horizon_s`` from now (none without ``defer_late``)."""
        return self.defer_late & (self.deadline_s > self.now_s + self.defer_horizon_s)

    def late_even_first(self) -> np.ndarray:
        """[N] bool: whether each request's first token is late even if an instance
        started it as soon as it is ready (and its group has arrived): it misses in every
        plan."""
        start = np.maximum(self.ready_s[None, :], self.release_s[self.request_group()][:, None])
        return np.min(start + self.req_ttft_s, axis=1) > self.req_deadline_s  # inf: n/a

    def attainable(self) -> float:
        """The most any plan can attain (weighted, as a score's attainment): all but the
        requests :meth:`late_even_first`."""
        lost = float(np.sum(self.weight[self.request_group()] * self.late_even_first()))
        return 1.0 - lost / self.total_weight()

    def group_prefill_s(self) -> np.ndarray:
        """[G, I] pipeline seconds of each group's prompts on each instance."""
        return np.add.reduceat(self.req_prefill_s, self.req_offsets[:-1])

    def dispatch_deadline_s(self) -> np.ndarray:
        """[G, I] the latest dispatch of each group's last request that still gets its
        first token by its deadline (the fluid view's miss line)."""
        last = self.req_offsets[1:] - 1
        return self.req_deadline_s[last][:, None] - self.req_ttft_s[last]

    def group_batch(self, g: int, i: int) -> int:
        """Slots group ``g``'s model has on instance ``i``."""
        return int(self.batch[self.group_model[g], i])

    @property
    def num_groups(self) -> int:
        """G."""
        return len(self.groups)

    @property
    def num_instances(self) -> int:
        """I."""
        return len(self.instance_ids)

    def total_weight(self) -> float:
        """Sum of weight * size over all groups (the attainment denominator)."""
        return float(np.sum(self.weight * self.size))


def build_problem(
    snapshot: QueueSnapshot,
    groups: Sequence[RequestGroup],
    expected: ExpectedOutputs,
) -> Problem:
    """Arrays for ``groups`` on the snapshot's instances.

    ``expected`` (expected output tokens of requests) sets the
    mean decode context.

    Raises:
        BadInput: no groups, no live instance, or a group no instance can serve.
    """
    if not groups:
        raise BadInput("nothing to plan: there are no waiting requests")
    insts = snapshot.instances
    if not any(inst.up for inst in insts):
        raise BadInput("nothing can be planned: no instance is up")
    models = tuple(sorted({g.model for g in groups} | {i.model for i in insts if i.model}))
    midx = {m: k for k, m in enumerate(models)}
    classes = tuple(sorted({g.slo_class for g in groups}))
    n_g, n_i, n_m = len(groups), len(insts), len(models)

    reqs = [r for g in groups for r in g.requests]
    ttft_of = {c: snapshot.slo_classes[c].ttft_s for c in classes}  # as snapshot.deadline_s
    offsets = np.cumsum([0, *(g.size for g in groups)])
    prompts = np.array([r.prompt_tokens for r in reqs], float)
    outputs = np.asarray(expected.many(reqs), float)
    req_model = np.repeat([midx[g.model] for g in groups], [g.size for g in groups])
    batch, step, rate = _engine_params(snapshot, models, req_model, prompts, outputs, expected)
    size = np.diff(offsets)
    sum_p = np.add.reduceat(prompts, offsets[:-1])

    eligible = np.zeros((n_g, n_i), bool)
    ttft = np.full((len(reqs), n_i), np.inf)
    pipeline = np.full((len(reqs), n_i), np.inf)
    group_step = np.full((n_g, n_i), np.inf)
    group_of = np.repeat(np.arange(n_g), size)
    mean_prompt = sum_p / size
    mean_output = np.add.reduceat(outputs, offsets[:-1]) / size
    overhead = np.zeros((n_m, n_i))
    group_models = np.array([midx[g.model] for g in groups], int)
    # NOTE: instances of one GPU type (and batch) get the same columns: computed once,
    # written to all of them at once
    for k, model in enumerate(models):
        mine = np.flatnonzero(group_models == k)
        if not mine.size:
            continue
        rows = np.flatnonzero(req_model == k)
        alike: dict[tuple[str, float], list[int]] = {}  # (gpu, batch) -> instances
        for i, inst in enumerate(insts):
            if (model, inst.gpu) in snapshot.perf and inst.can_serve(model):
                alike.setdefault((inst.gpu, float(batch[k, i])), []).append(i)
        for (gpu, b), at in alike.items():
            perf = snapshot.perf[(model, gpu)]
            mean_ctx = float(np.mean(prompts[rows] + outputs[rows] / 2))
            busy_step, busy_rate = busy_step_s(perf, b, mean_prompt[mine], mean_output[mine])
            rate_of = np.zeros(n_g)
            rate_of[mine] = busy_rate
            cols = np.array(at)
            eligible[mine[:, None], cols] = True
            ttft[rows[:, None], cols] = first_token_s(perf, prompts[rows], b, mean_ctx)[:, None]
            group_step[mine[:, None], cols] = busy_step[:, None]
            pipeline[rows[:, None], cols] = (prompts[rows] * rate_of[group_of[rows]])[:, None]
            overhead[k, cols] = perf.ttft_overhead_s
    for g in np.flatnonzero(~eligible.any(axis=1)):
        grp = groups[g]
        raise BadInput(
            f"no live instance can serve model {grp.model!r} ({grp.size} waiting requests "
            f"of class {grp.slo_class!r}); check the cluster's models and the profiles "
            f"for pairs ({grp.model}, <gpu>)"
        )

    swap = np.full((n_i, n_m + 1, n_m), np.inf)
    first_alike: dict[tuple[str, frozenset[str]], int] = {}  # NOTE: alike instances: once
    for i, inst in enumerate(insts):
        alike_i = first_alike.setdefault((inst.gpu, inst.sleeping_models), i)
        if alike_i != i:
            swap[i] = swap[alike_i]
            continue
        for t, to in enumerate(models):
            perf_to = snapshot.perf.get((to, inst.gpu))
            if perf_to is None:
                continue
            asleep = to in inst.sleeping_models
            swap[i, n_m, t] = swap_time_s(perf_to, None, asleep)
            for f, frm in enumerate(models):
                perf_from = snapshot.perf.get((frm, inst.gpu))
                swap[i, f, t] = 0.0 if f == t else swap_time_s(perf_to, perf_from, asleep)

    running, run_inst, run_model, run_prefill = [], [], [], []
    rate_of_model = rate.tolist()  # NOTE: per running request below
    for i, inst in enumerate(insts):
        for rr in inst.running:
            req = rr.request
            m = midx.get(req.model)
            if m is None or (req.model, inst.gpu) not in snapshot.perf:
                continue  # a model without profile here: nothing to predict, no delay
            running.append(rr)
            run_inst.append(i)
            run_model.append(m)
            started = rr.first_token_s is not None
            run_prefill.append(0.0 if started else req.prompt_tokens * rate_of_model[m][i])
    run_step = _running_step_s(snapshot, models, running, run_inst, run_model, batch, expected)

    return Problem(
        now_s=snapshot.now_s,
        groups=tuple(groups),
        instance_ids=tuple(i.instance_id for i in insts),
        models=models,
        class_names=classes,
        group_model=group_models,
        group_class=np.array([classes.index(g.slo_class) for g in groups], int),
        size=size.astype(float),
        weight=np.array([g.weight for g in groups], float),
        deadline_s=np.array([g.deadline_s for g in groups], float),
        release_s=np.array([g.release_s for g in groups], float),
        eligible=eligible,
        batch=batch,
        step_s=group_step,
        req_offsets=offsets,
        req_deadline_s=np.array([r.arrival_s + ttft_of[r.slo_class] for r in reqs]),
        req_ttft_s=ttft,
        req_prefill_s=pipeline,
        overhead_s=overhead,
        init_model=np.array([midx[i.model] if i.model else n_m for i in insts], int),
        ready_s=np.array([max(snapshot.now_s, i.ready_at_s) for i in insts], float),
        swap_s=swap,
        running=tuple(running),
        running_instance=np.array(run_inst, int),
        running_step_s=run_step,
        running_prefill_s=np.array(run_prefill, float),
        engine_queue=np.array([inst.max_waiting or 0 for inst in insts], int),
        **_streams(snapshot, groups, models, batch, step, rate, expected),
    )


def _running_step_s(
    snapshot: QueueSnapshot,
    models: Sequence[str],
    running: Sequence[RunningRequest],
    run_inst: Sequence[int],
    run_model: Sequence[int],
    batch: np.ndarray,
    expected: ExpectedOutputs,
) -> np.ndarray:
    """[R] the decode step of each running request: :func:`busy_step_s` of its
    instance's batch (``batch``, as for queued work) with the mean prompt and expected
    output of the requests of its model running there, not of every request of the model.

    NOTE: under overload the queue fills with long prompts waiting to be served last;
    the step read from all of them was 1.2-1.8x the running requests' real one
    (A-mixed (8) at 2x), and slots were predicted to free that much later.
    """
    step = np.empty(len(running))
    if not running:
        return step
    n_m = batch.shape[0]
    key = np.asarray(run_inst) * n_m + np.asarray(run_model)
    prompts = np.array([rr.request.prompt_tokens for rr in running], float)
    outputs = np.asarray(expected.many([rr.request for rr in running]), float)
    for k in np.unique(key).tolist():
        i, m = divmod(k, n_m)
        mine = key == k
        perf = snapshot.perf[(models[m], snapshot.instances[i].gpu)]
        prompt = np.array([max(float(prompts[mine].mean()), 1.0)])
        output = np.array([max(float(outputs[mine].mean()), 1.0)])
        step[mine] = busy_step_s(perf, max(float(batch[m, i]), 1.0), prompt, output)[0][0]
    return step


def _streams(
    snapshot: QueueSnapshot,
    groups: Sequence[RequestGroup],
    models: Sequence[str],
    batch: np.ndarray,
    step: np.ndarray,
    rate: np.ndarray,
    expected: ExpectedOutputs,
) -> dict[str, Any]:
    """The coming arrivals, per (model, class) stream of the recent window.

    Under EDF an arrival goes ahead of a waiting group when its deadline comes first:
    ``now + ttft < group deadline`` (``stream_ahead``). A stream spreads over the
    instances that hold its model (all that may serve it if none does) in proportion to
    what each serves per second (slots over a request's hold: its decode at the busy step
    plus its prompt in the pipeline); ``stream_load[k, i]`` is the share of instance i's
    capacity one request per second of stream k takes, ``stream_work_s[k, i]`` the
    seconds of instance i one request takes (on any instance that may serve it).
    """
    recent = snapshot.recent
    index = {m: k for k, m in enumerate(models)}
    # NOTE: the window holds every arrival of the last minute: the core keeps it summarised
    # per stream as requests come and go (RecentArrivals.streams), so this reads no request
    streams = {key: s for key, s in recent.by_stream().items() if key[0] in index}
    keys = sorted(streams)
    n_i = len(snapshot.instances)
    ahead = np.zeros((len(groups), len(keys)), bool)
    load = np.zeros((len(keys), n_i))
    seen = np.zeros(len(keys))
    model_of = np.zeros(len(keys), int)
    ttft = np.full(len(keys), np.inf)
    weight = np.zeros(len(keys))
    work = np.full((len(keys), n_i), np.inf)
    deadline = np.array([g.deadline_s for g in groups])
    for k, (model, cls) in enumerate(keys):
        mine = streams[(model, cls)]
        seen[k] = mine.count
        if cls in snapshot.slo_classes:
            slo = snapshot.slo_classes[cls]
            ahead[:, k] = snapshot.now_s + slo.ttft_s < deadline
            ttft[k], weight[k] = slo.ttft_s, slo.weight
        m = model_of[k] = index[model]
        prompt = mine.prompt_tokens / mine.count  # NOTE: their mean: an exact sum, divided
        output = float(np.mean(expected.of_stream(model, cls, mine)))
        served = np.where(batch[m] > 0, batch[m] / (output * step[m] + prompt * rate[m]), 0.0)
        up = np.array([i.can_serve(model) for i in snapshot.instances])
        holds = up & np.array([i.model == model for i in snapshot.instances])
        pool = (holds if holds.any() else up) & (served > 0)
        if pool.any():
            load[k, pool] = 1.0 / served[pool].sum()
        # the scenarios' fluid view (estimator.scenarios_from_tokens): a request's hold
        # over the slots, or its prompt's time in the prefill pipeline where that is longer
        ok = up & (served > 0)
        work[k, ok] = np.maximum(1.0 / served[ok], prompt * rate[m][ok])
    return {
        "stream_ahead": ahead,
        "stream_load": load,
        "stream_seen": seen,
        "stream_model": model_of,
        "stream_ttft_s": ttft,
        "stream_weight": weight,
        "stream_work_s": work,
        "arrival_window_s": recent.window_s,
    }


def _engine_params(
    snapshot: QueueSnapshot,
    models: Sequence[str],
    req_model: np.ndarray,
    prompts: np.ndarray,
    outputs: np.ndarray,
    expected: ExpectedOutputs,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per model and instance ([M, I] each): the full batch B (as many sequences as fit
    when each reserves its prompt plus its output), and :func:`busy_step_s`; from the
    mean prompt and expected output of the snapshot's requests of that model, waiting
    (``req_model``, ``prompts``, ``outputs``) or running.

    On an instance holding the model, B is at least the requests running there (up to
    its sequence limits): the core admitted each by its own size, so they fit. The mean
    over all the model's requests, long waiting ones included, undercounts a mix of
    shorter ones; the engine then looked full with free slots, and queued work was
    predicted to start seconds late (forecast within 0.5 s of dispatch: median 1.6 s
    late in A-mixed (4) at 2x).
    """
    index = {m: k for k, m in enumerate(models)}
    n_m = len(models)
    running = [
        rr.request
        for inst in snapshot.instances
        for rr in inst.running
        if rr.request.model in index
    ]
    # NOTE: bincount adds in order: waiting then running, each in order (identical sums)
    of_model = np.concatenate([req_model, [index[r.model] for r in running]]).astype(int)
    run_prompts = np.array([r.prompt_tokens for r in running], float)
    prompt_sum = np.bincount(of_model, np.concatenate([prompts, run_prompts]), n_m)
    output_sum = np.bincount(of_model, np.concatenate([outputs, expected.many(running)]), n_m)
    count = np.bincount(of_model, minlength=n_m).astype(float)
    batch = np.zeros((n_m, len(snapshot.instances)), int)
    step = np.full((n_m, len(snapshot.instances)), np.inf)
    rate = np.full((n_m, len(snapshot.instances)), np.inf)
    for k, m in enumerate(models):
        seen = max(count[k], 1.0)
        prompt = np.array([max(prompt_sum[k] / seen, 1.0)])
        output = np.array([max(output_sum[k] / seen, 1.0)])
        done: dict[tuple[str, int | None], tuple[int, float, float]] = {}  # same GPU: once
        for i, inst in enumerate(snapshot.instances):
            perf = snapshot.perf.get((m, inst.gpu))
            if perf is not None:
                key = (inst.gpu, inst.max_running)
                if key not in done:
                    fits = int(perf.full_batch(float(prompt[0] + output[0])))
                    b = min(fits, inst.max_running or fits)
                    busy = busy_step_s(perf, b, prompt, output)
                    done[key] = (b, busy[0][0], busy[1][0])
                batch[k, i], step[k, i], rate[k, i] = done[key]
                limit = min(perf.max_num_seqs, inst.max_running or perf.max_num_seqs)
                held = min(len(inst.running), limit) if inst.model == m else 0
                if held > batch[k, i]:
                    busy = busy_step_s(perf, held, prompt, output)
                    batch[k, i], step[k, i], rate[k, i] = held, busy[0][0], busy[1][0]
    return batch, step, rate
