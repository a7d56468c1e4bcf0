"""Scoring: simulate a candidate plan on S scenarios with the slot model.

How it works: a candidate is one ordered queue of group indices per instance. Each
instance starts from its slots as the running requests leave them (per scenario, see
:mod:`qlmctl.plan.slots`); for each group in order it drains and pays the swap time if
the group's model is not the loaded one (exact pair cost from the problem's swap
matrix), then its requests take the earliest free slots, not before the group's release
time. A request meets its SLO in a scenario when its first token (slot taken + its
``req_ttft_s``) comes by its own deadline. The core sends a request when its slot is
free and fewer than ``Problem.engine_queue`` requests wait in the engine for the
pipeline: its dispatch comes no earlier than the pipeline start of the request that many
places before it in its instance's queue (:func:`paced_dispatch`). Where the core
serves hopeless requests last (``Problem.defer_late``), a request whose first token
would be late even alone when its turn comes is skipped in that scenario: it misses and
takes its slot and pipeline time only when the first group due beyond the core's
deferral horizon comes (:func:`serve_group`). Everything is vectorised over scenarios;
the loop is over groups only.

The stochastic program (:mod:`qlmctl.plan.edf_program`) reads its capacity off this
model; its plans are scored here like every other candidate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from qlmctl.errors import BadInput
from qlmctl.plan.estimator import Ahead, Scenarios, arrivals_delay_s
from qlmctl.plan.problem import Problem
from qlmctl.plan.slots import EngineState

Queues = tuple[tuple[int, ...], ...]  # per instance: group indices in execution order


class GroupServed(NamedTuple):
    """What :func:`serve_group` gives for each request of a group, [S, n] per scenario."""

    start_s: np.ndarray  # a slot is free and the prompts before it are in
    prefilled_s: np.ndarray  # its prompt is in
    first_token_s: np.ndarray
    late: np.ndarray  # bool: it misses its deadline
    slot_free_s: np.ndarray  # its slot is free: the core may send it then


def instance_of(queues: Queues, num_groups: int) -> list[int]:
    """The instance each group is queued on (-1: none)."""
    out = [-1] * num_groups
    for i, queue in enumerate(queues):
        for g in queue:
            out[g] = i
    return out


@dataclass(frozen=True)
class Score:
    """A candidate's predicted outcome on a scenario set."""

    attainment: float  # expected weighted fraction of waiting requests meeting SLO
    by_class: dict[str, float]  # class -> expected fraction meeting SLO
    miss_prob: np.ndarray  # [G] expected fraction of the group's requests missing
    start_s: np.ndarray  # [G] mean predicted start of the group's first request
    finish_s: np.ndarray  # [G] mean predicted finish of its last request
    swap_s: float  # total swap seconds the plan implies
    expected_misses: float  # expected weighted requests missing SLO
    miss: np.ndarray  # [G, S] fraction of the group's requests missing in scenario s
    request_start_s: np.ndarray  # [N] mean predicted start (slot taken) per request
    # [N] mean predicted dispatch per request: when the core sends it (its slot free, and
    # the engine's queue for the prefill pipeline short enough), at or before its start
    request_dispatch_s: np.ndarray
    request_miss_prob: np.ndarray  # [N] probability each request misses
    # [S, N] each request's first token and finish per scenario; inf where it is served
    # after the instance's queue (deferred): the scorer does not time that tail
    request_first_token_s: np.ndarray
    request_finish_s: np.ndarray


def check_queues(problem: Problem, queues: Queues) -> None:
    """Every group exactly once, on an instance that may serve it; else BadInput."""
    seen = np.zeros(problem.num_groups, int)
    for i, queue in enumerate(queues):
        for g in queue:
            seen[g] += 1
            if not problem.eligible[g, i]:
                raise BadInput(
                    f"group {problem.groups[g].group_id} placed on instance "
                    f"{problem.instance_ids[i]}, which cannot serve {problem.groups[g].model}"
                )
    if len(queues) != problem.num_instances or not (seen == 1).all():
        raise BadInput("a plan must place every group exactly once")


def simulate(problem: Problem, scen: Scenarios, queues: Queues) -> Score:
    """Score ``queues`` on ``scen`` with the slot model."""
    n_g, n_s = problem.num_groups, scen.count
    start = np.zeros((n_g, n_s))
    finish = np.zeros((n_g, n_s))
    n_r = int(problem.req_offsets[-1])
    req_start = np.zeros((n_s, n_r))
    req_sent = np.zeros((n_s, n_r))
    req_late = np.zeros((n_s, n_r), bool)
    req_token = np.full((n_s, n_r), np.inf)  # a group on no queue: never timed
    req_finish = np.full((n_s, n_r), np.inf)
    swap_total = 0.0
    for i, queue in enumerate(queues):
        for g, swap, decode, (starts, prefilled, tokens, late, sent) in _serve_queue(
            problem, scen, i, queue
        ):
            swap_total += swap
            rows = slice(problem.req_offsets[g], problem.req_offsets[g + 1])
            req_late[:, rows] = late
            req_start[:, rows] = starts
            req_sent[:, rows] = sent
            req_token[:, rows] = tokens
            req_finish[:, rows] = tokens + decode
            start[g], finish[g] = starts[:, 0], prefilled[:, -1] + decode[:, -1]
    first = problem.req_offsets[:-1]
    miss = (np.add.reduceat(req_late, first, axis=1) / problem.size).T  # [G, S]
    dispatch = paced_dispatch(problem, queues, req_start, req_sent)
    return _summarise(
        problem, start, finish, miss, swap_total, _mean(req_start, 0), _mean(dispatch, 0),
        _mean(req_late, 0), req_token, req_finish,
    )  # fmt: skip


