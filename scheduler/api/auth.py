"""Authentication and the audit trail, as a pure ASGI middleware around the whole app.

Every request but those to ``public_paths`` (``/healthz``; the documentation pages
``/docs`` and ``/redoc``, their assets and ``/openapi.json``, see
``scheduler.api.docs``; ``/metrics`` when configured) must carry ``Authorization:
Bearer <token>``: without one, or with a bad or revoked one, it is answered 401
with ``WWW-Authenticate: Bearer`` before any route runs (an unknown path too, so
nothing is learnt without a token). The verified :class:`Identity` is put in the
request's state for the routes, which decide 403s through
``scheduler.auth.identity``. Pure ASGI (not Starlette's ``BaseHTTPMiddleware``) so
that it wraps the plain predict route as cheaply as the rest: a token verified in
the last few seconds costs one SHA-256 and a dict lookup. Every mutating request
(POST, PUT, PATCH, DELETE; predict excepted) is recorded in the audit trail with
its final status, refusals included.

The console (``/ui/*``) also takes the ``jobworker_session`` cookie of a browser
session (:mod:`scheduler.api.console.sessions`) where no bearer token is sent:
a page asked for without either is redirected (303) to ``/ui/login``, and a
console action (POST) made with the cookie must carry the session's CSRF token
in ``X-CSRF-Token``, else 403. ``/``, ``/ui/login`` and ``/ui/static/*`` are public.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.api.console.sessions import Sessions
from scheduler.api.docs import PUBLIC_PATHS as DOCS_PATHS
from scheduler.auth.audit import AuditEvent, AuditStore
from scheduler.auth.identity import Identity
from scheduler.auth.tokens import TokenNotFound, TokenStore

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SCHEME = "bearer"
SESSION_COOKIE = "jobworker_session"
CSRF_HEADER = "x-csrf-token"
CONSOLE = "/ui"
LOGIN_PATH = "/ui/login"


@dataclass
class Auth:
    """What the API needs to know who is asking and to record what they changed."""

    tokens: TokenStore
    audit: AuditStore
    metrics_public: bool = False
    sessions: Sessions = field(default_factory=Sessions)  # the console's browser logins

    @property
    def public_paths(self) -> frozenset[str]:
        metrics = {"/metrics"} if self.metrics_public else set()
        return frozenset({"/healthz", "/", LOGIN_PATH, *metrics, *DOCS_PATHS})


def caller(request: Request) -> Identity:
    """The verified identity of the request (a FastAPI dependency)."""
    identity: Identity = request.state.identity
    return identity


Caller = Annotated[Identity, Depends(caller)]


def audit_target(request: Request, target: str) -> None:
    """Name what a mutating request acts on, for its audit row."""
    request.state.audit_target = target


def _is_predict(path: str) -> bool:
    return path.startswith("/v1/models/") and path.endswith("/predict")


def _is_public_asset(path: str) -> bool:
    return path.startswith(f"{CONSOLE}/static/")


def _is_console(path: str) -> bool:
    return path == CONSOLE or path.startswith(f"{CONSOLE}/")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def session_id(scope: Scope) -> str | None:
    """The console session cookie's value, if the request sent one."""
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    morsel = SimpleCookie(raw).get(SESSION_COOKIE)
    return morsel.value if morsel is not None else None


def _bearer(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == SCHEME and token.strip() else None
    return None


class Authenticate:
    """The ASGI middleware; see the module docstring."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self._app = app
        self._auth = auth
        self._public = auth.public_paths

    async def _session_identity(self, session: str) -> Identity | None:
        """The identity of a live console session whose token still stands (a revoked
        token ends its sessions at once)."""
        identity = self._auth.sessions.identity(session)
        if identity is None:
            return None
        try:
            token = await asyncio.to_thread(self._auth.tokens.get, identity.token_id)
        except TokenNotFound:
            return None
        return identity if token.revoked_at is None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        if path in self._public or _is_public_asset(path):
            await self._app(scope, receive, send)
            return
        presented = _bearer(scope)
        identity: Identity | None = None
        if presented is not None:
            tokens = self._auth.tokens
            identity = tokens.cached(presented) or await asyncio.to_thread(tokens.verify, presented)
        mutating = scope["method"] in MUTATING
        csrf_refused = False
        if presented is None and _is_console(path):
            session = session_id(scope)
            identity = await self._session_identity(session) if session else None
            if identity is None and not mutating:
                await _redirect(send, LOGIN_PATH)
                return
            if identity is not None and session is not None:
                scope.setdefault("state", {})["console_session"] = session
                csrf_refused = mutating and not self._auth.sessions.check_csrf(
                    session, _header(scope, CSRF_HEADER.encode())
                )
        audited = mutating and not _is_predict(path)
        if not audited:
            if identity is None:
                await _unauthorized(send, presented is not None)
            else:
                scope.setdefault("state", {})["identity"] = identity
                await self._app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        recorded = False

        async def record(status: int) -> None:
            nonlocal recorded
            recorded = True
            event = AuditEvent(
                at=time.time(),
                token_id=identity.token_id if identity else None,
                token_name=identity.name if identity else None,
                team=identity.team if identity else None,
                role=identity.role.value if identity else None,
                method=scope["method"],
                path=scope["path"],
                target=state.get("audit_target"),
                status=status,
            )
            await asyncio.to_thread(self._auth.audit.record, event)

        async def send_recorded(message: Message) -> None:
            # Recorded before the answer leaves: whoever sees the answer finds its row.
            if message["type"] == "http.response.start" and not recorded:
                await record(message["status"])
            await send(message)

        try:
            if identity is None:
                await _unauthorized(send_recorded, presented is not None)
            elif csrf_refused:
                await _refuse_csrf(send_recorded)
            else:
                state["identity"] = identity
                await self._app(scope, receive, send_recorded)
        finally:
            if not recorded:  # the app raised before answering: the server answers 500
                await record(500)


async def _unauthorized(send: Send, presented: bool) -> None:
    if presented:
        detail = "the bearer token is not valid (unknown, malformed or revoked)"
        challenge = b'Bearer error="invalid_token"'
    else:
        detail = "a bearer token is required: send 'Authorization: Bearer <token>'"
        challenge = b"Bearer"
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", challenge),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Send, location: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [(b"location", location.encode()), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})


async def _refuse_csrf(send: Send) -> None:
    body = json.dumps(
        {"detail": "the console's CSRF token is missing or wrong: reload the page"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def document_security(app: FastAPI, public_paths: Collection[str]) -> None:
    """Say in the OpenAPI schema that every operation but the public ones takes an HTTP
    bearer token, and may answer 401 (no valid token) or 403 (not allowed)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {})["securitySchemes"] = {
            SCHEME: {"type": "http", "scheme": SCHEME, "description": "A jobworker token."}
        }
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                if path in public_paths:
                    operation["security"] = []
                    continue
                operation["security"] = [{SCHEME: []}]
                responses = operation.setdefault("responses", {})
                responses.setdefault("401", {"description": "No valid bearer token."})
                responses.setdefault("403", {"description": "This token may not do this."})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
