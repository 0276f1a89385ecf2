"""Safe bytes, the pure parts: the YAML loader, the caps on specs, the request guard's
host and limit rules, and the router's row cap."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from scheduler.api.guards import MIB, BodyLimits, _host_name, allowed_hosts
from scheduler.realtime.metrics import ServingMetrics
from scheduler.realtime.router import RouteConfig, Router
from scheduler.realtime.spec import load_deployment
from workers.interface.channel import MAX_ROWS_FACTOR
from workers.interface.errors import ConfigError, PredictError
from workers.interface.spec import load_spec, parse_text
from workers.sim_backend import ClusterConfigError, parse_cluster_config

TRAIN = "name: t\nmodel: {name: mlp}\ntrain: {max_steps: 1}\n"
DEPLOY = "name: d\nmodel: models:/m@champion\n"


def errors(text: str, load: object = load_spec) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load(text)  # type: ignore[operator]
    return info.value.errors


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("a: &x 1\nb: *x\n", "YAML aliases (*x) are not accepted, at line 2, column 4"),
        ("a: &x {k: 1}\nb: {<<: *x}\n", "YAML aliases (*x) are not accepted, at line 2, column 9"),
        ("a: &x [1]\nb: [*x, *x]\n", "YAML aliases (*x)"),
    ],
    ids=["scalar", "merge key", "in a list"],
)
def test_yaml_aliases_are_refused_naming_where(text: str, says: str) -> None:
    ((loc, msg),) = errors(text, parse_text)
    assert loc == ""
    assert says in msg


def test_an_anchor_without_alias_is_plain_yaml() -> None:
    assert parse_text("a: &x 1\nb: 2\n") == {"a": 1, "b": 2}


def test_nesting_beyond_the_parser_is_refused() -> None:
    ((_, msg),) = errors("a: " + "[" * 50_000 + "]" * 50_000, parse_text)
    assert "nested too deeply" in msg


@pytest.mark.parametrize(
    ("text", "loc"),
    [
        ("a: .inf\n", "a"),
        ("a: {b: [1, -.inf]}\n", "a.b.1"),
        ("a: .NaN\n", "a"),
        ("a: 1.0e+999\n", "a"),
        ("[1, .nan]\n", "1"),
    ],
)
def test_non_finite_numbers_are_refused_anywhere_naming_the_path(text: str, loc: str) -> None:
    ((where, msg),) = errors(text, parse_text)
    assert (where, "must be a finite number" in msg) == (loc, True)


@pytest.mark.parametrize(
    ("text", "loc", "words"),
    [
        (TRAIN + "resources: {gpus: 65}\n", "resources.gpus", "64"),
        (TRAIN + "resources: {gpus: 1, gpu_memory_gb: 1025}\n", "resources.gpu_memory_gb", "1024"),
        (TRAIN + "resources: {memory_gb: 16385}\n", "resources.memory_gb", "16384"),
        (TRAIN + "resources: {cpus: 257}\n", "resources.cpus", "256"),
        (TRAIN + "resources: {nodes: 65}\n", "resources.nodes", "64"),
        (TRAIN + "tags: {'': v}\n", "tags..[key]", "at least 1"),
        (TRAIN + f"tags: {{k: {'v' * 8001}}}\n", "tags.k", "8000"),
    ],
)
def test_training_caps(text: str, loc: str, words: str) -> None:
    assert any(where == loc and words in msg for where, msg in errors(text)), errors(text)


def test_training_caps_allow_their_bound() -> None:
    tags = ", ".join(f"t{i}: {'v' * 8000}" for i in range(100))
    spec = load_spec(
        TRAIN + "resources: {gpus: 64, gpu_memory_gb: 1024, memory_gb: 16384, cpus: 256}\n"
        f"tags: {{{tags}}}\n"
    )
    assert (spec.resources.gpu_memory_gb, len(spec.tags)) == (1024, 100)


@pytest.mark.parametrize(
    ("text", "loc", "words"),
    [
        (DEPLOY + "replicas: {min: 257}\n", "replicas.min", "256"),
        (DEPLOY + "replicas: {min: 1, max: 100000}\n", "replicas.max", "256"),
        (DEPLOY + "max_queue: 100001\n", "max_queue", "100000"),
        (DEPLOY + "resources: {gpu_memory_gb: 2000}\n", "resources.gpu_memory_gb", "1024"),
        (DEPLOY + "resources: {cpus: 1000}\n", "resources.cpus", "256"),
        (DEPLOY + "slo: {p99_ms: 1e9}\n", "slo.p99_ms", "600000"),
        (DEPLOY + "autoscaling: {downscale_delay_s: 1e9}\n", "autoscaling.downscale_delay_s", ""),
        (DEPLOY + "tags: {" + ", ".join(f"t{i}: v" for i in range(101)) + "}\n", "tags", "100"),
    ],
)
def test_deployment_caps(text: str, loc: str, words: str) -> None:
    found = errors(text, load_deployment)
    assert any(where == loc and words in msg for where, msg in found), found


def test_cluster_config_refuses_non_finite_numbers() -> None:
    text = "nodes:\n  - {name: a, cpus: 1, memory_gb: .inf}\n"
    with pytest.raises(ClusterConfigError, match="memory_gb: Input should be a finite number"):
        parse_cluster_config(text)


@pytest.mark.parametrize(
    ("bind", "extra", "served"),
    [
        ("127.0.0.1", (), {"127.0.0.1", "localhost", "::1"}),
        ("localhost", ("jw.internal",), {"127.0.0.1", "localhost", "::1", "jw.internal"}),
        ("::1", (), {"127.0.0.1", "localhost", "::1"}),
        ("10.0.0.5", (), {"10.0.0.5"}),
        ("10.0.0.5", ("JW.Example", " "), {"10.0.0.5", "jw.example"}),
        ("0.0.0.0", ("jw.example",), {"jw.example"}),
        ("0.0.0.0", (), None),
    ],
)
def test_served_host_names(bind: str, extra: tuple[str, ...], served: set[str] | None) -> None:
    assert allowed_hosts(bind, extra) == (frozenset(served) if served is not None else None)


@pytest.mark.parametrize(
    ("header", "name"),
    [
        (b"127.0.0.1:8000", "127.0.0.1"),
        (b"LocalHost", "localhost"),
        (b"[::1]:8000", "::1"),
        (b"[::1]", "::1"),
        (b"evil.example:80", "evil.example"),
        (None, ""),
    ],
)
def test_host_header_name(header: bytes | None, name: str) -> None:
    assert _host_name(header) == name


def test_predict_routes_get_the_body_limit_and_others_the_config_limit() -> None:
    limits = BodyLimits()
    assert limits.for_path("/v1/models/m/predict") == 8 * MIB
    assert limits.for_path("/jobs") == limits.for_path("/deployments") == MIB
    assert BodyLimits(max_body_bytes=100, max_config_bytes=1000).for_path("/jobs") == 100


def test_too_many_rows_are_refused_once_whatever_the_load() -> None:
    """413 before admission: even with no replica (which would be a 503), and no
    Retry-After, since no later try of the same request can succeed."""

    async def ask(rows: int) -> PredictError:
        router = Router(ServingMetrics())
        router.bind(asyncio.get_running_loop())
        router.configure(
            RouteConfig("m", max_batch_size=8, max_wait_ms=0, slo_p99_ms=100, max_queue=4)
        )
        await asyncio.sleep(0)  # the configure call runs on the loop
        with pytest.raises(PredictError) as info:
            await router.predict("m", np.zeros((rows, 2), np.float32))
        return info.value

    too_many = asyncio.run(ask(8 * MAX_ROWS_FACTOR + 1))
    assert (too_many.status, too_many.retry_after_s) == (413, None)
    assert f"at most {8 * MAX_ROWS_FACTOR} per request" in str(too_many)
    assert asyncio.run(ask(8 * MAX_ROWS_FACTOR)).status == 503  # admitted, no replica
