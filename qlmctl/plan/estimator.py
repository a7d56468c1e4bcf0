"""Output-length beliefs and scenario sampling: the uncertainty behind waiting times.

Output lengths (the one unknown that drives service time) follow a log-normal per
(model, SLO class): ``log L ~ Normal(mu, sigma^2)``. ``sigma`` is fixed from the prior
sample; ``mu`` has a conjugate Normal prior ``N(mu0, sigma^2 / prior_strength)`` whose
``mu0``/``sigma`` come from the profiles' ``output_len_sample`` of that model (or a
default median of 200 tokens, log-sd 1.0). Each observed completion updates ``mu`` in
closed form: precision adds ``1/sigma^2`` per observation, the mean moves towards the
observed log-lengths. ``prior_strength`` says how many observations the prior is worth.
The requests running at the last snapshot count too, each as a right-censored
observation (its length is at least what it has generated): the mean moves to the fixed
point of EM, where each adds its expected log-length given that bound, and the precision
gains each one's Fisher information (near 0 for a request just started, near 1 for one
far past the typical length). Completions alone are a biased sample under load: the
short ones finish first.

A scenario draws ``mu`` from its posterior per (model, class) (so scenarios share load
shocks across groups, as real workloads do), then the group's output tokens: an exact
sum of per-request draws for small groups, a CLT normal for groups of ``clt_min``
requests or more; both are capped by the requests' ``max_output_tokens``. Running
requests draw what they have left from the length distribution truncated at what they
already generated; they hold their instance's first slots. A group's engine work =
prefill + tokens * decode seconds per token, and each of its requests holds a batch slot
for B times its share (see :mod:`qlmctl.plan.problem` and :mod:`qlmctl.plan.slots`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from qlmctl.domain import Request
from qlmctl.perfmodel import PerfModel
from qlmctl.plan.problem import Problem
from qlmctl.plan.slots import EngineState, started_engines

DEFAULT_MEDIAN_TOKENS = 200.0
DEFAULT_LOG_SD = 1.0
# arrivals going ahead of work due within the core's deferral horizon never take more of
# an instance than this: those that would are late and wait behind that work
# (ServingStyle.defers_late); a wait stretches by at most 1 / (1 - this) within the horizon
MAX_URGENT_LOAD = 0.9
# the recent window's rates are expected to hold this long on average (the window is as
# long); how long they do is drawn per scenario (horizons)
ARRIVAL_HORIZON_S = 60.0


def arrivals_delay_s(
    wait_s: np.ndarray | float, urgent: np.ndarray | float, horizon_s: np.ndarray | float
) -> np.ndarray:
    """What arrivals going ahead add to a wait of ``wait_s`` (from now) for a batch slot:
    they take ``urgent`` of the instance for the next ``horizon_s`` seconds, so the wait
    ``w`` becomes ``w'`` with ``w' = w + urgent * min(w', horizon)``: stretched by
    ``1 / (1 - urgent)`` within the horizon, by at most ``urgent * horizon`` after it.
    ``urgent`` may be 1 or more (work due beyond the core's deferral horizon waits behind
    every arrival ahead, late or not): the wait then grows by all they bring (the stretch
    is at most that of ``MAX_URGENT_LOAD``, so a group that starts now waits for none).
    """
    urgent = np.asarray(urgent)
    wait = np.maximum(wait_s, 0.0)
    stretch = np.minimum(urgent, MAX_URGENT_LOAD)
    return np.minimum(wait * (stretch / (1.0 - stretch)), urgent * horizon_s)


def horizons(count: int) -> np.ndarray:
    """[count] how long the recent rates hold in each scenario: a rate lasts an
    exponential time of mean ``ARRIVAL_HORIZON_S`` (a burst may end any moment), taken
    at its ``(k + 1/2) / count`` quantiles (one scenario: the mean), so no draw is spent.
    """
    if count == 1:
        return np.array([ARRIVAL_HORIZON_S])
    return -ARRIVAL_HORIZON_S * np.log1p(-(np.arange(count) + 0.5) / count)


class Ahead(NamedTuple):
    """The arrivals that will go ahead of a group on an instance, per scenario."""

    load: np.ndarray  # [S] the share of the instance they take
    horizon_s: np.ndarray  # [S] for how long they keep coming

    @classmethod
    def none(cls, count: int) -> Ahead:
        """Nothing goes ahead, in any of ``count`` scenarios."""
        return cls(np.zeros(count), np.zeros(count))


@dataclass(frozen=True, slots=True)
class Scenarios:
    """Sampled inputs of the second stage: S equally likely scenarios."""

    service_s: np.ndarray  # [G, I, S] the fluid view: a group's time at the engine's rate
    decode_s: np.ndarray  # [G, I, S] decode seconds of each of the group's requests
    engines: tuple[EngineState, ...]  # per instance: when its slots and pipeline free
    # [G, I, S] share of instance i's capacity that arrivals going ahead of group g take
    urgent_load: np.ndarray
    horizon_s: np.ndarray  # [S] for how long they take it (see horizons)

    @property
    def count(self) -> int:
        """S."""
        return int(self.service_s.shape[2])

    def ahead(self, g: int, i: int) -> Ahead:
        """The arrivals that will go ahead of group ``g`` on instance ``i``."""
        return Ahead(self.urgent_load[g, i], self.horizon_s)

    def mean(self) -> Scenarios:
        """The one scenario of the means (what greedy placement plans with)."""
        return Scenarios(
            self.service_s.mean(axis=2, keepdims=True),
            self.decode_s.mean(axis=2, keepdims=True),
            tuple(e.mean() for e in self.engines),
            self.urgent_load.mean(axis=2, keepdims=True),
            self.horizon_s.mean(keepdims=True),
        )


class LengthModel:
    """Bayesian output-length model per (model, SLO class); mutable, fed by completions.

    Thread-safe: the serving loop observes completions while a planner thread reads.
    """

    def __init__(self, prior_strength: float = 20.0) -> None:
        self.prior_strength = prior_strength
        self._lock = threading.Lock()
        self._prior: dict[str, tuple[float, float]] = {}  # model -> (mu0, sigma)
        self._obs: dict[tuple[str, str], tuple[int, float]] = {}  # key -> (n, sum log L)
        self._memo: dict[tuple[str, str], tuple[float, float, float]] = {}  # posterior cache
        self._mean_memo: dict[tuple[str, str], float] = {}  # key -> uncapped predictive mean
        # key -> log of the tokens each request running at the last snapshot has generated
        self._running: dict[tuple[str, str], np.ndarray] = {}

    def set_priors(self, perf: Mapping[tuple[str, str], PerfModel]) -> None:
        """Take priors from the profiles' length samples for models without one yet."""
        samples: dict[str, list[int]] = {}
        for (model, _gpu), pm in sorted(perf.items()):
            samples.setdefault(model, []).extend(pm.output_len_sample)
        with self._lock:
            for model, sample in samples.items():
                if model in self._prior:
                    continue
                self._memo.clear()
                self._mean_memo.clear()
                logs = np.log(np.maximum(np.array(sample, float), 1.0))
                if len(logs) >= 2:
                    self._prior[model] = (float(logs.mean()), max(float(logs.std()), 0.05))
                else:
                    self._prior[model] = (math.log(DEFAULT_MEDIAN_TOKENS), DEFAULT_LOG_SD)

    def observe(self, model: str, slo_class: str, output_tokens: int) -> None:
        """Record one completed request's output length."""
        with self._lock:
            n, s = self._obs.get((model, slo_class), (0, 0.0))
            self._obs[(model, slo_class)] = (n + 1, s + math.log(max(output_tokens, 1)))
            self._memo.pop((model, slo_class), None)
            self._mean_memo.pop((model, slo_class), None)

    def observe_running(self, running: Iterable[tuple[str, str, int]]) -> None:
        """The requests running now, each ``(model, slo_class, tokens generated so far)``:
        right-censored observations, replacing the last snapshot's.

        NOTE: in A-mixed (8) at 2x the batch-1 median read from completions alone rose
        from 92 to 182 tokens over the run (the true one is 217); with the running ones
        censored, 188-210 throughout.
        """
        by_key: dict[tuple[str, str], list[int]] = {}
        for model, slo_class, tokens in running:
            if tokens > 1:  # one token (or none) says nothing of the length
                by_key.setdefault((model, slo_class), []).append(tokens)
        with self._lock:
            self._running = {key: np.log(np.array(v, float)) for key, v in by_key.items()}
            self._memo.clear()
            self._mean_memo.clear()

    def posterior(self, model: str, slo_class: str) -> tuple[float, float, float]:
        """``(mu_n, tau_n, sigma)``: posterior mean and sd of ``mu``, and the log-sd."""
        key = (model, slo_class)
        with self._lock:
            if key not in self._memo:
                self._memo[key] = self._posterior(model, slo_class)
            return self._memo[key]

    def _posterior(self, model: str, slo_class: str) -> tuple[float, float, float]:
        mu0, sigma = self._prior.get(model, (math.log(DEFAULT_MEDIAN_TOKENS), DEFAULT_LOG_SD))
        n, sum_log = self._obs.get((model, slo_class), (0, 0.0))
        weight, total = self.prior_strength + n, mu0 * self.prior_strength + sum_log
        mu, info = total / weight, 0.0
        censored = self._running.get((model, slo_class))
        if censored is not None and censored.size:
            mu, info = _censored_mean(total, weight, censored, sigma)
        return mu, sigma / math.sqrt(weight + info), sigma

    def expected(self, request: Request) -> float:
        """Expected output tokens of ``request`` (posterior predictive mean, capped)."""
        return min(
            self.mean_tokens(request.model, request.slo_class), float(request.max_output_tokens)
        )

    def expected_left(self, request: Request, generated: int) -> float:
        """Output tokens ``request`` is expected to generate after the ``generated`` it
        has: the posterior predictive (log-normal) mean above ``generated``, capped by its
        limit, less ``generated``; at least 1.

        NOTE: for a log-normal of parameters (mu, s), E[L | L > k] = exp(mu + s^2 / 2)
        Phi(s - a) / Phi(-a), a = (ln k - mu) / s: a long answer is expected to go on.
        """
        if generated < 1:
            return max(1.0, self.expected(request))
        mu, tau, sigma = self.posterior(request.model, request.slo_class)
        sd = math.hypot(tau, sigma)
        a = (math.log(generated) - mu) / sd
        above = math.erfc(a / math.sqrt(2.0))  # 2 P(L > k)
        cap = float(request.max_output_tokens)
        mean = cap
        if above > 0.0:
            mean = math.exp(mu + sd * sd / 2) * math.erfc((a - sd) / math.sqrt(2.0)) / above
        return max(1.0, min(mean, cap) - generated)

    def mean_tokens(self, model: str, slo_class: str) -> float:
        """Posterior predictive mean of the output length of (model, class), uncapped."""
        key = (model, slo_class)
        mean = self._mean_memo.get(key)  # NOTE: on the hot path: one lookup
        if mean is None:
            with self._lock:
                if key not in self._memo:
                    self._memo[key] = self._posterior(*key)
                mu, tau, sigma = self._memo[key]
                mean = self._mean_memo[key] = math.exp(mu + (sigma**2 + tau**2) / 2)
        return mean


def _censored_mean(
    total: float, weight: float, bounds: np.ndarray, sigma: float, tol: float = 1e-7
) -> tuple[float, float]:
    """The posterior mode of the mean of normal log-lengths of known ``sigma``, given
    ``weight`` observations (prior included) summing ``total`` and right-censored ones
    at ``bounds``, and those censored ones' Fisher information about it, in observations.

    The mode solves ``weight * mu = total + sigma * sum(lambda)``, lambda the inverse
    Mills ratio at each bound (each censored value counts as its expectation above its
    bound: EM's fixed point); the left side less the right grows with ``mu`` at slope
    ``weight + information``, so Newton's method takes a few steps from the mean of the
    complete observations (EM's plain iteration took about 60 under overload).
    """
    mu = total / weight
    for _ in range(50):
        a = (bounds - mu) / sigma
        lam = _inverse_mills(a)
        info = float(np.clip(lam * (lam - a), 0.0, 1.0).sum())
        step = (weight * mu - total - sigma * float(lam.sum())) / (weight + info)
        mu -= step
        if abs(step) < tol:
            break
    return mu, info


def _inverse_mills(a: np.ndarray) -> np.ndarray:
    """phi(a) / (1 - Phi(a)) of the standard normal, without underflow in the far tail.

    NOTE: erfc by Numerical Recipes' Chebyshev fit (relative error < 1.2e-7): erfc(z) =
    t exp(-z^2 + P(t)); above the mean the exp(-a^2 / 2) of phi cancels against it.
    """
    z = np.abs(a) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = _horner(t, _ERFC_COEFS)
    phi = np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    above = 2.0 / (math.sqrt(2.0 * math.pi) * t * np.exp(poly))
    below = phi / (1.0 - 0.5 * t * np.exp(poly - z * z))
    return np.where(a >= 0, above, below)


_ERFC_COEFS = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
               0.09678418, 0.37409196, 1.00002368, -1.26551223)  # fmt: skip


