"""Online speed calibration: profiles scaled by the speed actually observed.

A profile is measured once, under one load; the machine serving now may be slower or
faster (another tenant on the host, thermal limits, another build of the engine). On
every finished request the core reports how long its decode took, over how many steps,
with what batch and context, and how much prefill the instance did in that time (vLLM
runs other requests' prefill chunks in the same steps: leaving them out would read a busy
engine as a slow one); this module keeps, per (model, GPU), an exponentially weighted
mean of observed / predicted and serves the profiles with every step-time coefficient
scaled by it. Capacities (sequences, KV tokens) and start-up times stay as
profiled. Planning and eviction decisions then use the speed the cluster really has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from qlmctl.perfmodel import PerfModel

if TYPE_CHECKING:
    from qlmctl.serve.state import InstanceRecord, Tracked

# the per-step time coefficients calibration scales
_STEP_COEFFICIENTS = (
    "step_base_s",
    "prefill_s_per_token",
    "prefill_s_per_token2",
    "decode_s_per_seq",
    "decode_s_per_ctx_token",
)

Pair = tuple[str, str]  # (model, gpu)


class SpeedCalibration:
    """Per-(model, GPU) slowdown factors learnt from finished requests."""

    def __init__(
        self,
        perf: Mapping[Pair, PerfModel],
        weight: float = 0.2,
        bounds: tuple[float, float] = (0.2, 20.0),
    ) -> None:
        """Args:
        perf: the profiled performance models.
        weight: weight of each new observation in the running mean.
        bounds: the factor is kept inside these (one odd request can't run away with it).
        """
        self._profiled = dict(perf)
        self._weight = weight
        self._bounds = bounds
        self._factor: dict[Pair, float] = {}
        self.current: dict[Pair, PerfModel] = dict(perf)  # the scaled profiles

    def factor(self, pair: Pair) -> float:
        """Observed / profiled step time of ``pair`` (1.0 until something is observed)."""
        return self._factor.get(pair, 1.0)

    def factors(self) -> dict[str, float]:
        """Every factor observed so far, keyed ``model@gpu`` (for run.json)."""
        return {f"{model}@{gpu}": f for (model, gpu), f in sorted(self._factor.items())}

    def observe_finish(
        self, tr: Tracked, inst: InstanceRecord, finish_s: float, output_tokens: int
    ) -> None:
        """``tr`` finished on ``inst`` at ``finish_s`` with ``output_tokens`` in its last
        attempt: its decode speed, at the load the service-time estimates assume
        (:meth:`InstanceRecord.decode_load`), so the factor corrects them."""
        if tr.first_token_s is None or output_tokens < 2:
            return
        batch, context = inst.decode_load(tr)
        self.observe(
            (tr.request.model, inst.spec.gpu),
            finish_s - tr.first_token_s,
            output_tokens - 1,
            batch,
            context,
            *inst.prefilled_since(tr),
        )

    def observe(
        self,
        pair: Pair,
        decode_s: float,
        steps: int,
        batch: int,
        context_tokens: int,
        prefill_tokens: float = 0.0,
        prefill_tokens_sq: float = 0.0,
    ) -> None:
        """A request of ``pair`` decoded ``steps`` tokens in ``decode_s`` seconds, in a batch
        of ``batch`` holding ``context_tokens``, while the instance prefilled prompts of
        ``prefill_tokens`` (squares summing to ``prefill_tokens_sq``)."""
        profiled = self._profiled.get(pair)
        if profiled is None or not decode_s > 0 or steps < 1:
            return
        predicted = steps * profiled.decode_step_s(max(1, batch), context_tokens)
        ratio = decode_s / (predicted + profiled.prefill_work_s(prefill_tokens, prefill_tokens_sq))
        low, high = self._bounds
        old = self._factor.get(pair)
        new = ratio if old is None else (1 - self._weight) * old + self._weight * ratio
        self._factor[pair] = min(high, max(low, new))
        self.current[pair] = scaled(profiled, self._factor[pair])


def scaled(perf: PerfModel, factor: float) -> PerfModel:
    """``perf`` with every per-step time coefficient multiplied by ``factor``.

    NOTE: called on every finished request, so it copies without re-validating (the
    profile was validated when loaded; a factor is positive and bounded, see
    :class:`SpeedCalibration`): ``dataclasses.replace`` cost most of a finish event, and
    ``copy.copy`` more than setting the fields one by one.
    """
    out = object.__new__(PerfModel)
    for name in PerfModel.__slots__:
        object.__setattr__(out, name, getattr(perf, name))
    for name in _STEP_COEFFICIENTS:
        object.__setattr__(out, name, getattr(perf, name) * factor)
    return out
