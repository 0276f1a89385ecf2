"""The pure rules of who may do what (scheduler.auth.identity), table-driven."""

from __future__ import annotations

import pytest

from scheduler.auth.identity import (
    Forbidden,
    Identity,
    PriorityCaps,
    Role,
    acting_team,
    audit_team,
    check_model_name,
    check_owner,
    check_predict,
    check_priority,
)

ADMIN = Identity("t0", "root", "ops", Role.ADMIN)
MEMBER = Identity("t1", "ci", "a", Role.MEMBER)
VIEWER = Identity("t2", "dash", "a", Role.VIEWER)


@pytest.mark.parametrize(
    ("caller", "owner", "allowed"),
    [
        (ADMIN, "b", True),
        (MEMBER, "a", True),
        (MEMBER, "b", False),
        (MEMBER, None, False),  # a deployment stored before teams: admins only
        (VIEWER, "a", False),
    ],
)
def test_only_owners_and_admins_mutate(caller: Identity, owner: str | None, allowed: bool) -> None:
    if allowed:
        check_owner(caller, owner, "job j-1", "cancel")
    else:
        with pytest.raises(Forbidden):
            check_owner(caller, owner, "job j-1", "cancel")


@pytest.mark.parametrize(
    ("caller", "requested", "team"),
    [(MEMBER, None, "a"), (MEMBER, "a", "a"), (ADMIN, None, "ops"), (ADMIN, "b", "b")],
)
def test_the_acting_team_is_the_token_s_unless_an_admin_names_one(
    caller: Identity, requested: str | None, team: str
) -> None:
    assert acting_team(caller, requested) == team


def test_a_member_naming_another_team_is_refused_naming_the_field() -> None:
    with pytest.raises(Forbidden, match=r"^team: 'b' is not this token's team \('a'\)"):
        acting_team(MEMBER, "b")


@pytest.mark.parametrize(
    ("caller", "owner", "allowed"),
    [(VIEWER, "a", True), (MEMBER, "b", False), (ADMIN, "b", True), (VIEWER, None, False)],
)
def test_predict_needs_the_deployment_team_or_an_admin(
    caller: Identity, owner: str | None, allowed: bool
) -> None:
    if allowed:
        check_predict(caller, owner, "dep")
    else:
        with pytest.raises(Forbidden, match="deployment 'dep' belongs to team"):
            check_predict(caller, owner, "dep")


@pytest.mark.parametrize(
    ("caller", "team", "priority", "problem"),
    [
        (MEMBER, "a", 20, None),
        (MEMBER, "a", 21, "at most 20"),
        (MEMBER, "b", 70, None),
        (MEMBER, "b", 71, "at most 70"),
        (ADMIN, "a", 100, None),
    ],
)
def test_priority_caps_per_team_with_a_default(
    caller: Identity, team: str, priority: int, problem: str | None
) -> None:
    found = check_priority(caller, team, priority, PriorityCaps(default=20, teams={"b": 70}))
    assert found is None if problem is None else problem in str(found)


@pytest.mark.parametrize(
    ("caller", "owner", "team", "allowed"),
    [
        (MEMBER, None, "a", True),  # unclaimed: free
        (MEMBER, "a", "a", True),
        (MEMBER, "b", "a", False),
        (ADMIN, "b", "a", True),  # an admin shares
    ],
)
def test_model_names_belong_to_their_team(
    caller: Identity, owner: str | None, team: str, allowed: bool
) -> None:
    if allowed:
        check_model_name(caller, owner, team, "m")
    else:
        with pytest.raises(Forbidden, match="model name 'm' belongs to team 'b', not 'a'"):
            check_model_name(caller, owner, team, "m")


def test_the_audit_trail_a_caller_may_read() -> None:
    assert audit_team(ADMIN, None) is None and audit_team(ADMIN, "b") == "b"
    assert audit_team(VIEWER, None) == "a" and audit_team(MEMBER, "a") == "a"
    with pytest.raises(Forbidden):
        audit_team(MEMBER, "b")