def sample_scenarios(
    problem: Problem, lengths: LengthModel, rng: np.random.Generator, count: int, clt_min: int = 16
) -> Scenarios:
    """Draw ``count`` scenarios of output tokens and turn them into service times."""
    keys = sorted({(g.model, g.slo_class) for g in problem.groups})
    post = np.array([lengths.posterior(m, c) for m, c in keys])  # [K, 3]
    mu_ks = post[:, :1] + post[:, 1:2] * rng.standard_normal((len(keys), count))  # [K, S]
    kidx = {k: n for n, k in enumerate(keys)}
    g_key = np.array([kidx[(g.model, g.slo_class)] for g in problem.groups])
    sigma = post[g_key, 2]
    caps = np.array([sum(r.max_output_tokens for r in g.requests) for g in problem.groups], float)

    tokens = np.empty((problem.num_groups, count))
    large = problem.size >= clt_min
    if large.any():  # CLT: sum of n log-normals given mu
        mu, s2, n = mu_ks[g_key[large]], sigma[large, None] ** 2, problem.size[large, None]
        mean = np.exp(mu + s2 / 2)
        var = np.expm1(s2) * np.exp(2 * mu + s2)
        draw = n * mean + np.sqrt(n * var) * rng.standard_normal(mean.shape)
        tokens[large] = np.clip(draw, n, caps[large, None])
    small = np.flatnonzero(~large)
    if small.size:  # exact: one draw per request
        reqs = [(g, r.max_output_tokens) for g in small for r in problem.groups[g].requests]
        owner = np.array([g for g, _ in reqs])
        cap = np.array([c for _, c in reqs], float)
        z = rng.standard_normal((len(reqs), count))
        draw = np.minimum(np.exp(mu_ks[g_key[owner]] + sigma[owner, None] * z), cap[:, None])
        new_group = np.concatenate(([True], owner[1:] != owner[:-1]))  # NOTE: np.r_ is slow
        tokens[small] = np.add.reduceat(np.maximum(draw, 1.0), np.flatnonzero(new_group), axis=0)
    left = _running_left(problem, lengths, rng, count)
    return scenarios_from_tokens(problem, tokens, left, arrival_rates(problem, rng, count))


