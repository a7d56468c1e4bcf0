"""Where performance models come from: measured profiles first, shipped defaults second.

:meth:`ProfileStore.load` reads the shipped defaults (``qlmctl/profile/defaults/*.json``,
estimates with their provenance) and then every ``*.json`` in a directory of measured
profiles, which replace a default for the same ``(model, gpu)`` pair. Lookups name what
is missing and list what exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from qlmctl.domain import ClusterSpec
from qlmctl.errors import BadInput
from qlmctl.perfmodel import PerfModel

Pair = tuple[str, str]  # (model, gpu)


@dataclass(frozen=True, slots=True)
class ProfileStore:
    """Performance models by ``(model, gpu)``, with the file each came from."""

    profiles: Mapping[Pair, PerfModel]
    sources: Mapping[Pair, str]  # pair -> file path, or "default:<file name>"

    @classmethod
    def load(cls, directory: Path | None = None) -> ProfileStore:
        """Shipped defaults, then the measured profiles in ``directory`` (they win).

        Args:
            directory: folder of ``*.json`` profiles written by ``qlmctl profile``; None for
                the defaults only.

        Returns:
            The store. :class:`BadInput` for a missing directory, an unreadable or
            older-version profile, or two measured files for the same pair.
        """
        profiles: dict[Pair, PerfModel] = {}
        sources: dict[Pair, str] = {}
        shipped = resources.files("qlmctl.profile").joinpath("defaults")
        for entry in sorted(shipped.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".json"):
                with resources.as_file(entry) as path:
                    perf = PerfModel.load(path)
                profiles[perf.key] = perf
                sources[perf.key] = f"default:{entry.name}"
        if directory is not None:
            directory = Path(directory)
            if not directory.is_dir():
                raise BadInput(f"{directory}: profile directory not found")
            measured: dict[Pair, str] = {}
            for path in sorted(directory.glob("*.json")):
                perf = PerfModel.load(path)
                if perf.key in measured:
                    raise BadInput(
                        f"{path}: a second profile for {perf.model}@{perf.gpu} "
                        f"(the first is {measured[perf.key]}); keep one"
                    )
                measured[perf.key] = str(path)
                profiles[perf.key] = perf
                sources[perf.key] = str(path)
        return cls(profiles=profiles, sources=sources)

    @property
    def pairs(self) -> list[Pair]:
        """Every ``(model, gpu)`` pair with a profile, sorted."""
        return sorted(self.profiles)

    def get(self, model: str, gpu: str) -> PerfModel:
        """The profile of ``model`` on ``gpu``; :class:`BadInput` listing the pairs known."""
        try:
            return self.profiles[(model, gpu)]
        except KeyError:
            raise BadInput(
                f"no profile for model {model!r} on gpu {gpu!r}; available: {self._listing()}. "
                "Measure one with `qlmctl profile`"
            ) from None

    def for_cluster(self, cluster: ClusterSpec) -> dict[Pair, PerfModel]:
        """The profile of every ``(model, gpu)`` pair the cluster's instances may use.

        An instance may use its resident model and every model it may serve (all of the
        cluster's models when it lists none). :class:`BadInput` names the first pair
        without a profile and the instance needing it.
        """
        out: dict[Pair, PerfModel] = {}
        all_models = [m.name for m in cluster.models]
        for inst in cluster.instances:
            usable = [inst.model] if inst.model else []
            usable += inst.models if inst.models is not None else all_models
            for model in usable:
                pair = (model, inst.gpu)
                if pair in out:
                    continue
                profile_name = cluster.model(model).profile or model
                found = self.profiles.get((profile_name, inst.gpu))
                if found is None:
                    raise BadInput(
                        f"instance {inst.id!r}: no profile for model {profile_name!r} on gpu "
                        f"{inst.gpu!r}; available: {self._listing()}. "
                        "Measure one with `qlmctl profile` or restrict the instance's 'models'"
                    )
                # A borrowed profile is applied under the cluster's model name.
                out[pair] = found if profile_name == model else replace(found, model=model)
        return out

    def _listing(self) -> str:
        return ", ".join(f"{m}@{g}" for m, g in self.pairs) or "none"
