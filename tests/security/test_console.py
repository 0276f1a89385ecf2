"""The console's logins and actions over real HTTP: a one-time link or a pasted token
opens a cookie session; pages without one send the browser to the login page; every
action needs the session's CSRF token and has the API's permissions, and is audited."""

from __future__ import annotations

import httpx

from scheduler.auth.audit import AuditStore
from tests.security.conftest import SecureApi
from tests.security.test_tenancy import YAML, deployment_yaml, job_yaml, submit


def logged_in(secure_api: SecureApi, http: httpx.Client) -> tuple[httpx.Client, str]:
    """A browser-like client (no token) logged in by ``http``'s login link, and its CSRF
    token (from the page's meta tag)."""
    link = http.post("/ui/links")
    assert link.status_code == 200, link.text
    assert link.json()["path"].startswith("/ui/login?code=")
    browser = httpx.Client(base_url=secure_api.url, timeout=30)
    opened = browser.get(link.json()["path"])
    assert opened.status_code == 303 and opened.headers["location"] == "/ui/gpus"
    cookie = opened.headers["set-cookie"].lower()
    assert "jobworker_session=" in cookie and "httponly" in cookie
    assert "samesite=strict" in cookie and "path=/ui" in cookie
    page = browser.get("/ui/gpus")
    assert page.status_code == 200
    marker = '<meta name="csrf-token" content="'
    csrf = page.text.split(marker, 1)[1].split('"', 1)[0]
    assert csrf
    return browser, csrf


def test_root_and_pages_without_a_login_go_to_the_login_page(secure_api: SecureApi) -> None:
    anonymous = secure_api.client(None)
    root = anonymous.get("/")
    assert root.status_code == 303 and root.headers["location"] == "/ui"
    for path in ("/ui", "/ui/gpus", "/ui/queue", "/ui/jobs", "/ui/jobs/nope", "/ui/deployments"):
        answer = anonymous.get(path)
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/login", path
    login = anonymous.get("/ui/login")
    assert login.status_code == 200 and '<form id="login"' in login.text
    assert anonymous.get("/ui/static/console.js").status_code == 200
    assert anonymous.post("/ui/links").status_code == 401  # a link needs a token
    forged = httpx.Client(base_url=secure_api.url, cookies={"jobworker_session": "forged"})
    assert forged.get("/ui/gpus").headers["location"] == "/ui/login"


def test_a_login_link_works_once(secure_api: SecureApi) -> None:
    link = secure_api.as_("a").post("/ui/links").json()
    browser = httpx.Client(base_url=secure_api.url, timeout=30)
    assert browser.get(link["path"]).status_code == 303
    again = httpx.Client(base_url=secure_api.url, timeout=30).get(link["path"])
    assert again.status_code == 400 and "spent or expired" in again.text
    assert "jobworker_session" not in again.headers.get("set-cookie", "")


def test_a_pasted_token_opens_a_session(secure_api: SecureApi) -> None:
    browser = httpx.Client(base_url=secure_api.url, timeout=30)
    bad = browser.post("/ui/login", json={"token": "jw_not_a_token"})
    assert bad.status_code == 401
    good = browser.post("/ui/login", json={"token": secure_api.admin_token})
    assert good.status_code == 200 and good.json() == {"path": "/ui/gpus"}
    page = browser.get("/ui/jobs")
    assert page.status_code == 200 and "test admin" in page.text