def mean_scenario(problem: Problem, lengths: LengthModel) -> Scenarios:
    """The single expected-value scenario (the deterministic mean-value problem)."""
    tokens = np.array([[sum(lengths.expected(r) for r in g.requests)] for g in problem.groups])
    left = np.array(
        [[max(lengths.expected(rr.request) - rr.generated_tokens, 1.0)] for rr in problem.running]
    ).reshape(len(problem.running), 1)
    return scenarios_from_tokens(problem, tokens, left, arrival_rates(problem))


def known_scenario(
    problem: Problem, rng: np.random.Generator | None = None, count: int = 1
) -> Scenarios:
    """The clairvoyant scenarios: each request's true (or capped) output length, and
    the coming arrivals as uncertain as ever (``count`` draws of their rates with
    ``rng``; their mean without)."""
    tokens = np.array(
        [[sum(r.target_output_tokens for r in g.requests)] for g in problem.groups], float
    )
    left = np.array(
        [[max(rr.request.target_output_tokens - rr.generated_tokens, 1)] for rr in problem.running],
        float,
    ).reshape(len(problem.running), 1)
    rates = arrival_rates(problem, rng, count if problem.stream_seen.size else 1)
    count = rates.shape[1]  # one scenario when nothing is coming
    return scenarios_from_tokens(
        problem, np.repeat(tokens, count, axis=1), np.repeat(left, count, axis=1), rates
    )


