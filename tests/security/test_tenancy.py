"""Tenancy: a team's jobs, deployments and model names are its own; viewers never mutate."""

from __future__ import annotations

import httpx
import sqlalchemy as sa

from scheduler import db
from scheduler.auth.identity import Role
from scheduler.realtime.router import RouteConfig
from tests.security.conftest import SecureApi

YAML = {"content-type": "application/yaml"}


def job_yaml(name: str, *extra: str) -> str:
    return "\n".join(
        [
            f"name: {name}",
            "model: {name: mlp}",
            "data: {name: synthetic_classification}",
            "train: {max_steps: 1}",
            *extra,
        ]
    )


def deployment_yaml(name: str, model: str, *extra: str) -> str:
    return "\n".join([f"name: {name}", f"model: {model}", *extra])


def submit(http: httpx.Client, text: str) -> httpx.Response:
    return http.post("/jobs", content=text, headers=YAML)


def test_a_job_runs_for_the_token_team_and_only_its_team_cancels_it(
    secure_api: SecureApi,
) -> None:
    a, b = secure_api.as_("a"), secure_api.as_("b")
    job = submit(b, job_yaml("b-job"))
    assert job.status_code == 201, job.text
    assert job.json()["spec"]["team"] == "b"

    other = submit(a, job_yaml("sneaky", "team: b"))
    assert other.status_code == 403 and "team: 'b'" in other.json()["detail"]
    refused = a.post(f"/jobs/{job.json()['id']}/cancel")
    assert refused.status_code == 403 and "team 'b'" in refused.json()["detail"]
    assert secure_api.jobs.get(job.json()["id"]).cancel_requested is False

    assert b.post(f"/jobs/{job.json()['id']}/cancel").json()["cancel_requested"] is True
    for_a = submit(secure_api.admin, job_yaml("for-a", "team: a"))  # an admin acts for any team
    assert for_a.status_code == 201 and for_a.json()["spec"]["team"] == "a"
    assert a.get(f"/jobs/{job.json()['id']}").status_code == 200  # any token reads


def test_a_viewer_may_not_mutate_anything(secure_api: SecureApi) -> None:
    secure_api.register("v-model")
    own = secure_api.admin.post(
        "/deployments",
        content=deployment_yaml("v-dep", "models:/v-model/1", "team: v"),
        headers=YAML,
    )
    assert own.status_code == 201, own.text
    job = submit(secure_api.admin, job_yaml("v-job", "team: v")).json()
    viewer = secure_api.as_("v", Role.VIEWER)
    answers = [
        submit(viewer, job_yaml("v2")),
        viewer.post(f"/jobs/{job['id']}/cancel"),
        viewer.post(
            "/deployments", content=deployment_yaml("v-dep", "models:/v-model/1"), headers=YAML
        ),
        viewer.delete("/deployments/v-dep"),
        viewer.post("/deployments/v-dep/rollback"),
        viewer.post("/tokens", json={"team": "v", "role": "member"}),
        viewer.delete("/tokens/x"),
    ]
    for answer in answers:
        assert answer.status_code == 403, (answer.request.url, answer.text)
    assert "viewer" in answers[0].json()["detail"]
    assert viewer.get("/deployments/v-dep").status_code == 200
    assert secure_api.deployments.get("v-dep").spec.model == "models:/v-model/1"


def test_priority_above_the_team_cap_is_refused_naming_priority(secure_api: SecureApi) -> None:
    # The fixture's caps: default 10, team b 60; admins are exempt.
    high = submit(secure_api.as_("a"), job_yaml("high", "priority: 11"))
    assert high.status_code == 422
    assert high.json()["detail"][0]["loc"] == "priority"
    assert "at most 10" in high.json()["detail"][0]["msg"]
    assert submit(secure_api.as_("a"), job_yaml("ok", "priority: 10")).status_code == 201
    assert submit(secure_api.as_("b"), job_yaml("b-high", "priority: 60")).status_code == 201
    assert submit(secure_api.as_("b"), job_yaml("b-higher", "priority: 61")).status_code == 422
    assert submit(secure_api.admin, job_yaml("admin", "priority: 100")).status_code == 201


