import pytest
from pydantic import ValidationError

from qlmctl.domain import ClusterSpec, InstanceSpec, Request, SLOClass, check_models_served
from qlmctl.errors import BadInput
from tests.helpers import make_cluster


def test_slo_class_rejects_non_positive_target() -> None:
    with pytest.raises(ValidationError):
        SLOClass(name="x", ttft_s=0)


def test_request_output_cannot_exceed_cap() -> None:
    with pytest.raises(ValidationError, match="exceeds max_output_tokens"):
        Request(
            id="a",
            arrival_s=0,
            model="m",
            slo_class="c",
            prompt_tokens=1,
            max_output_tokens=5,
            output_tokens=6,
        )


def test_request_target_tokens_prefers_known_length() -> None:
    r = Request(id="a", arrival_s=0, model="m", slo_class="c", prompt_tokens=1, max_output_tokens=9)
    assert r.target_output_tokens == 9
    assert r.model_copy(update={"output_tokens": 4}).target_output_tokens == 4


def test_domain_types_are_frozen() -> None:
    slo = SLOClass(name="x", ttft_s=1)
    with pytest.raises(ValidationError):
        slo.ttft_s = 2  # type: ignore[misc]


def test_instance_needs_exactly_one_of_endpoint_or_launch() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        InstanceSpec(id="a", gpu="G")
    with pytest.raises(ValidationError, match="exactly one"):
        InstanceSpec(id="a", gpu="G", endpoint="http://x", launch={"port": 1})  # type: ignore[arg-type]
    launched = InstanceSpec(id="a", gpu="G", launch={"port": 8001})  # type: ignore[arg-type]
    assert launched.base_url == "http://127.0.0.1:8001"


def test_cluster_rejects_unknown_references_and_duplicates() -> None:
    good = make_cluster().model_dump()
    bad_gpu = {**good, "instances": [{**good["instances"][0], "gpu": "H100"}]}
    with pytest.raises(ValidationError, match="unknown gpu 'H100'"):
        ClusterSpec.model_validate(bad_gpu)
    dupes = {**good, "instances": [good["instances"][0]] * 2}
    with pytest.raises(ValidationError, match="duplicate"):
        ClusterSpec.model_validate(dupes)


def test_unknown_fields_are_errors() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        SLOClass.model_validate({"name": "x", "ttft_s": 1, "ttft": 2})


def test_check_models_served() -> None:
    cluster = make_cluster(models=("m1", "m2"))
    check_models_served(cluster, {"m1", "m2"})
    with pytest.raises(BadInput, match="unknown model 'm3'"):
        check_models_served(cluster, {"m3"})
    only_m1 = ClusterSpec.model_validate(
        {
            **cluster.model_dump(),
            "instances": [{**cluster.instances[0].model_dump(), "models": ["m1"]}],
        }
    )
    with pytest.raises(BadInput, match=r"no instance .* 'm2'"):
        check_models_served(only_m1, {"m2"})