def arrival_rates(
    problem: Problem, rng: np.random.Generator | None = None, count: int = 1
) -> np.ndarray:
    """[K, S] arrivals per second of each stream: drawn from the rate's posterior given
    the arrivals seen in the window (Poisson counts, Jeffreys prior: Gamma(n + 1/2, W)),
    or its mean without ``rng``. Nothing seen yet (no window): no arrivals."""
    n, window = problem.stream_seen, problem.arrival_window_s
    if window <= 0 or not n.size:
        return np.zeros((n.size, count))
    if rng is None:
        return np.repeat(((n + 0.5) / window)[:, None], count, axis=1)
    return rng.gamma(n[:, None] + 0.5, 1.0 / window, (n.size, count))


def scenarios_from_tokens(
    problem: Problem, tokens: np.ndarray, running_left: np.ndarray, rates: np.ndarray
) -> Scenarios:
    """Decode times, engines, their fluid view and the load of arrivals going ahead, from
    group output tokens [G, S], running leftovers [R, S] and stream rates [K, S].

    The fluid view (the stochastic program's unit of work): a group takes ``size`` times
    the larger of a request's hold over B slots and its prompt's pipeline time.
    """
    decode = problem.step_s[:, :, None] * (tokens / problem.size[:, None])[:, None, :]
    prefill = problem.group_prefill_s()
    slots = problem.batch[problem.group_model].astype(float)  # [G, I]
    per_request = (prefill / problem.size[:, None])[:, :, None]
    rate = np.maximum((per_request + decode) / np.maximum(slots, 1.0)[:, :, None], per_request)
    service = np.where(problem.eligible[:, :, None], problem.size[:, None, None] * rate, np.inf)
    batch = [
        int(problem.batch[model, i]) if model < len(problem.models) else 1
        for i, model in enumerate(problem.init_model)
    ]
    # in dispatch order: the first hold slots, the rest queue in vLLM
    left_s = problem.running_step_s[:, None] * running_left
    engines = started_engines(
        problem.ready_s, batch, problem.running_instance, left_s, problem.running_prefill_s
    )
    urgent = np.einsum(
        "gk,ks,ki->gis", problem.stream_ahead.astype(float), rates, problem.stream_load
    )
    cap = np.where(problem.due_beyond_defer_horizon(), np.inf, MAX_URGENT_LOAD)[:, None, None]
    return Scenarios(
        service, decode, tuple(engines), np.minimum(urgent, cap), horizons(tokens.shape[1])
    )


