"""``GET /metrics`` over real HTTP: the batch lane's metrics beside the serving ones, as
jobs go through the real loop; and the Grafana dashboard asks only for what it serves."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from scheduler.core.states import JobState
from tests.conftest import REPO, wait_until
from tests.integration.conftest import Api, entrypoint_yaml

DASHBOARD = REPO / "configs" / "grafana" / "jobworker.json"


def scrape(api: Api) -> list[Sample]:
    response = api.http.get("/metrics")
    assert response.status_code == 200, response.text
    return [s for f in text_string_to_metric_families(response.text) for s in f.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the one sample ``name`` whose labels include ``labels``; None: none."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{name} {labels}: {found}"
    return found[0] if found else None


def submit(api: Api, text: str) -> str:
    response = api.http.post("/jobs", content=text, headers={"content-type": "application/yaml"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_metrics_follow_jobs_through_the_loop(api: Api) -> None:
    held = submit(api, entrypoint_yaml("metrics-hold", "run_until_stopped", gpus=1))
    job = api.wait_for(held, {JobState.RUNNING})
    team = job.team
    gpu_type = api.http.get("/cluster").json()["nodes"][0]["gpus"][0]["name"]

    running = scrape(api)
    assert value(running, "jobworker_jobs", state="RUNNING", team=team) == 1
    local = {"node": "local", "gpu_type": gpu_type}
    assert value(running, "jobworker_gpus", **local, status="allocated") == 1
    assert value(running, "jobworker_gpus", **local, status="free") == 1
    assert value(running, "jobworker_queue_wait_seconds_count", team=team) == 1
    assert value(running, "jobworker_dispatch_latency_seconds_count", team=team) == 1
    assert (value(running, "jobworker_placement_pass_seconds_count") or 0) >= 1

    failing = submit(api, entrypoint_yaml("metrics-boom", "explode") + "max_retries: 1\n")
    assert api.wait_for(failing, {JobState.FAILED}).failures == 2
    api.http.post(f"/jobs/{held}/cancel").raise_for_status()
    api.wait_for(held, {JobState.CANCELLED})

    def settled() -> list[Sample] | None:
        samples = scrape(api)
        free = value(samples, "jobworker_gpus", **local, status="free")
        return samples if free == 2 else None

    done = wait_until(settled, "both GPUs free again in /metrics")
    assert value(done, "jobworker_jobs", state="RUNNING", team=team) is None
    assert value(done, "jobworker_jobs", state="CANCELLED", team=team) == 1
    assert value(done, "jobworker_jobs", state="FAILED", team=team) == 1
    assert value(done, "jobworker_retries_total", team=team, cause="failed") == 1
    # Three starts: the held job, and the failing one twice (its retry waits anew).
    assert sum(s.value for s in done if s.name == "jobworker_queue_wait_seconds_count") == 3


# PromQL words that are not metric names: functions, aggregations, keywords, durations.
_PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "topk", "bottomk", "clamp_min", "delta", "vector", "scalar", "abs",
    "le", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers that are not functions,
    keywords, label names (inside ``{}``/``by ()``) or Grafana variables (``$__rate_interval``)."""
    bare = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)  # grouping labels
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # range selectors
    bare = re.sub(r'"[^"]*"', "", bare)  # strings
    words = set(re.findall(r"(?<![\w$.])[a-zA-Z_:][\w:]*", bare))
    return {w for w in words if w.lower() not in _PROMQL_WORDS}


def exported(samples_text: str) -> set[str]:
    """Every series name a ``/metrics`` text may hold, per family and type."""
    names: set[str] = set()
    for family in text_string_to_metric_families(samples_text):
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
    return names


def targets(panels: list[dict[str, object]]) -> Iterator[tuple[str, str]]:
    for panel in panels:
        for target in panel.get("targets", []):  # type: ignore[attr-defined]
            yield str(panel["title"]), target["expr"]
        yield from targets(panel.get("panels", []))  # type: ignore[arg-type]


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, model) "
        '(rate(jobworker_request_latency_seconds_bucket{model=~"$model"}[$__rate_interval])))'
        " / on (model) group_left count(jobworker_replicas)"
    )
    assert metric_names(expr) == {"jobworker_request_latency_seconds_bucket", "jobworker_replicas"}


def test_grafana_dashboard_asks_only_for_exported_metrics(api: Api) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    names = exported(api.http.get("/metrics").text)
    asked = list(targets(dashboard["panels"]))
    assert len(asked) >= 10
    for title, expr in asked:
        wanted = metric_names(expr)
        assert wanted, f"{title}: no metric in {expr!r}"
        assert wanted <= names, f"{title}: {sorted(wanted - names)} not served by /metrics"