def test_pages_render_the_agreed_dom(secure_api: SecureApi) -> None:
    a = secure_api.as_("a")
    job = submit(a, job_yaml("console-job")).json()
    browser, _ = logged_in(secure_api, a)
    jobs = browser.get("/ui/jobs").text
    assert '<table id="jobs">' in jobs and f'<tr data-job-id="{job["id"]}">' in jobs
    assert 'data-live="/ui/jobs?fragment=1"' in jobs
    filtered = browser.get("/ui/jobs", params={"state": "RUNNING"}).text
    assert f'data-job-id="{job["id"]}"' not in filtered
    found = browser.get("/ui/jobs", params={"q": "console-", "team": "a"}).text
    assert f'data-job-id="{job["id"]}"' in found
    page = browser.get(f"/ui/jobs/{job['id']}").text
    assert '<span id="job-state" class="state state-PENDING">PENDING</span>' in page
    assert '<pre id="log"' in page and 'data-action="cancel"' in page
    fragment = browser.get(f"/ui/jobs/{job['id']}", params={"fragment": 1}).text
    assert "<html" not in fragment and 'id="job-state"' in fragment
    assert '<table id="queue">' in browser.get("/ui/queue").text
    assert '<table id="quotas">' in browser.get("/ui/queue").text
    assert '<table id="deployments">' in browser.get("/ui/deployments").text
    log = browser.get(f"/ui/jobs/{job['id']}/log", params={"offset": 0})
    assert log.json() == {"text": "", "next_offset": 0}


def test_an_action_needs_the_csrf_token_and_is_audited(secure_api: SecureApi) -> None:
    a = secure_api.as_("a")
    job_id = submit(a, job_yaml("csrf-job")).json()["id"]
    browser, csrf = logged_in(secure_api, a)
    for headers in ({}, {"X-CSRF-Token": "wrong"}):
        refused = browser.post(f"/ui/jobs/{job_id}/cancel", headers=headers)
        assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    assert secure_api.jobs.get(job_id).cancel_requested is False
    done = browser.post(f"/ui/jobs/{job_id}/cancel", headers={"X-CSRF-Token": csrf})
    assert done.status_code == 200, done.text
    assert secure_api.jobs.get(job_id).cancel_requested is True
    audited = [
        (e.path, e.status, e.target)
        for e in AuditStore(secure_api.engine).find(team="a")
        if e.path.startswith("/ui/jobs/")
    ]
    assert audited[0] == (f"/ui/jobs/{job_id}/cancel", 200, f"job {job_id}")
    assert [status for _, status, _ in audited[1:]] == [403, 403]


def test_another_teams_job_cannot_be_cancelled_from_the_console(secure_api: SecureApi) -> None:
    job_id = submit(secure_api.as_("b"), job_yaml("b-job")).json()["id"]
    browser, csrf = logged_in(secure_api, secure_api.as_("a"))
    refused = browser.post(f"/ui/jobs/{job_id}/cancel", headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 403 and "team 'b'" in refused.json()["detail"]
    assert secure_api.jobs.get(job_id).cancel_requested is False


def test_rollback_and_undeploy_from_the_console_have_the_apis_permissions(
    secure_api: SecureApi,
) -> None:
    secure_api.register("c-model")
    made = secure_api.admin.post(
        "/deployments",
        content=deployment_yaml("c-dep", "models:/c-model/1", "team: b"),
        headers=YAML,
    )
    assert made.status_code == 201, made.text
    stranger, stranger_csrf = logged_in(secure_api, secure_api.as_("a"))
    for action in ("rollback", "undeploy"):
        refused = stranger.post(
            f"/ui/deployments/c-dep/{action}", headers={"X-CSRF-Token": stranger_csrf}
        )
        assert refused.status_code == 403 and "team 'b'" in refused.json()["detail"], action
    owner, csrf = logged_in(secure_api, secure_api.as_("b"))
    page = owner.get("/ui/deployments/c-dep").text
    assert 'data-action="rollback"' in page and 'data-action="undeploy"' in page
    assert owner.post("/ui/deployments/c-dep/rollback").status_code == 403  # no CSRF token
    nothing = owner.post("/ui/deployments/c-dep/rollback", headers={"X-CSRF-Token": csrf})
    assert nothing.status_code == 409 and "none before it" in nothing.json()["detail"]
    gone = owner.post("/ui/deployments/c-dep/undeploy", headers={"X-CSRF-Token": csrf})
    assert gone.status_code == 200, gone.text
    assert secure_api.admin.get("/deployments/c-dep").status_code == 404
