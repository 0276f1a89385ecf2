"""The audit trail: every mutating request, accepted or refused, with who, team and result."""

from __future__ import annotations

from scheduler.auth.identity import Role
from scheduler.realtime.router import RouteConfig
from tests.security.conftest import SecureApi
from tests.security.test_tenancy import YAML, job_yaml, submit


def test_mutations_are_audited_with_their_result_and_reads_are_scoped(
    secure_api: SecureApi,
) -> None:
    a = secure_api.as_("a")
    b_viewer = secure_api.as_("b", Role.VIEWER)
    job = submit(a, job_yaml("audited")).json()
    assert b_viewer.post(f"/jobs/{job['id']}/cancel").status_code == 403
    assert secure_api.client(None).post("/jobs", content="name: x", headers=YAML).status_code == 401
    assert a.get("/jobs").status_code == 200  # a read: not audited
    secure_api.router.configure(RouteConfig("a-dep", 8, 1, 100, 16, team="a"))
    a.post("/v1/models/a-dep/predict", json={"inputs": [[0.0]]})  # predict: not audited

    events = secure_api.admin.get("/audit").json()
    assert [(e["method"], e["path"], e["status"]) for e in events] == [
        ("POST", "/jobs", 401),
        ("POST", f"/jobs/{job['id']}/cancel", 403),
        ("POST", "/jobs", 201),
    ]
    anonymous, refused, accepted = events
    assert anonymous["token_id"] is None and anonymous["team"] is None
    assert (refused["team"], refused["role"], refused["target"]) == (
        "b",
        "viewer",
        f"job {job['id']}",
    )
    assert (accepted["team"], accepted["role"], accepted["target"]) == (
        "a",
        "member",
        f"job {job['id']}",
    )
    assert accepted["token_name"] == "member of a" and accepted["at"] > 0

    assert [e["status"] for e in a.get("/audit").json()] == [201]  # its own team's only
    assert a.get("/audit", params={"team": "b"}).status_code == 403
    only_b = secure_api.admin.get("/audit", params={"team": "b", "limit": 5}).json()
    assert [e["status"] for e in only_b] == [403]
    made = secure_api.admin.post("/tokens", json={"team": "c", "role": "viewer"}).json()
    newest = secure_api.admin.get("/audit", params={"limit": 1}).json()[0]
    assert (newest["path"], newest["target"], newest["status"]) == (
        "/tokens",
        f"token {made['id']}",
        201,
    )