def paced_dispatch(
    problem: Problem, queues: Queues, start: np.ndarray, sent: np.ndarray
) -> np.ndarray:
    """[S, N] when the core sends each request: when its slot is free (``sent``), but not
    before the request ``engine_queue[i]`` places earlier in instance i's queue has left
    the engine's queue for the prefill pipeline (its ``start``), and never after its own
    start. The core pulls while fewer than that wait in the engine, so in a burst of
    prompts its dispatches keep that far ahead of the pipeline, not of the free slots
    (A-mixed (4) at 1x: the forecast was a median 1.2 s later than the dispatch).

    NOTE: the first requests of a queue are paced by nothing (the requests sent before
    the re-plan are not followed through the pipeline here)."""
    out = sent.copy()
    offsets = problem.req_offsets
    for i, queue in enumerate(queues):
        ahead = int(problem.engine_queue[i]) if problem.engine_queue.size else 0
        if not ahead or not queue:
            continue
        q = np.asarray(queue)
        sizes = offsets[q + 1] - offsets[q]
        # the queue's request rows, in queue order
        rows = np.arange(sizes.sum()) + np.repeat(offsets[q] - (np.cumsum(sizes) - sizes), sizes)
        if len(rows) <= ahead:
            continue
        later = rows[ahead:]
        paced = np.maximum(sent[:, later], start[:, rows[:-ahead]])
        out[:, later] = np.minimum(paced, start[:, later])
    return out


def queue_misses(problem: Problem, scen: Scenarios, i: int, queue: Sequence[int]) -> float:
    """Expected weighted requests of ``queue`` that miss on instance ``i``: that queue's
    part of :func:`simulate`'s count (instances do not share work)."""
    return sum(
        float(problem.weight[g]) * float(_mean(late.sum(axis=1), 0))
        for g, _swap, _decode, (_starts, _prefilled, _tokens, late, _sent) in _serve_queue(
            problem, scen, i, queue
        )
    )


def _serve_queue(
    problem: Problem, scen: Scenarios, i: int, queue: Sequence[int]
) -> Iterator[tuple[int, float, np.ndarray, GroupServed]]:
    """Serve ``queue``'s groups in order on a copy of instance ``i``'s engine: per group,
    the swap it paid, its requests' decode times [S, n] and :func:`serve_group`'s answer."""
    if not queue:
        return
    engine = scen.engines[i].copy()
    loaded = int(problem.init_model[i])
    for g in queue:
        swap = turn_to(problem, engine, loaded, g, i)
        loaded = int(problem.group_model[g])
        decode = np.repeat(scen.decode_s[g, i][:, None], int(problem.size[g]), axis=1)
        yield g, swap, decode, serve_group(problem, engine, g, i, decode, scen.ahead(g, i))


def turn_to(problem: Problem, engine: EngineState, loaded: int, g: int, i: int) -> float:
    """Bring instance ``i``'s ``engine``, holding model ``loaded``, to group ``g``'s turn:
    the requests deferred until work due after ``g`` are served first, then it changes
    to ``g``'s model if that is another; the swap seconds paid."""
    engine.serve_deferred(float(problem.deadline_s[g]))
    m = int(problem.group_model[g])
    if m == loaded:
        return 0.0
    swap = float(problem.swap_s[i, loaded, m])
    engine.drain(swap, problem.group_batch(g, i))
    return swap