_BLOCK = 1 << 14  # array elements per block of the leftover transform


def _running_left(
    problem: Problem, lengths: LengthModel, rng: np.random.Generator, count: int
) -> np.ndarray:
    """Tokens each running request still has to generate, [R, S], truncated sampling.

    NOTE: one vectorised draw; row k takes the same uniforms a per-request loop would.
    Under overload thousands of requests run: the posteriors are read once per (model,
    class) and gathered by index.
    """
    n = len(problem.running)
    if n == 0:
        return np.empty((0, count))
    index: dict[tuple[str, str], int] = {}
    rows = [
        index.setdefault((rr.request.model, rr.request.slo_class), len(index))
        for rr in problem.running
    ]
    post = np.array([lengths.posterior(*key) for key in index])[rows]
    mu, sd = post[:, 0], np.hypot(post[:, 1], post[:, 2])
    generated = np.array([rr.generated_tokens for rr in problem.running], float)
    cap = np.array([rr.request.max_output_tokens for rr in problem.running], float)
    z = (np.log(np.maximum(generated, 1.0)) - mu) / (sd * math.sqrt(2))
    lo = 0.5 * np.array(list(map(math.erfc, (-z).tolist())))  # P(L <= done)
    low = np.minimum(lo, 1 - 1e-9)[:, None]
    u = low + (1.0 - low) * rng.random((n, count))  # NOTE: rng.uniform(low, 1), faster
    left = np.empty_like(u)
    step = max(1, _BLOCK // count)
    for k in range(0, n, step):  # NOTE: blocks that fit the cache, about twice as fast
        block = slice(k, k + step)
        total = _norm_ppf(u[block])
        total *= sd[block, None]
        total += mu[block, None]
        np.exp(total, out=total)
        np.minimum(total, cap[block, None], out=total)
        total -= generated[block, None]
        np.maximum(total, 1.0, out=left[block])
    return left


def _horner(x: np.ndarray, coefs: tuple[float, ...], last: float | None = None) -> np.ndarray:
    """``((c0 x + c1) x + ...) x + c_n`` (then ``* x + last``), in place on one array."""
    out = coefs[0] * x
    for c in coefs[1:-1]:
        out += c
        out *= x
    out += coefs[-1]
    if last is not None:
        out *= x
        out += last
    return out


def _norm_ppf(p: np.ndarray) -> np.ndarray:
    """Standard normal quantile (Acklam's rational approximation, rel. error < 1.2e-9).

    NOTE: each branch is evaluated only where it applies, in place: under overload this
    runs on thousands of running requests times every scenario at every re-plan.
    """
    a = (-39.69683028665376, 220.9460984245205, -275.9285104469687, 138.3577518672690,
         -30.66479806614716, 2.506628277459239)  # fmt: skip
    b = (-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972,
         -13.28068155288572)  # fmt: skip
    c = (-7.784894002430293e-03, -0.3223964580411365, -2.400758277161838, -2.549732539343734,
         4.374664141464968, 2.938163982698783)  # fmt: skip
    d = (7.784695709041462e-03, 0.3224671290700398, 2.445134137142996, 3.754408661907416)
    p = np.clip(p, 1e-12, 1 - 1e-12)
    upper = p >= 0.5
    q = np.where(upper, 1 - p, p)  # the lower tail's probability
    x = np.empty_like(q)
    tail = q < 0.02425
    if tail.any():
        r = np.sqrt(-2 * np.log(q[tail]))
        x[tail] = _horner(r, c) / _horner(r, d, 1.0)
    mid = ~tail
    t = q[mid] - 0.5
    s = t * t
    num = _horner(s, a)
    num *= t
    x[mid] = num / _horner(s, b, 1.0)
    np.negative(x, out=x, where=upper)
    return x  # quantile of p
