"""Loading and saving YAML specs with errors that name the file, the field and the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from qlmctl.domain import ClusterSpec
from qlmctl.errors import BadInput

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; :class:`BadInput` naming the file and line on any problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise BadInput(f"{path}:{where}: malformed YAML: {problem}") from None


def parse(model_cls: type[M], data: Any, source: str) -> M:
    """Validate ``data`` as ``model_cls``; :class:`BadInput` naming source and first bad field."""
    if not isinstance(data, dict):
        raise BadInput(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise BadInput(f"{source}: {describe_validation_error(exc)}") from None


def load_spec(model_cls: type[M], path: Path) -> M:
    """Read and validate one YAML spec file."""
    return parse(model_cls, read_yaml(path), str(path))


def dump_spec(spec: BaseModel, path: Path) -> None:
    """Write a spec as YAML that :func:`load_spec` reads back to an equal object."""
    data = spec.model_dump(mode="json", exclude_defaults=True)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def load_cluster(path: Path) -> ClusterSpec:
    """Read a cluster spec (GPU types, models, instances)."""
    return load_spec(ClusterSpec, path)


def describe_validation_error(exc: ValidationError) -> str:
    """One line: the first error's field path and message, plus how many more there are.

    Of several errors the deepest is named (the first of those): when a value fits none
    of a union's members, the member it was meant as goes deepest (``{by: fraction,
    weights: {m: .inf}}`` fails deep inside ``Assign``, not as "not a string").
    """
    errors = exc.errors()
    first = max(errors, key=lambda e: len(e["loc"]))
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"field '{loc}': {msg}{more}"