def serve_group(
    problem: Problem,
    engine: EngineState,
    g: int,
    i: int,
    decode: np.ndarray,
    ahead: Ahead,
) -> GroupServed:
    """Serve group ``g`` on instance ``i``'s ``engine`` (updated) as the core would;
    its requests' ([S, n] starts, [S, n] prefill ends, [S, n] first tokens, [S, n]
    whether each misses, [S, n] when their slots free: see :func:`first_tokens`).

    With ``problem.defer_late``, a request whose first token would be late even alone
    when its turn comes goes behind the instance's queue due within
    ``problem.defer_horizon_s`` of that turn: it misses and holds up none of that work
    (its dispatch and prefill times are those it had before it was deferred; its first
    token is inf, not timed here). The engine holds it until a group due later comes
    (:func:`turn_to`), as the core does.
    """
    rows = slice(problem.req_offsets[g], problem.req_offsets[g + 1])
    deadline = problem.req_deadline_s[rows]
    before = engine.copy() if problem.defer_late else engine
    starts, prefilled, tokens, sent = first_tokens(problem, engine, g, i, decode, ahead)
    late = tokens > deadline
    if problem.defer_late:
        hopeless = starts + problem.req_ttft_s[rows, i] > deadline
        if hopeless.any():
            engine.slots, engine.pipeline_s = before.slots, before.pipeline_s
            tokens = first_tokens(problem, engine, g, i, decode, ahead, hopeless)[2]
            late = hopeless | (tokens > deadline)
            tokens = np.where(hopeless, np.inf, tokens)
            if math.isfinite(problem.defer_horizon_s):
                cols = hopeless.any(axis=0)
                due = np.where(hopeless, starts + problem.defer_horizon_s, np.inf)[:, cols]
                prefill = problem.req_prefill_s[rows, i][cols]
                engine.defer(decode[:, cols], np.broadcast_to(prefill, due.shape), due)
    return GroupServed(starts, prefilled, tokens, late, sent)


def first_tokens(
    problem: Problem,
    engine: EngineState,
    g: int,
    i: int,
    decode: np.ndarray,
    ahead: Ahead,
    skip: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Serve group ``g`` on instance ``i``'s ``engine`` (updated); its requests'
    ([S, n] starts: a slot is free and the prompts before it are in, [S, n] prefill
    ends, [S, n] first-token times, [S, n] when their slots free: the core may send them
    then, to wait in vLLM's queue).

    Arrivals that will go ahead of the group (``ahead``) take their share of the instance
    while it waits for a slot: that wait stretches as
    :func:`~qlmctl.plan.estimator.arrivals_delay_s` says (the engine's own state does
    not: every group is stretched from its unstretched start). Its wait in the prefill
    pipeline after that does not: the core has sent it, and vLLM serves its queue in
    order (a document of 30k tokens behind others' prompts waits there).

    ``skip`` ([S, n] bool) marks requests deferred in each scenario: they take neither
    slot time nor pipeline time here (their times are those of a zero-length request
    behind the rest of the group; they are served after the instance's queue).
    """
    rows = slice(problem.req_offsets[g], problem.req_offsets[g + 1])
    if skip is None:
        starts, prefilled, slot_free = engine.serve(
            decode, problem.req_prefill_s[rows, i], problem.release_s[g]
        )
    else:  # NOTE: deferred requests in the group: stretched from their dispatch
        starts, prefilled = engine.serve_kept(
            decode, problem.req_prefill_s[rows, i], skip, problem.release_s[g]
        )
        slot_free = starts
    overhead = problem.overhead_s[problem.group_model[g], i]
    tokens = np.maximum(prefilled + overhead, starts + problem.req_ttft_s[rows, i])
    if not ahead.load.any():  # NOTE: nothing goes ahead (one class, say): every delay is 0
        return starts, prefilled, tokens, slot_free
    wait = slot_free - problem.now_s
    delay = arrivals_delay_s(wait, ahead.load[:, None], ahead.horizon_s[:, None])
    return starts + delay, prefilled + delay, tokens + delay, slot_free + delay


def scenario_quantiles(values: np.ndarray, qs: tuple[float, ...]) -> list[np.ndarray]:
    """Per column of ``values`` ([S, N], one row per scenario), its empirical ``qs``
    quantiles (the smallest value at or above that share of the scenarios)."""
    ranked = np.sort(values, axis=0)
    n_s = values.shape[0]
    return [ranked[min(n_s - 1, max(0, math.ceil(q * n_s) - 1))] for q in qs]


def _mean(values: np.ndarray, axis: int) -> np.ndarray:
    """``values.mean(axis)`` (the same sum and division) without its Python wrapper."""
    return np.add.reduce(values, axis=axis, dtype=float) / values.shape[axis]


def _summarise(
    problem: Problem,
    start: np.ndarray,
    finish: np.ndarray,
    miss: np.ndarray,
    swap_s: float,
    request_start_s: np.ndarray,
    request_dispatch_s: np.ndarray,
    request_miss_prob: np.ndarray,
    request_first_token_s: np.ndarray,
    request_finish_s: np.ndarray,
) -> Score:
    miss_prob = _mean(miss, 1)
    wn = problem.weight * problem.size
    misses = float(np.sum(wn * miss_prob))
    met = problem.size * (1 - miss_prob)
    by_class = {}
    for c, name in enumerate(problem.class_names):
        sel = problem.group_class == c
        by_class[name] = float(met[sel].sum() / problem.size[sel].sum())
    return Score(
        attainment=1.0 - misses / problem.total_weight(),
        by_class=by_class,
        miss_prob=miss_prob,
        start_s=_mean(start, 1),
        finish_s=_mean(finish, 1),
        swap_s=swap_s,
        expected_misses=misses,
        miss=miss,
        request_start_s=request_start_s,
        request_dispatch_s=request_dispatch_s,
        request_miss_prob=request_miss_prob,
        request_first_token_s=request_first_token_s,
        request_finish_s=request_finish_s,
    )
