"""Authentication: every route but /healthz, the docs and the console's way in needs a valid
token; tokens are stored hashed."""

from __future__ import annotations

import re
import stat
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from starlette.routing import Route

from scheduler import db
from scheduler.auth.identity import Role
from scheduler.auth.tokens import TokenStore
from tests.security.conftest import SecureApi

# What answers without a token: health, the docs (scheduler.api.docs), the redirect to the
# console, and the console's login page (its POST takes a token in the body: none here, so 422).
PUBLIC = {
    ("GET", "/healthz"): 200,
    ("GET", "/docs"): 200,
    ("GET", "/redoc"): 200,
    ("GET", "/openapi.json"): 200,
    ("GET", "/"): 303,
    ("GET", "/ui/login"): 200,
    ("POST", "/ui/login"): 422,
}


def _routes(api: SecureApi) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, path parameters filled in."""
    found = set()
    for route in api.app.routes:
        if isinstance(route, Route) and route.methods:
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            found |= {(m, path) for m in route.methods if m != "HEAD"}
    return sorted(found)


def test_every_route_but_the_public_ones_refuses_a_request_without_a_valid_token(
    secure_api: SecureApi,
) -> None:
    routes = _routes(secure_api)
    openapi_paths = {re.sub(r"\{[^}]+\}", "x", p) for p in secure_api.app.openapi()["paths"]}
    assert openapi_paths <= {path for _, path in routes}  # every documented path is tried
    assert ("POST", "/v1/models/x/predict") in routes and ("GET", "/docs") in routes
    _, revoked = secure_api.tokens.create("a", Role.ADMIN, name="gone")
    secure_api.tokens.revoke(secure_api.tokens.list()[-1].id)
    anonymous = secure_api.client(None)
    for token in (None, "jw_nope_nope", "not-a-token", revoked):
        http = secure_api.client(token)
        for method, path in routes:
            answer = http.request(method, path)
            if (method, path) in PUBLIC:
                assert answer.status_code == PUBLIC[method, path], (method, path, answer.text)
                continue
            if token is None and method == "GET" and path.startswith("/ui"):
                # a browser with no token (nor console session) is sent to log in
                assert answer.status_code == 303, (method, path, answer.text)
                assert answer.headers["location"] == "/ui/login"
                continue
            assert answer.status_code == 401, (token, method, path, answer.text)
            assert answer.headers["www-authenticate"].startswith("Bearer"), (method, path)
    assert anonymous.get("/no/such/path").status_code == 401  # nothing learnt without a token
    assert secure_api.admin.get("/jobs").status_code == 200


def test_the_docs_pages_render_offline_from_local_assets_without_a_token(
    secure_api: SecureApi,
) -> None:
    anonymous = secure_api.client(None)
    for page in ("/docs", "/redoc"):
        html = anonymous.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        urls = re.findall(r'(?:src|href)="([^"]*)"', html.text)
        urls += re.findall(r"""(?:url: |spec-url=)['"]([^'"]*)['"]""", html.text)
        assert "/openapi.json" in urls, (page, urls)
        assert "//" not in "".join(urls) and all(u.startswith("/") for u in urls), (page, urls)
        for url in urls:
            answer = anonymous.get(url)
            assert answer.status_code == 200, (url, answer.text[:200])
            if url != "/openapi.json":
                kind = {"js": "text/javascript", "css": "text/css", "png": "image/png"}
                assert answer.headers["content-type"].startswith(kind[url.rsplit(".", 1)[1]])
    for other in ("core.py", "..%2F__init__.py"):  # only the pages' files, nothing beside them
        assert anonymous.get(f"/docs/assets/{other}").status_code == 401
        assert secure_api.admin.get(f"/docs/assets/{other}").status_code == 404


def test_metrics_is_public_only_when_configured(
    make_secure_api: Callable[..., SecureApi],
) -> None:
    public = make_secure_api(metrics_public=True)
    assert public.client(None).get("/metrics").status_code == 200
    assert public.client(None).get("/jobs").status_code == 401


def test_openapi_documents_the_bearer_scheme(secure_api: SecureApi) -> None:
    schema = secure_api.admin.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A jobworker token.",
    }
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    submit = schema["paths"]["/jobs"]["post"]
    assert submit["security"] == [{"bearer": []}] and {"401", "403"} <= set(submit["responses"])


def test_tokens_are_stored_only_hashed_and_revocation_is_immediate(
    store_url: str, make_secure_api: Callable[..., SecureApi]
) -> None:
    api = make_secure_api(store_url)
    made = api.admin.post("/tokens", json={"team": "vision", "role": "member", "name": "ci"})
    assert made.status_code == 201, made.text
    token = made.json()["token"]
    secret = token.split("_", 2)[2]
    with api.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(db.tokens))]
    assert len(rows) == 2 and all(token not in str(r) and secret not in str(r) for r in rows)
    row = next(r for r in rows if r["id"] == made.json()["id"])
    assert row["kdf"].startswith("scrypt:") and len(row["secret_hash"]) == 64
    assert (row["team"], row["role"], row["name"]) == ("vision", "member", "ci")
    listed = api.admin.get("/tokens").json()
    assert all("token" not in t and "secret_hash" not in t for t in listed)

    member = api.client(token)
    assert member.get("/jobs").status_code == 200  # verified once, now cached
    revoked = api.admin.delete(f"/tokens/{made.json()['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    refused = member.get("/jobs")
    assert (
        refused.status_code == 401
        and 'error="invalid_token"' in refused.headers["www-authenticate"]
    )
    assert api.admin.delete("/tokens/nope").status_code == 404


def test_only_an_admin_manages_tokens(secure_api: SecureApi) -> None:
    body = {"team": "a", "role": "admin"}
    for role in (Role.MEMBER, Role.VIEWER):
        http = secure_api.as_("a", role)
        for answer in (
            http.post("/tokens", json=body),
            http.get("/tokens"),
            http.delete(f"/tokens/{secure_api.tokens.list()[0].id}"),
        ):
            assert answer.status_code == 403, answer.text
            assert "only an admin" in answer.json()["detail"]
    bad = secure_api.admin.post("/tokens", json={"team": "a", "role": "owner"})
    assert bad.status_code == 422 and "role" in bad.text


def test_the_admin_token_file_is_made_0600_and_kept_while_it_is_valid(
    store_url: str, tmp_path: Path
) -> None:
    tokens = TokenStore(db.connect(store_url))
    leader, standby = tmp_path / "leader", tmp_path / "standby"
    for home in (leader, standby):
        home.mkdir()
    assert tokens.ensure_admin_file(leader / "admin.token") is True
    assert stat.S_IMODE((leader / "admin.token").stat().st_mode) == 0o600
    first = (leader / "admin.token").read_text()
    assert tokens.ensure_admin_file(leader / "admin.token") is False  # a restart keeps it
    assert (leader / "admin.token").read_text() == first
    # A hot standby on the same store, with a home of its own, gets its own admin token.
    assert tokens.ensure_admin_file(standby / "admin.token") is True
    identity = tokens.verify((standby / "admin.token").read_text().strip())
    assert identity is not None and identity.role is Role.ADMIN
    assert tokens.verify(first.strip()) is not None  # the leader's still works
    tokens.revoke(tokens.verify(first.strip()).token_id)  # type: ignore[union-attr]
    assert tokens.ensure_admin_file(leader / "admin.token") is True  # revoked: replaced
    assert (leader / "admin.token").read_text() != first
    assert stat.S_IMODE((leader / "admin.token").stat().st_mode) == 0o600


def test_a_revocation_by_another_control_plane_is_seen_within_the_cache_ttl(
    tmp_path: Path,
) -> None:
    engine = db.connect(db.sqlite_url(tmp_path / "jobs.db"))
    now = [0.0]
    here = TokenStore(engine, cache_ttl_s=5.0, monotonic=lambda: now[0])
    standby = TokenStore(engine)  # another process on the same store
    record, token = standby.create("a", Role.MEMBER, name="ci")
    identity = here.verify(token)
    assert identity is not None and here.cached(token) == identity
    assert here.verify(f"jw_{record.id}_wrong") is None
    standby.revoke(record.id)
    now[0] = 4.9
    assert here.cached(token) is not None  # trusted for the TTL
    now[0] = 5.1
    assert here.cached(token) is None and here.verify(token) is None
    engine.dispose()