def test_a_model_name_belongs_to_the_team_that_registered_it_first(
    secure_api: SecureApi,
) -> None:
    a, b = secure_api.as_("a"), secure_api.as_("b")
    first = submit(a, job_yaml("first", "register_as: shared-name"))
    assert first.status_code == 201, first.text
    stored = len(secure_api.jobs.find())
    for extra in ("register_as: shared-name", "register_as: shared-name\nregister_alias: prod"):
        taken = submit(b, job_yaml("second", extra))
        assert taken.status_code == 403, taken.text
        assert "model name 'shared-name' belongs to team 'a'" in taken.json()["detail"]
    assert len(secure_api.jobs.find()) == stored  # nothing stored for the refused jobs
    assert submit(a, job_yaml("again", "register_as: shared-name")).status_code == 201
    with secure_api.engine.connect() as conn:
        owners = dict(conn.execute(sa.select(db.model_names.c.name, db.model_names.c.team)).all())
    assert owners == {"shared-name": "a"}


def test_a_deployment_follows_only_its_team_models_and_only_its_team_changes_it(
    secure_api: SecureApi,
) -> None:
    a, b = secure_api.as_("a"), secure_api.as_("b")
    secure_api.register("b-model")
    assert submit(b, job_yaml("claim", "register_as: b-model")).status_code == 201

    follow = a.post(
        "/deployments", content=deployment_yaml("a-dep", "models:/b-model@prod"), headers=YAML
    )
    assert follow.status_code == 403 and "belongs to team 'b'" in follow.json()["detail"]
    pinned = a.post(
        "/deployments", content=deployment_yaml("a-dep", "models:/b-model/1"), headers=YAML
    )
    assert pinned.status_code == 403
    shared = secure_api.admin.post(  # an admin shares b's model with a by deploying it
        "/deployments",
        content=deployment_yaml("a-dep", "models:/b-model/1", "team: a"),
        headers=YAML,
    )
    assert shared.status_code == 201, shared.text

    own = b.post(
        "/deployments", content=deployment_yaml("b-dep", "models:/b-model/1"), headers=YAML
    )
    assert own.status_code == 201, own.text
    assert secure_api.deployments.get("b-dep").spec.team == "b"
    overwrite = a.post(
        "/deployments", content=deployment_yaml("b-dep", "models:/b-model/1"), headers=YAML
    )
    assert overwrite.status_code == 403 and "belongs to team 'b'" in overwrite.json()["detail"]
    assert a.delete("/deployments/b-dep").status_code == 403
    assert a.post("/deployments/b-dep/rollback").status_code == 403
    # Its team may, once it has served an earlier version; here it has served none.
    assert b.post("/deployments/b-dep/rollback").status_code == 409
    assert secure_api.deployments.get("b-dep").spec.team == "b"

    # Predict: a token of the deployment's team, any role, or an admin. The controller
    # configures the route with the deployment's team (the authorization comes before
    # any replica is asked, so none needs to be ready).
    secure_api.router.configure(RouteConfig("b-dep", 8, 1, 100, 16, team="b"))
    body = {"inputs": [[0.0] * 4]}
    refused = a.post("/v1/models/b-dep/predict", json=body)
    assert refused.status_code == 403 and "belongs to team 'b'" in refused.json()["detail"]
    for http in (secure_api.as_("b", Role.VIEWER), secure_api.admin):
        assert http.post("/v1/models/b-dep/predict", json=body).status_code == 503  # no replica

    assert b.delete("/deployments/b-dep").status_code == 204


def test_a_run_uri_must_be_a_run_of_the_team_jobs(secure_api: SecureApi) -> None:
    job = submit(secure_api.as_("b"), job_yaml("b-run")).json()
    secure_api.jobs.update(job["id"], run_id="abc123")
    refused = secure_api.as_("a").post(
        "/deployments", content=deployment_yaml("runs", "runs:/abc123/model"), headers=YAML
    )
    assert refused.status_code == 403
    assert "run abc123 was not made by a job of team 'a' (its job is team 'b')" in refused.text
    unknown = secure_api.as_("b").post(
        "/deployments", content=deployment_yaml("runs", "runs:/fff999/model"), headers=YAML
    )
    assert unknown.status_code == 403 and "not made by a job of team 'b'" in unknown.text


def test_only_an_admin_may_allow_a_pickled_model(secure_api: SecureApi) -> None:
    secure_api.register("pickled")
    a = secure_api.as_("a")
    pickled = deployment_yaml("p-dep", "models:/pickled/1", "allow_pickled_model: true")
    refused = a.post("/deployments", content=pickled, headers=YAML)
    assert refused.status_code == 403
    assert "allow_pickled_model" in refused.json()["detail"]
    assert [d.name for d in secure_api.deployments.list()] == []
    allowed = secure_api.admin.post("/deployments", content=pickled + "\nteam: a", headers=YAML)
    assert allowed.status_code == 201, allowed.text
    assert secure_api.deployments.get("p-dep").spec.allow_pickled_model
