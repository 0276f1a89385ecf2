"""The SLO guard: when to throttle training co-located with a deployment missing its p99.

Pure: the measured latencies, where replicas and training jobs run, the guard's
state and the time go in; the throttles and releases to carry out and the new
state come out (``scheduler/realtime/guard.py`` measures, acts and records).

A deployment turns *hot* once its p99 has stayed above ``throttle_at`` x its
``slo.p99_ms`` for ``dwell_s``, and cools once its p99 has stayed below
``release_at`` x the SLO (or it had no traffic) for ``dwell_s``: two thresholds
and a dwell, so that one slow request neither throttles nor releases anything.
While a deployment is hot, every training job with a rank on a node that hosts
one of its replicas is throttled (a GPU shared with a replica is on such a node,
and a node's CPUs are what training takes from a replica: the node is the unit).
A job is released when no hot deployment shares a node with it any more, or
once it has been throttled for ``max_throttle_s``: then it runs at least
``rest_s`` before it can be throttled again, so that training is slowed but
never starved. Preemption stays the last resort and is not the guard's to do.

Example::

    decision, state = guard(deployments, jobs, GuardState(), GuardSettings(), now=12.0)
    for t in decision.throttle: executor.throttle(t.job_id, True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GuardSettings:
    """Thresholds as fractions of a deployment's ``slo.p99_ms``; times in seconds."""

    throttle_at: float = 0.8
    release_at: float = 0.5
    dwell_s: float = 2.0
    max_throttle_s: float = 300.0
    rest_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.release_at <= self.throttle_at:
            raise ValueError(
                f"release_at ({self.release_at}) must be above 0 and at most "
                f"throttle_at ({self.throttle_at})"
            )
        if self.dwell_s < 0 or self.max_throttle_s <= 0 or self.rest_s < 0:
            raise ValueError("dwell_s and rest_s must be >= 0, max_throttle_s > 0")


@dataclass(frozen=True, slots=True)
class DeploymentLatency:
    """A deployment's recent p99 (None: no traffic lately), its SLO and its replicas' nodes."""

    name: str
    team: str
    p99_ms: float | None
    slo_p99_ms: float
    nodes: frozenset[str]


@dataclass(frozen=True, slots=True)
class TrainingJob:
    """A running training job and the nodes its ranks run on."""

    job_id: str
    team: str
    nodes: frozenset[str]


@dataclass(frozen=True, slots=True)
class Throttle:
    """Throttle ``job_id``: ``deployment``'s p99 (``p99_ms``) is over its threshold."""

    job_id: str
    deployment: str
    since: float
    p99_ms: float
    slo_p99_ms: float


@dataclass(frozen=True, slots=True)
class Release:
    """Release ``job_id``, throttled for ``throttled_s``; ``expired``: it hit max_throttle_s."""

    job_id: str
    deployment: str
    throttled_s: float
    expired: bool


@dataclass(frozen=True, slots=True)
class GuardDecision:
    throttle: tuple[Throttle, ...] = ()
    release: tuple[Release, ...] = ()


@dataclass(frozen=True, slots=True)
class GuardState:
    """What the guard remembers between passes (empty after a restart: nothing is lost
    but a dwell, since a node releases a throttle by itself after ``max_throttle_s``)."""

    over_since: Mapping[str, float] = field(default_factory=dict)  # deployment: p99 high since
    under_since: Mapping[str, float] = field(default_factory=dict)  # hot deployment: low since
    hot: frozenset[str] = frozenset()
    throttled: Mapping[str, Throttle] = field(default_factory=dict)  # by job id
    resting_until: Mapping[str, float] = field(default_factory=dict)  # by job id


def _heat(
    dep: DeploymentLatency, state: GuardState, settings: GuardSettings, now: float
) -> tuple[bool, float | None, float | None]:
    """(hot, over_since, under_since) of one deployment after this pass."""
    p99 = dep.p99_ms
    if dep.name in state.hot:
        if p99 is None or p99 < settings.release_at * dep.slo_p99_ms:
            since = state.under_since.get(dep.name, now)
            return now - since < settings.dwell_s, None, since
        return True, None, None
    if p99 is not None and p99 > settings.throttle_at * dep.slo_p99_ms:
        since = state.over_since.get(dep.name, now)
        return now - since >= settings.dwell_s, since, None
    return False, None, None


def guard(
    deployments: Sequence[DeploymentLatency],
    jobs: Sequence[TrainingJob],
    state: GuardState,
    settings: GuardSettings,
    now: float,
) -> tuple[GuardDecision, GuardState]:
    """One pass of the guard (see the module); jobs no longer running are forgotten."""
    hot: set[str] = set()
    over: dict[str, float] = {}
    under: dict[str, float] = {}
    for dep in deployments:
        is_hot, over_since, under_since = _heat(dep, state, settings, now)
        if is_hot:
            hot.add(dep.name)
        if over_since is not None and not is_hot:
            over[dep.name] = over_since
        if under_since is not None and is_hot:
            under[dep.name] = under_since
    culprit: dict[str, DeploymentLatency] = {}  # node: the hot deployment that claims it
    for dep in sorted(deployments, key=lambda d: d.name):
        if dep.name in hot:
            for node in dep.nodes:
                culprit.setdefault(node, dep)
    running = {job.job_id: job for job in jobs}
    resting = {j: t for j, t in state.resting_until.items() if t > now and j in running}
    throttled: dict[str, Throttle] = {}
    releases: list[Release] = []
    for job_id, t in state.throttled.items():
        job = running.get(job_id)
        if job is None:
            continue
        if now - t.since >= settings.max_throttle_s:
            releases.append(Release(job_id, t.deployment, now - t.since, expired=True))
            resting[job_id] = now + settings.rest_s
        elif not any(node in culprit for node in job.nodes):
            releases.append(Release(job_id, t.deployment, now - t.since, expired=False))
        else:
            throttled[job_id] = t
    throttles: list[Throttle] = []
    for job in jobs:
        if job.job_id in throttled or job.job_id in resting:
            continue
        hot_dep = next((culprit[n] for n in sorted(job.nodes) if n in culprit), None)
        if hot_dep is not None and hot_dep.p99_ms is not None:
            t = Throttle(job.job_id, hot_dep.name, now, hot_dep.p99_ms, hot_dep.slo_p99_ms)
            throttles.append(t)
            throttled[job.job_id] = t
    new_state = GuardState(over, under, frozenset(hot), throttled, resting)
    return GuardDecision(tuple(throttles), tuple(releases)), new_state
