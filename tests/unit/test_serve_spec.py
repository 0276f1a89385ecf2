"""Deployment configs: the examples load; bad ones name the field and the rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.realtime.spec import (
    ModelUri,
    ServeResources,
    deployment_from_data,
    load_deployment,
)
from workers.interface.errors import ConfigError
from workers.interface.telemetry import GIB

REPO = Path(__file__).parents[2]
MINIMAL = {"name": "mlp", "model": "models:/mlp@champion"}


def _refusal(data: object) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        deployment_from_data(data)
    return info.value.errors


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "serve").glob("*.yaml")))
def test_example_configs_are_valid(path: Path) -> None:
    spec = load_deployment(path.read_text())
    assert spec.replicas.min <= spec.replicas.max
    assert spec.model_ref().kind in {"alias", "version", "run"}


def test_example_configs_exist() -> None:
    # The parametrized test above passes vacuously on an empty folder.
    assert sorted((REPO / "configs" / "serve").glob("*.yaml"))


def test_demo_deployment_serves_the_trained_model() -> None:
    spec = load_deployment((REPO / "configs/serve/mlp_synthetic.yaml").read_text())
    train = (REPO / "configs/train/mlp_synthetic.yaml").read_text()
    assert f"register_as: {spec.model_ref().name}\n" in train
    assert spec.model_ref() == ModelUri(kind="alias", name="mlp-synthetic", alias="champion")
    assert spec.tracks_alias
    assert (spec.replicas.min, spec.replicas.max) == (1, 2)
    assert spec.resources.gpus == 1
    assert spec.resources.gpu_memory_bytes(None) == GIB
    assert (spec.batching.max_batch_size, spec.batching.max_wait_ms) == (32, 0)
    assert (spec.slo.p99_ms, spec.max_queue) == (50, 256)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            "models:/mlp-synthetic@champion",
            ModelUri(kind="alias", name="mlp-synthetic", alias="champion"),
        ),
        ("models:/mlp.v2/12", ModelUri(kind="version", name="mlp.v2", version="12")),
        (
            "runs:/0123abcd/model/data",
            ModelUri(kind="run", run_id="0123abcd", path="model/data"),
        ),
    ],
)
def test_model_uri_forms(uri: str, expected: ModelUri) -> None:
    spec = deployment_from_data({**MINIMAL, "model": uri})
    assert spec.model_ref() == expected
    assert spec.tracks_alias == (expected.kind == "alias")


def test_defaults() -> None:
    spec = deployment_from_data(MINIMAL)
    assert (spec.replicas.min, spec.replicas.max) == (1, 1)
    assert spec.resources.gpus == 0
    assert spec.resources.gpu_memory_bytes(80 * GIB) == 0
    assert (spec.resources.cpus, spec.resources.memory_gb) == (1, 1)
    assert (spec.batching.max_batch_size, spec.batching.max_wait_ms) == (32, 0)
    assert (spec.slo.p99_ms, spec.max_queue, spec.priority) == (100, 256, 100)
    auto = spec.autoscaling
    assert (auto.target_queue_per_replica, auto.upscale_delay_s, auto.downscale_delay_s) == (
        8,
        2,
        30,
    )
    assert (spec.team, spec.tags) == (None, {})


def test_max_replicas_defaults_to_min() -> None:
    spec = deployment_from_data({**MINIMAL, "replicas": {"min": 3}})
    assert (spec.replicas.min, spec.replicas.max) == (3, 3)


@pytest.mark.parametrize(
    ("change", "loc", "words"),
    [
        ({"name": "MLP"}, "name", "pattern"),
        ({"name": "has space"}, "name", "pattern"),
        ({"name": "-lead"}, "name", "pattern"),
        ({"name": "a" * 64}, "name", "pattern"),
        ({"model": "mlp"}, "model", "models:/NAME@ALIAS, models:/NAME/VERSION"),
        ({"model": "models:/mlp"}, "model", "runs:/RUN_ID/PATH"),
        ({"model": "models:/mlp/latest"}, "model", "expected one of"),
        ({"model": "models:/mlp/0"}, "model", "expected one of"),
        ({"model": "runs:/abc"}, "model", "expected one of"),
        ({"model": "s3://bucket/model"}, "model", "expected one of"),
        ({"replicas": {"min": 3, "max": 2}}, "replicas.max", "max (2) must be at least min (3)"),
        ({"replicas": {"min": 0}}, "replicas.min", "greater than or equal to 1"),
        (
            {"resources": {"gpu_memory_gb": 1, "gpu_fraction": 0.5}},
            "resources",
            "at most one of gpu_memory_gb and gpu_fraction",
        ),
        ({"resources": {"gpu_fraction": 1.5}}, "resources.gpu_fraction", "less than or equal"),
        ({"resources": {"gpu_fraction": 0}}, "resources.gpu_fraction", "greater than 0"),
        ({"resources": {"gpu_memory_gb": -1}}, "resources.gpu_memory_gb", "greater than 0"),
        ({"resources": {"cpus": 0}}, "resources.cpus", "greater than 0"),
        ({"resources": {"gpu_type": "H200"}}, "resources", "no GPU is requested"),
        (
            {"batching": {"max_batch_size": 0}},
            "batching.max_batch_size",
            "Input should be greater than or equal to 1",
        ),
        (
            {"batching": {"max_batch_size": 4097}},
            "batching.max_batch_size",
            "Input should be less than or equal to 4096",
        ),
        ({"batching": {"max_wait_ms": -1}}, "batching.max_wait_ms", "greater than or equal"),
        ({"batching": {"max_wait_ms": 1001}}, "batching.max_wait_ms", "less than or equal"),
        (
            {"batching": {"max_wait_ms": 60}, "slo": {"p99_ms": 50}},
            "",
            "batching.max_wait_ms (60) must be below slo.p99_ms (50)",
        ),
        ({"slo": {"p99_ms": 0}}, "slo.p99_ms", "greater than 0"),
        ({"slo": {"p99_ms": float("inf")}}, "slo.p99_ms", "finite number"),
        ({"max_queue": 0}, "max_queue", "greater than or equal to 1"),
        (
            {"autoscaling": {"target_queue_per_replica": 0}},
            "autoscaling.target_queue_per_replica",
            "greater than 0",
        ),
        (
            {"autoscaling": {"downscale_delay_s": -1}},
            "autoscaling.downscale_delay_s",
            "greater than or equal to 0",
        ),
        ({"priority": 101}, "priority", "less than or equal to 100"),
        ({"tags": {"a": 1}}, "tags.a", "valid string"),
        ({"surprise": 1}, "surprise", "unknown key 'surprise'"),
        (
            {"batching": {"max_batch": 8}},
            "batching.max_batch",
            "unknown key 'max_batch' (did you mean 'max_batch_size'?)",
        ),
        ({"slo": {"p99": 50}}, "slo.p99", "unknown key 'p99' (did you mean 'p99_ms'?)"),
    ],
)
def test_bad_fields_are_named(change: dict[str, object], loc: str, words: str) -> None:
    errors = _refusal({**MINIMAL, **change})
    assert any(got == loc and words.lower() in msg.lower() for got, msg in errors), errors


def test_required_fields_are_named() -> None:
    assert {loc for loc, _ in _refusal({})} == {"name", "model"}


@pytest.mark.parametrize("data", [None, [MINIMAL], "name: mlp", 3])
def test_non_mapping_is_refused(data: object) -> None:
    assert _refusal(data) == [("", "a deployment config must be a mapping of keys to values")]


def test_every_problem_is_reported_at_once() -> None:
    errors = _refusal({"name": "MLP", "model": "mlp", "max_queue": 0})
    assert {loc for loc, _ in errors} == {"name", "model", "max_queue"}


def test_yaml_errors_name_the_line() -> None:
    with pytest.raises(ConfigError, match="line 2, column 8"):
        load_deployment("name: mlp\n  model: models:/mlp@champion\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_deployment("- just\n- a list\n")


def test_json_text_loads() -> None:
    spec = load_deployment('{"name": "mlp", "model": "models:/mlp/3"}')
    assert spec.model_ref().version == "3"


@pytest.mark.parametrize(
    ("resources", "total", "expected_bytes"),
    [
        ({"gpu_fraction": 0.25}, 8 * GIB, 2 * GIB),
        ({"gpu_fraction": 1}, 80 * GIB, 80 * GIB),
        ({"gpu_fraction": 0.5}, 3, 1),  # rounded down: shares never add up past the total
        ({"gpu_memory_gb": 1.5}, 80 * GIB, 3 * GIB // 2),
        ({"gpu_memory_gb": 1.5}, None, 3 * GIB // 2),  # absolute: the total is not needed
        ({"gpu_memory_gb": 1e-9}, None, 2),  # rounded up: never less than asked
        ({}, None, 0),
    ],
)
def test_gpu_memory_bytes(
    resources: dict[str, float], total: int | None, expected_bytes: int
) -> None:
    assert ServeResources.model_validate(resources).gpu_memory_bytes(total) == expected_bytes


def test_four_quarter_shares_fill_one_gpu_exactly() -> None:
    total = 10**10 + 3  # not a multiple of 4
    share = ServeResources(gpu_fraction=0.25).gpu_memory_bytes(total)
    assert 4 * share <= total < 4 * (share + 1)


def test_fraction_of_unknown_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match="total memory, which is unknown"):
        ServeResources(gpu_fraction=0.5).gpu_memory_bytes(None)


@pytest.mark.parametrize(
    ("resources", "gpus"),
    [({}, 0), ({"gpu_fraction": 0.1}, 1), ({"gpu_memory_gb": 2, "gpu_type": "H200"}, 1)],
)
def test_gpu_count(resources: dict[str, object], gpus: int) -> None:
    spec = deployment_from_data({**MINIMAL, "resources": resources})
    assert spec.resources.gpus == gpus


def test_spec_is_frozen() -> None:
    spec = deployment_from_data(MINIMAL)
    with pytest.raises(ValueError, match="frozen"):
        spec.name = "other"


def test_json_dump_round_trips() -> None:
    # The deployment store keeps model_dump(mode="json") and validates it again on read.
    spec = deployment_from_data(
        {**MINIMAL, "replicas": {"min": 2, "max": 5}, "resources": {"gpu_fraction": 0.5}}
    )
    assert deployment_from_data(spec.model_dump(mode="json")) == spec
