"""What each console page shows, assembled from the control plane's own views.

Pure functions of their inputs (the clock is an argument): the routes fetch the
sources, these turn them into the values the templates lay out. GPU shares come
from :func:`scheduler.api.views.cluster_table`, the one place that computes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.batch.store import JobRecord
from scheduler.core.states import JobState
from scheduler.realtime.metrics import ModelSummary
from scheduler.realtime.store import DeploymentRecord
from workers.interface.errors import ConfigError

JOBS_SHOWN = 200  # the jobs page's rows; filters narrow the rest
SPARK_WIDTH = 240
SPARK_HEIGHT = 40


@dataclass(frozen=True)
class ConsoleSources:
    """What the console needs beyond the API's views: each team's GPU quota (the queue
    config's) and a run's loss history (cached by its reader; None: no sparklines)."""

    quotas: Mapping[str, int] = field(default_factory=dict)
    loss_history: Callable[[str], Sequence[float]] | None = None


@dataclass(frozen=True)
class Share:
    holder: str  # "job:ID", "replica:DEPLOYMENT" or "outside"
    label: str
    memory_bytes: int
    width_pct: float


@dataclass(frozen=True)
class GpuView:
    index: int
    uuid: str
    name: str | None
    available: bool
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    util_pct: float | None
    temperature_c: float | None
    shares: tuple[Share, ...]


@dataclass(frozen=True)
class NodeView:
    hostname: str
    backend: str
    gpus: tuple[GpuView, ...]


def gpu_map(cluster: Mapping[str, Any]) -> list[NodeView]:
    """Nodes by GPUs from ``GET /cluster``'s table, each GPU's holders as bar segments."""
    out = []
    for node in cluster.get("nodes", ()):
        gpus = []
        for gpu in node["gpus"]:
            total = gpu["memory_total_bytes"]
            shares = tuple(
                Share(
                    holder=_holder(h),
                    label=_holder(h),
                    memory_bytes=h["memory_bytes"] or 0,
                    width_pct=round(100 * (h["memory_bytes"] or 0) / total, 2) if total else 0.0,
                )
                for h in gpu.get("holders", ())
            )
            gpus.append(
                GpuView(
                    index=gpu["index"],
                    uuid=gpu["uuid"],
                    name=gpu["name"],
                    available=gpu["available"],
                    memory_total_bytes=total,
                    memory_used_bytes=gpu["memory_used_bytes"],
                    util_pct=gpu["util_pct"],
                    temperature_c=gpu["temperature_c"],
                    shares=shares,
                )
            )
        out.append(NodeView(node["hostname"], node["backend"], tuple(gpus)))
    return sorted(out, key=lambda n: n.hostname)


def _holder(h: Mapping[str, Any]) -> str:
    return "outside" if h["kind"] == "outside" else f"{h['kind']}:{h['id']}"


@dataclass(frozen=True)
class QueueRow:
    position: int
    job_id: str
    name: str
    team: str
    priority: int
    waiting_s: float
    reasons: tuple[str, ...]
    predicted_start_at: float | None


def queue_rows(entries: Iterable[Mapping[str, Any]], now: float) -> list[QueueRow]:
    """``GET /queue``'s entries (scheduler order) with how long each has waited."""
    return [
        QueueRow(
            position=i,
            job_id=e["job_id"],
            name=e["name"],
            team=e["team"],
            priority=e["priority"],
            waiting_s=max(0.0, now - e["submitted_at"]),
            reasons=tuple(e["reasons"]),
            predicted_start_at=e.get("predicted_start_at"),
        )
        for i, e in enumerate(entries, start=1)
    ]


@dataclass(frozen=True)
class QuotaRow:
    team: str
    quota_gpus: int | None  # None: no quotas are configured (nobody borrows)
    used_gpus: int
    lent_gpus: int  # of its quota, idle and used by teams over theirs
    borrowed_gpus: int  # used beyond its quota


def quota_rows(quotas: Mapping[str, int], active: Iterable[JobRecord]) -> list[QuotaRow]:
    """Per team (with a quota or GPUs in use): GPUs used, lent and borrowed. What teams
    over quota borrow is lent by the teams under theirs, in team-name order. With no
    quotas at all nobody borrows (the queue policy's rule): each team's GPUs in use only."""
    used: dict[str, int] = {}
    for job in active:
        if job.assignment is not None:
            used[job.team] = used.get(job.team, 0) + job.assignment.gpus
    teams = sorted(set(quotas) | set(used))
    if not quotas:
        return [QuotaRow(team, None, used[team], 0, 0) for team in teams]
    borrowed = {t: max(0, used.get(t, 0) - quotas.get(t, 0)) for t in teams}
    to_lend = sum(borrowed.values())
    rows = []
    for team in teams:
        idle = max(0, quotas.get(team, 0) - used.get(team, 0))
        lent = min(idle, to_lend)
        to_lend -= lent
        rows.append(QuotaRow(team, quotas.get(team, 0), used.get(team, 0), lent, borrowed[team]))
    return rows


@dataclass(frozen=True)
class JobFilter:
    state: JobState | None = None
    team: str | None = None
    q: str | None = None  # in the id or the name

    @classmethod
    def from_query(cls, state: str, team: str, q: str) -> JobFilter:
        """The filter of the jobs page's form (an empty field: any); :class:`ConfigError`
        for a state that does not exist."""
        try:
            chosen = JobState(state) if state else None
        except ValueError:
            known = ", ".join(s.value for s in JobState)
            raise ConfigError([("state", f"no state {state!r}: one of {known}")]) from None
        return cls(chosen, team or None, q or None)

    def keeps(self, job: JobRecord) -> bool:
        text = (self.q or "").lower()
        return (self.team is None or job.team == self.team) and (
            not text or text in job.id.lower() or text in job.name.lower()
        )


@dataclass(frozen=True)
class JobsPage:
    jobs: list[JobRecord]
    matching: int  # jobs matching the filter, of which ``jobs`` shows the newest
    teams: list[str]


def jobs_page(jobs: Sequence[JobRecord], chosen: JobFilter, shown: int = JOBS_SHOWN) -> JobsPage:
    """The newest jobs that match (``jobs`` already narrowed to the state asked for)."""
    matching = [j for j in jobs if chosen.keeps(j)]
    matching.sort(key=lambda j: j.submitted_at, reverse=True)
    return JobsPage(matching[:shown], len(matching), sorted({j.team for j in jobs}))


def sparkline(values: Sequence[float]) -> str:
    """An inline-SVG polyline's ``points`` for ``values`` (empty under two values)."""
    if len(values) < 2:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    step = SPARK_WIDTH / (len(values) - 1)
    return " ".join(
        f"{i * step:.1f},{SPARK_HEIGHT - (v - low) / span * SPARK_HEIGHT:.1f}"
        for i, v in enumerate(values)
    )


@dataclass(frozen=True)
class DeploymentRow:
    record: DeploymentRecord
    replicas: list[dict[str, Any]]
    traffic: ModelSummary
    slo_p99_ms: float
    over_slo: bool
    rolling_out: bool  # replicas of two versions, or some retiring
    model_url: str | None


def deployment_row(
    record: DeploymentRecord,
    replicas: list[dict[str, Any]],
    traffic: ModelSummary,
    mlflow_ui_url: str | None,
) -> DeploymentRow:
    versions = {r["model_version"] for r in replicas}
    slo = record.spec.slo.p99_ms
    return DeploymentRow(
        record=record,
        replicas=replicas,
        traffic=traffic,
        slo_p99_ms=slo,
        over_slo=traffic.p99_ms is not None and traffic.p99_ms > slo,
        rolling_out=len(versions) > 1 or any(r["retiring"] for r in replicas),
        model_url=model_version_url(mlflow_ui_url, record),
    )


def model_version_url(ui_url: str | None, record: DeploymentRecord) -> str | None:
    """The MLflow UI page of the registered model version the deployment serves."""
    uri = record.spec.model
    if not (ui_url and record.model_version and uri.startswith("models:/")):
        return None
    name = uri.removeprefix("models:/").split("@", 1)[0].split("/", 1)[0]
    return f"{ui_url.rstrip('/')}/#/models/{name}/versions/{record.model_version}"
