"""The state machines of jobs and deployments: their tables of allowed moves, and the checks.

Every job state change goes through :func:`check_transition` (called by the
job store's ``transition``) and every deployment state change through
:func:`check_deployment_transition` (the deployment store's), so an illegal
move raises instead of corrupting a record.
"""

from __future__ import annotations

from enum import StrEnum

from workers.interface.errors import IllegalTransition


class JobState(StrEnum):
    PENDING = "PENDING"
    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PREEMPTED = "PREEMPTED"


TERMINAL: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.SCHEDULED, JobState.CANCELLED, JobState.FAILED}),
    # SCHEDULED -> PENDING: the launch failed for infrastructure reasons and is retried.
    JobState.SCHEDULED: frozenset(
        {
            JobState.RUNNING,
            JobState.PENDING,
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLED,
        }
    ),
    JobState.RUNNING: frozenset(
        {
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.PREEMPTED,
            JobState.PENDING,
        }
    ),
    JobState.PREEMPTED: frozenset({JobState.PENDING, JobState.CANCELLED, JobState.FAILED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def check_transition(current: JobState, target: JobState) -> None:
    """Raise :class:`IllegalTransition` unless ``current -> target`` is allowed."""
    if target not in ALLOWED[current]:
        allowed = ", ".join(sorted(ALLOWED[current])) or "none (terminal)"
        raise IllegalTransition(f"{current} -> {target} is not allowed (from {current}: {allowed})")


class DeploymentState(StrEnum):
    DEPLOYING = "DEPLOYING"  # no replica serving yet
    READY = "READY"  # every replica serving the target model version
    UPDATING = "UPDATING"  # rolling onto a new model version or spec
    FAILED = "FAILED"  # the model cannot be resolved or loaded; see the message


# The controller reports what it observes, so every state can follow every other one;
# what the table rules out is staying put (a message change is not a transition) and a
# state it does not know.
DEPLOYMENT_ALLOWED: dict[DeploymentState, frozenset[DeploymentState]] = {
    # Replicas serve (READY); the model cannot be resolved or a replica cannot start
    # (FAILED); the alias moved while old replicas were coming up (UPDATING).
    DeploymentState.DEPLOYING: frozenset(
        {DeploymentState.READY, DeploymentState.FAILED, DeploymentState.UPDATING}
    ),
    # A new version or spec rolls (UPDATING); every replica died (DEPLOYING while they
    # restart, FAILED when an earlier start failure is still unresolved).
    DeploymentState.READY: frozenset(
        {DeploymentState.UPDATING, DeploymentState.DEPLOYING, DeploymentState.FAILED}
    ),
    DeploymentState.UPDATING: frozenset(
        {DeploymentState.READY, DeploymentState.DEPLOYING, DeploymentState.FAILED}
    ),
    # A retry after backoff, or a redeploy (DEPLOYING), and its replicas serving.
    DeploymentState.FAILED: frozenset(
        {DeploymentState.DEPLOYING, DeploymentState.READY, DeploymentState.UPDATING}
    ),
}


def check_deployment_transition(current: DeploymentState, target: DeploymentState) -> None:
    """Raise :class:`IllegalTransition` unless ``current -> target`` is allowed."""
    if target not in DEPLOYMENT_ALLOWED[current]:
        allowed = ", ".join(sorted(DEPLOYMENT_ALLOWED[current]))
        raise IllegalTransition(
            f"deployment {current} -> {target} is not allowed (from {current}: {allowed})"
        )
