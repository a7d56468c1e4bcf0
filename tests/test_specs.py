from pathlib import Path

import pytest

from qlmctl.domain import ClusterSpec
from qlmctl.errors import BadInput
from qlmctl.specs import dump_spec, load_cluster, load_spec
from tests.helpers import make_cluster

REPO = Path(__file__).resolve().parents[1]


def test_shipped_cluster_specs_load() -> None:
    for path in (REPO / "workloads").glob("cluster*.yaml"):
        assert load_cluster(path).instances


def test_yaml_round_trip(tmp_path: Path) -> None:
    spec = make_cluster(3)
    dump_spec(spec, tmp_path / "c.yaml")
    assert load_spec(ClusterSpec, tmp_path / "c.yaml") == spec


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("gpu_types: [\n  {name: x\n")
    with pytest.raises(BadInput, match=r"bad\.yaml: line \d+, column \d+: malformed YAML"):
        load_cluster(path)


def test_bad_field_names_file_and_field(tmp_path: Path) -> None:
    data = make_cluster().model_dump(mode="json")
    data["instances"][0]["launch"] = {"port": 99999}
    data["instances"][0]["endpoint"] = None
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    with pytest.raises(BadInput, match=r"c\.yaml: field 'instances\.0\.launch\.port'"):
        load_cluster(path)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="file not found"):
        load_cluster(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(BadInput, match="expected a mapping"):
        load_cluster(tmp_path / "list.yaml")
