"""The replica autoscaling policy of the real-time lane: a pure function.

``decide(config, sample, state, now) -> (desired, state)`` takes the load seen on one
deployment, the policy's memory from the previous call and the clock, and returns how
many replicas the deployment should have plus the memory to pass in next time. It reads
no clock and does no I/O, so the caller may persist the state (and survive a controller
restart) and tests drive it with any timeline.

The rules, with ``load = (queue_depth + in_flight) / replicas`` (requests per replica):

- **Over** when ``load > target_queue_per_replica`` or ``p99_ms > slo_p99_ms``. Once over
  has held for ``upscale_delay_s``, scale up in one step to
  ``ceil(replicas * max(load / target, p99 / slo))``, at least one more than the
  replicas present, and restart the over timer.
- **Under** when ``load < 0.5 * target`` and the p99 is unknown (no traffic) or below
  ``0.5 * slo``. Once under has held for ``downscale_delay_s``, scale down by one and
  restart the under timer, so the pool shrinks one step per delay.
- **Otherwise hold**, and clear both timers: the band between under and over is the
  hysteresis that keeps the count from flapping.
- The answer is always within ``[min_replicas, max_replicas]``. The first call
  (``state`` is ``None``) starts from the replicas present, clamped: ``min_replicas``
  when there are none.
- A clock that runs backwards (a restart with a fresh monotonic clock) restarts the
  timers rather than leaving them stuck in the future.

``replicas`` counts ready and starting replicas, so capacity already on its way is not
ordered twice; a replica that starts slower than ``upscale_delay_s`` can still cause
one early step, which the downscale rule later takes back.

Example::

    config = AutoscaleConfig(1, 4, target_queue_per_replica=8, slo_p99_ms=50,
                             upscale_delay_s=2, downscale_delay_s=30)
    busy = LoadSample(replicas=1, queue_depth=20, in_flight=4, p99_ms=40)
    desired, state = decide(config, busy, None, now=0.0)  # 1: over, but not for 2 s yet
    desired, state = decide(config, busy, state, now=2.0)  # 3 = ceil(24 / 8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler.realtime.spec import DeploymentSpec

# Float slack so that e.g. 24 requests / 8 per replica is 3 replicas, not 4.
_EPSILON = 1e-9


@dataclass(frozen=True)
class AutoscaleConfig:
    """The knobs of one deployment's autoscaling (see the module docstring).

    Example::

        AutoscaleConfig.from_spec(load_deployment(text))
    """

    min_replicas: int
    max_replicas: int
    target_queue_per_replica: float
    slo_p99_ms: float
    upscale_delay_s: float
    downscale_delay_s: float

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas} and "
                f"{self.max_replicas}"
            )
        for field, value in (
            ("target_queue_per_replica", self.target_queue_per_replica),
            ("slo_p99_ms", self.slo_p99_ms),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{field} must be a finite number above 0, got {value}")
        for field, value in (
            ("upscale_delay_s", self.upscale_delay_s),
            ("downscale_delay_s", self.downscale_delay_s),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{field} must be a finite number of at least 0, got {value}")

    @classmethod
    def from_spec(cls, spec: DeploymentSpec) -> AutoscaleConfig:
        """The autoscaling part of a deployment config."""
        return cls(
            min_replicas=spec.replicas.min,
            max_replicas=spec.replicas.max,
            target_queue_per_replica=spec.autoscaling.target_queue_per_replica,
            slo_p99_ms=spec.slo.p99_ms,
            upscale_delay_s=spec.autoscaling.upscale_delay_s,
            downscale_delay_s=spec.autoscaling.downscale_delay_s,
        )

    def clamp(self, replicas: int) -> int:
        """``replicas`` brought within ``[min_replicas, max_replicas]``."""
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(frozen=True)
class LoadSample:
    """What one deployment looks like now.

    ``replicas``: ready or starting; ``queue_depth``: requests waiting for a replica;
    ``in_flight``: requests on replicas; ``p99_ms``: latency over the recent window,
    ``None`` when there was no traffic in it.
    """

    replicas: int
    queue_depth: int
    in_flight: int
    p99_ms: float | None = None

    def __post_init__(self) -> None:
        if min(self.replicas, self.queue_depth, self.in_flight) < 0:
            raise ValueError(f"replica and request counts cannot be negative: {self}")
        if self.p99_ms is not None and not (math.isfinite(self.p99_ms) and self.p99_ms >= 0):
            raise ValueError(f"p99_ms must be None or a finite number >= 0, got {self.p99_ms}")


@dataclass(frozen=True)
class AutoscaleState:
    """The policy's memory between calls: the last answer and since when (on the caller's
    clock) the deployment has been continuously over or under its targets."""

    desired: int
    over_since: float | None = None
    under_since: float | None = None


def decide(
    config: AutoscaleConfig, sample: LoadSample, state: AutoscaleState | None, now: float
) -> tuple[int, AutoscaleState]:
    """The desired replica count and the state to pass to the next call.

    ``now`` is any clock in seconds (monotonic is best) and must stay the same clock
    across calls; the returned ``state.desired`` equals the returned count.
    """
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite number of seconds, got {now}")
    desired = config.clamp(sample.replicas if state is None else state.desired)
    over_since = None if state is None else state.over_since
    under_since = None if state is None else state.under_since

    if _over(config, sample):
        since = _started(over_since, now)
        if now - since >= config.upscale_delay_s:
            target = config.clamp(max(_proportional(config, sample), sample.replicas + 1))
            if target > desired:
                return target, AutoscaleState(target, over_since=now)
        return desired, AutoscaleState(desired, over_since=since)

    if _under(config, sample):
        since = _started(under_since, now)
        if now - since >= config.downscale_delay_s and desired > config.min_replicas:
            return desired - 1, AutoscaleState(desired - 1, under_since=now)
        return desired, AutoscaleState(desired, under_since=since)

    return desired, AutoscaleState(desired)


def _load_per_replica(sample: LoadSample) -> float:
    requests = sample.queue_depth + sample.in_flight
    if sample.replicas == 0:
        return math.inf if requests else 0.0
    return requests / sample.replicas


def _over(config: AutoscaleConfig, sample: LoadSample) -> bool:
    slow = sample.p99_ms is not None and sample.p99_ms > config.slo_p99_ms
    return slow or _load_per_replica(sample) > config.target_queue_per_replica


def _under(config: AutoscaleConfig, sample: LoadSample) -> bool:
    fast = sample.p99_ms is None or sample.p99_ms < 0.5 * config.slo_p99_ms
    return fast and _load_per_replica(sample) < 0.5 * config.target_queue_per_replica


def _proportional(config: AutoscaleConfig, sample: LoadSample) -> int:
    """Replicas that would bring both load and p99 back to target, capped at the maximum
    (also keeps ``ceil`` away from huge floats)."""
    # replicas * (requests / replicas) / target, without the round trip through a division.
    by_load = (sample.queue_depth + sample.in_flight) / config.target_queue_per_replica
    by_latency = 0.0
    if sample.p99_ms is not None:
        by_latency = max(sample.replicas, 1) * sample.p99_ms / config.slo_p99_ms
    wanted = min(max(by_load, by_latency), float(config.max_replicas))
    return math.ceil(wanted - _EPSILON)


def _started(since: float | None, now: float) -> float:
    """When a condition that holds now began: ``since``, unless it is unset or ahead."""
    return now if since is None or since > now else since
