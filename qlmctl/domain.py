"""Validated domain types: SLO classes, models, GPU types, instances, clusters, requests.

Rules: every type is a frozen pydantic v2 model that rejects unknown fields; times are
seconds (``*_s``), sizes are tokens (``*_tokens``). Cross-file checks (a workload naming
a model the cluster lacks) live in :func:`check_models_served`.
"""

from __future__ import annotations

import os
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qlmctl.errors import BadInput

# Bounds of every number a user gives (specs, traces, profiles, CLI options): beyond them
# a value is a mistake (a unit slip, a typo) that would otherwise overflow an int32 column,
# allocate terabytes or turn times into inf/NaN deep inside a run.
INT32_MAX = 2**31 - 1
MAX_TIME_S = 1e9  # about 32 years
MAX_RATE_PER_S = 1e6
MAX_REQUESTS = 10_000_000  # requests one workload source may produce
MAX_SEED = 2**63 - 1

Name = Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")]
Seconds = Annotated[float, Field(ge=0, le=MAX_TIME_S)]
PositiveSeconds = Annotated[float, Field(gt=0, le=MAX_TIME_S)]
Tokens = Annotated[int, Field(gt=0, le=INT32_MAX)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Priority = Annotated[int, Field(ge=-INT32_MAX, le=INT32_MAX)]
Weight = Annotated[float, Field(gt=0, le=1e9)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class Frozen(BaseModel):
    """Base of the domain types: immutable, unknown fields are errors, numbers finite.

    ``allow_inf_nan=False`` is the one place that keeps ``.inf``/``.nan`` out of every
    spec; the bounded aliases above keep finite numbers sane.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class SLOClass(Frozen):
    """A service-level class: a TTFT target, an optional end-to-end target, a weight.

    ``priority`` is the value sent as vLLM's request ``priority`` (lower is more urgent).
    """

    name: Name
    ttft_s: PositiveSeconds
    e2e_s: PositiveSeconds | None = None
    weight: Weight = 1.0
    priority: Priority = 0


class ModelSpec(Frozen):
    """A model that instances can serve: a local path or hub id, and its size."""

    name: Name
    path: str = Field(min_length=1, description="Local directory or hub id passed to vllm serve")
    params_b: Annotated[float, Field(gt=0, le=1e6)] | None = None
    max_model_len: Tokens | None = None
    profile: Name | None = Field(
        default=None,
        description="Profile to use (default: the model's own name), e.g. the base model's "
        "profile for a fine-tune with the same architecture",
    )


class GPUType(Frozen):
    """A kind of accelerator (or ``cpu``) that profiles are measured on."""

    name: Name
    memory_gib: Annotated[float, Field(gt=0, le=1e6)] | None = None


class LaunchSpec(Frozen):
    """How qlmctl starts ``vllm serve`` for an instance (argument list, never a shell string)."""

    port: Annotated[int, Field(gt=0, lt=65536)]
    host: str = "127.0.0.1"
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    ports: dict[Name, Annotated[int, Field(gt=0, lt=65536)]] = Field(
        default_factory=dict,
        description="Port of each warm model's server (default: port + its place in the "
        "instance's warm_models)",
    )


class InstanceSpec(Frozen):
    """One serving instance: either attached by URL or launched locally."""

    id: Name
    gpu: Name
    endpoint: str | None = Field(default=None, description="URL of a running vLLM server")
    launch: LaunchSpec | None = None
    model: Name | None = Field(default=None, description="Model resident at start")
    models: list[Name] | None = Field(
        default=None, description="Models this instance may serve (default: all)"
    )
    warm: list[Name] | None = Field(
        default=None,
        description="Models kept warm on this instance (warm start): one server each, all "
        "but the resident one asleep; a model change between them is a sleep and a wake. "
        "Default: any model whose profile supports sleep (simulator); a launched instance "
        "without it restarts its server to change model",
    )
    api_key_env: EnvName | None = Field(
        default=None,
        description="Environment variable holding the server's API key (sent as "
        "Authorization: Bearer; the key itself is never written anywhere)",
    )

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"endpoint {url!r} is not an http:// or https:// URL")
        return url

    @model_validator(mode="after")
    def _one_way_to_reach(self) -> InstanceSpec:
        if (self.endpoint is None) == (self.launch is None):
            raise ValueError("give exactly one of 'endpoint' (attach) or 'launch' (start)")
        if self.api_key_env is not None and self.endpoint is None:
            raise ValueError("'api_key_env' is for attached servers ('endpoint') only")
        if self.model and self.models and self.model not in self.models:
            raise ValueError(f"resident model {self.model!r} is not in 'models'")
        for m in self.warm or ():
            if not self.can_serve(m):
                raise ValueError(f"warm model {m!r} is not in 'models'")
        if self.warm is not None and len(set(self.warm)) != len(self.warm):
            raise ValueError("'warm' lists a model twice")
        return self

    @property
    def base_url(self) -> str:
        """The server's base URL, whether attached or launched."""
        if self.endpoint is not None:
            return self.endpoint.rstrip("/")
        assert self.launch is not None
        return f"http://{self.launch.host}:{self.launch.port}"

    @property
    def warm_models(self) -> list[str]:
        """The models with a server of their own here: the resident one first, then ``warm``."""
        first = [self.model] if self.model is not None else []
        return first + [m for m in self.warm or () if m != self.model]

    def port_of(self, model: str) -> int:
        """Port of ``model``'s server on a launched instance (see ``LaunchSpec.ports``)."""
        assert self.launch is not None
        if model in self.launch.ports:
            return self.launch.ports[model]
        warm = self.warm_models
        return self.launch.port + (warm.index(model) if model in warm else 0)

    def keeps_warm(self, model: str | None) -> bool:
        """Whether ``model`` may be put to sleep here rather than stopped (see ``warm``)."""
        return model is not None and (self.warm is None or model in self.warm)

    def can_serve(self, model: str) -> bool:
        """Whether this instance may be given work for ``model``."""
        return self.models is None or model in self.models

    def auth_headers(self) -> dict[str, str]:
        """``Authorization: Bearer`` from ``api_key_env`` ({} without one).

        Raises:
            BadInput: the variable is not set (read when the run starts, never stored).
        """
        if self.api_key_env is None:
            return {}
        key = os.environ.get(self.api_key_env)
        if not key:
            raise BadInput(
                f"instance {self.id!r}: api_key_env {self.api_key_env} is not set in the "
                "environment"
            )
        return {"Authorization": f"Bearer {key}"}


class ClusterSpec(Frozen):
    """GPU types, models and the instances that serve them."""

    gpu_types: list[GPUType]
    models: list[ModelSpec]
    instances: Annotated[list[InstanceSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _references_resolve(self) -> ClusterSpec:
        _require_unique("gpu_types", [g.name for g in self.gpu_types])
        _require_unique("models", [m.name for m in self.models])
        _require_unique("instances", [i.id for i in self.instances])
        gpus = {g.name for g in self.gpu_types}
        models = {m.name for m in self.models}
        for inst in self.instances:
            if inst.gpu not in gpus:
                raise ValueError(
                    f"instance {inst.id!r}: unknown gpu {inst.gpu!r} (known: {sorted(gpus)})"
                )
            for m in [inst.model, *(inst.models or [])]:
                if m is not None and m not in models:
                    raise ValueError(
                        f"instance {inst.id!r}: unknown model {m!r} (known: {sorted(models)})"
                    )
        return self

    def model(self, name: str) -> ModelSpec:
        """The model called ``name``; :class:`BadInput` listing the known ones otherwise."""
        for m in self.models:
            if m.name == name:
                return m
        raise BadInput(
            f"unknown model {name!r}; the cluster has {sorted(m.name for m in self.models)}"
        )

    def instance(self, instance_id: str) -> InstanceSpec:
        """The instance called ``instance_id``; :class:`BadInput` otherwise."""
        for i in self.instances:
            if i.id == instance_id:
                return i
        raise BadInput(
            f"unknown instance {instance_id!r}; the cluster has {[i.id for i in self.instances]}"
        )


class Request(Frozen):
    """One request of a workload.

    ``output_tokens`` is the true output length when a trace knows it; a replay then asks
    the engine for exactly that many tokens (``ignore_eos``). ``max_output_tokens`` caps it.
    """

    id: str = Field(min_length=1)
    arrival_s: Seconds
    model: Name
    slo_class: Name
    prompt: str | None = None
    prompt_tokens: Tokens
    max_output_tokens: Tokens
    output_tokens: Tokens | None = None

    @model_validator(mode="after")
    def _output_within_cap(self) -> Request:
        if self.output_tokens is not None and self.output_tokens > self.max_output_tokens:
            raise ValueError(
                f"output_tokens {self.output_tokens} exceeds "
                f"max_output_tokens {self.max_output_tokens}"
            )
        return self

    @property
    def target_output_tokens(self) -> int:
        """Tokens a replay generates: the known output length, else the cap."""
        return self.output_tokens if self.output_tokens is not None else self.max_output_tokens


def check_models_served(cluster: ClusterSpec, models: set[str]) -> None:
    """Raise :class:`BadInput` if some model in ``models`` has no instance that may serve it."""
    for name in sorted(models):
        cluster.model(name)
        if not any(i.can_serve(name) for i in cluster.instances):
            raise BadInput(f"no instance in the cluster may serve model {name!r}")


def _require_unique(field: str, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{field}: duplicate names {dupes}")
