"""The queue policy's config file (``jobworker up --queue-config configs/queue/x.yaml``).

Example::

    policy = load_queue_config(Path("configs/queue/teams.yaml"))
    caps = read_queue_config(Path("configs/queue/teams.yaml")).priority_limits()
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scheduler.auth.identity import PriorityCaps
from scheduler.core.model import Mode, QueuePolicy
from scheduler.sim.policies import POLICIES
from workers.interface.errors import ConfigError
from workers.interface.spec import parse_text, validation_errors

PREDICTIVE = POLICIES["predictive"].queue
DEFAULT_MODE: Mode = PREDICTIVE.mode
"""The live default: the simulator's ``predictive`` policy (``scheduler/sim/policies.py``),
never worse than ``las`` on the trace slices and close to the SRPT oracle once a
family's predictions have proved right; ``mode: fifo`` brings back priority, then arrival."""


class QueueConfig(BaseModel):
    """Queue rules; see ``scheduler/queue_policy.py`` for what each does."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # predictive: by predicted run time left where the job's family has earned trust, by
    # least attained service otherwise; las: least attained service, refined within each
    # service queue by predicted run time left; fifo: by priority, then submit time.
    mode: Mode = DEFAULT_MODE
    # The service queues (GPU-seconds) of las and predictive, and the buckets of predicted
    # GPU-seconds left of srpt and predictive.
    las_thresholds_gpu_s: tuple[float, ...] = PREDICTIVE.las_thresholds_gpu_s
    # predictive trusts a family's predictions when their median relative error was at most this.
    max_est_error: float = Field(default=PREDICTIVE.max_est_error, ge=0)
    backfill: bool = True
    preemption: bool = True
    quotas: dict[str, int] = Field(default_factory=dict)  # GPUs a team owns
    weights: dict[str, float] = Field(default_factory=dict)  # fair-share weight per team
    aging_s_per_priority: float | None = Field(default=3600.0, gt=0)
    min_run_s: float = Field(default=300.0, ge=0)
    # The highest job priority a team's members may ask for (admins are exempt).
    priority_caps: dict[str, int] = Field(default_factory=dict)
    default_priority_cap: int = Field(default=50, ge=-100, le=100)

    def priority_limits(self) -> PriorityCaps:
        return PriorityCaps(default=self.default_priority_cap, teams=dict(self.priority_caps))

    def policy(self) -> QueuePolicy:
        return QueuePolicy(
            mode=self.mode,
            backfill=self.backfill,
            preemption=self.preemption,
            quotas=dict(self.quotas),
            weights=dict(self.weights),
            aging_s_per_priority=self.aging_s_per_priority,
            min_run_s=self.min_run_s,
            las_thresholds_gpu_s=self.las_thresholds_gpu_s,
            max_est_error=self.max_est_error,
        )


def load_queue_config(path: Path) -> QueuePolicy:
    """The policy a queue config file describes; :class:`ConfigError` naming each bad field."""
    return read_queue_config(path).policy()


def read_queue_config(path: Path) -> QueueConfig:
    """The queue config file, checked; :class:`ConfigError` naming each bad field."""
    try:
        data = parse_text(path.read_text())
    except OSError as exc:
        raise ConfigError([("", f"cannot read {path}: {exc.strerror}")]) from exc
    try:
        config = QueueConfig.model_validate(data or {})
        config.policy()
        return config
    except ValidationError as exc:
        raise ConfigError(validation_errors(exc, QueueConfig)) from exc
    except ValueError as exc:  # QueuePolicy's own checks (weights > 0, quotas >= 0)
        raise ConfigError([("", str(exc))]) from exc
