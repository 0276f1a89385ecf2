"""Who may do what: pure rules over an identity (a verified token's team and role).

No I/O: the services call these with the records they read, and the API maps
:class:`Forbidden` to 403. The rules, in short:

- ``admin`` may do anything, for any team;
- ``member`` may submit, cancel, deploy, update and undeploy its own team's work, and
  predict with its own team's deployments;
- ``viewer`` may read and predict with its own team's deployments, never mutate;
- any valid token may read (list and get jobs, deployments, the queue, the cluster, logs).

Example::

    caller = Identity(token_id="a1b2", name="ci", team="vision", role=Role.MEMBER)
    check_owner(caller, job.team, f"job {job.id}", "cancel")  # Forbidden for another team
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from workers.interface.errors import JobworkerError


class Role(StrEnum):
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


@dataclass(frozen=True)
class Identity:
    """A verified caller: its token's id and name, its team and its role."""

    token_id: str
    name: str
    team: str
    role: Role

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN


class Forbidden(JobworkerError):
    """The caller is known but may not do this (HTTP 403); the message says why."""


def check_admin(caller: Identity, action: str) -> None:
    """Only an admin may ``action`` (manage tokens, read the whole audit trail)."""
    if not caller.admin:
        raise Forbidden(f"only an admin may {action}; this token's role is {caller.role}")


def check_can_mutate(caller: Identity, action: str) -> None:
    """A viewer reads; it never changes anything."""
    if caller.role is Role.VIEWER:
        raise Forbidden(f"a viewer may not {action}; ask for a member token of {caller.team!r}")


def check_owner(caller: Identity, owner_team: str | None, target: str, action: str) -> None:
    """``caller`` may ``action`` ``target`` of ``owner_team``: an admin, or a member of it."""
    check_can_mutate(caller, f"{action} {target}")
    if not caller.admin and owner_team != caller.team:
        raise Forbidden(
            f"{target} belongs to team {owner_team!r}; this token is of team {caller.team!r}"
        )


def acting_team(caller: Identity, requested: str | None, field_name: str = "team") -> str:
    """The team a new job or deployment runs for: the token's, or for an admin any it names.

    A member naming another team is refused, naming the field.
    """
    if requested is None or requested == caller.team:
        return caller.team
    if caller.admin:
        return requested
    raise Forbidden(
        f"{field_name}: {requested!r} is not this token's team ({caller.team!r}); "
        "leave it out or ask an admin"
    )


def check_predict(caller: Identity, owner_team: str | None, deployment: str) -> None:
    """Predict needs a token of the deployment's team (any role) or an admin's."""
    if not caller.admin and owner_team != caller.team:
        raise Forbidden(
            f"deployment {deployment!r} belongs to team {owner_team!r}; "
            f"this token is of team {caller.team!r}"
        )


@dataclass(frozen=True)
class PriorityCaps:
    """The highest job priority each team may ask for (``priority_caps`` in the queue
    config); admins are exempt, as they set the caps."""

    default: int = 50
    teams: Mapping[str, int] = field(default_factory=dict)

    def cap(self, team: str) -> int:
        return self.teams.get(team, self.default)


def check_priority(caller: Identity, team: str, priority: int, caps: PriorityCaps) -> str | None:
    """The problem with ``priority`` for ``team`` (to report as a 422 on ``priority``), or None."""
    cap = caps.cap(team)
    if caller.admin or priority <= cap:
        return None
    return (
        f"team {team!r} may ask for a priority of at most {cap} "
        f"(priority_caps in the queue config); got {priority}"
    )


def audit_team(caller: Identity, requested: str | None) -> str | None:
    """Whose audit trail ``caller`` reads: an admin any team's (None: all), anyone else
    only its own team's."""
    if caller.admin:
        return requested
    if requested not in (None, caller.team):
        raise Forbidden(f"only an admin may read team {requested!r}'s audit trail")
    return caller.team


def check_model_name(caller: Identity, owner_team: str | None, team: str, name: str) -> None:
    """A model name belongs to the team that first used it; only that team (or an admin)
    may register versions under it, move its aliases or follow it. Unclaimed is free."""
    if owner_team is None or owner_team == team or caller.admin:
        return
    raise Forbidden(f"model name {name!r} belongs to team {owner_team!r}, not {team!r}")
