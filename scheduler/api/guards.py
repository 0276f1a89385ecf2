"""What every HTTP request passes before a route sees it: Host, content type, body size.

A pure ASGI middleware (no ``BaseHTTPMiddleware``, which buffers and slows the
predict path): one pass over the request headers, and a byte count on the body
as it streams in. Each refusal is a JSON ``{"detail": ...}`` naming what is wrong:

- **400** when the ``Host`` header names no served host: a page on another site
  whose DNS name was re-pointed at 127.0.0.1 (DNS rebinding) sends its own name.
- **415** when a mutating request (POST, PUT, PATCH, DELETE) carries a body that
  is not JSON or YAML: this is also what turns away a browser's "simple"
  cross-site request (``text/plain``, a form, or a body with no type at all).
- **413** when the body is larger than the route's limit: checked from
  ``Content-Length`` before anything is read, and counted while a chunked body
  streams in.

Example::

    app.add_middleware(RequestGuard, limits=BodyLimits(), allowed_hosts=allowed_hosts("127.0.0.1"))
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

MIB = 1024 * 1024
ACCEPTED_TYPES = frozenset(
    {"application/json", "application/yaml", "application/x-yaml", "text/yaml"}
)
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_PREDICT_PREFIX = "/v1/"
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class BodyLimits:
    """The largest request bodies accepted, in bytes.

    ``max_body_bytes`` holds for every route; the predict routes (``/v1/…``) may
    use all of it. Every other route takes a config, a token request or nothing,
    all small, so it gets the tighter ``max_config_bytes``: a config is parsed
    and validated whole, and the largest sane one (100 tags of 8,000 characters)
    is under 1 MiB.
    """

    max_body_bytes: int = 8 * MIB
    max_config_bytes: int = 1 * MIB

    def for_path(self, path: str) -> int:
        if path.startswith(_PREDICT_PREFIX):
            return self.max_body_bytes
        return min(self.max_config_bytes, self.max_body_bytes)


def allowed_hosts(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The ``Host`` names served by an API bound to ``bind_host``; None: any.

    The bind address itself is served, and on loopback also the other loopback
    names. Bound to every interface (``0.0.0.0``, ``::``), the names it is reached
    by cannot be known here: any is served unless ``extra`` lists them.
    """
    names = {h.strip().lower().strip("[]") for h in extra if h.strip()}
    host = bind_host.lower().strip("[]")
    if host in _WILDCARDS:
        if not names:
            log.warning("the API serves every Host name: set allowed_hosts to refuse others")
            return None
        return frozenset(names)
    names.add(host)
    if host in _LOOPBACK_NAMES or host.startswith("127."):
        names.update(_LOOPBACK_NAMES)
    return frozenset(names)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes its limit (413)."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(413, _too_large(limit_bytes))


class RequestGuard:
    """ASGI middleware refusing a wrong Host (400), a non-JSON/YAML body on a
    mutating request (415) and a body over its limit (413)."""

    def __init__(
        self, app: ASGIApp, limits: BodyLimits, allowed_hosts: frozenset[str] | None
    ) -> None:
        self.app = app
        self.limits = limits
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = content_type = length = chunked = None
        for key, value in scope["headers"]:
            if key == b"host":
                host = value
            elif key == b"content-type":
                content_type = value
            elif key == b"content-length":
                length = value
            elif key == b"transfer-encoding":
                chunked = value
        problem = self._problem(scope, host, content_type, length, chunked)
        if problem is not None:
            await _refuse(send, *problem)
            return
        if scope["method"] in _MUTATING:
            receive = _capped(receive, self.limits.for_path(scope["path"]))
        await self.app(scope, receive, send)

    def _problem(
        self,
        scope: Scope,
        host: bytes | None,
        content_type: bytes | None,
        length: bytes | None,
        chunked: bytes | None,
    ) -> tuple[int, str] | None:
        if self.allowed_hosts is not None:
            name = _host_name(host)
            if name not in self.allowed_hosts:
                served = ", ".join(sorted(self.allowed_hosts))
                return 400, f"Host {name!r} is not served here (served: {served})"
        if scope["method"] not in _MUTATING:
            return None
        try:
            size = int(length) if length is not None else None
        except ValueError:
            return 400, "Content-Length is not a number"
        if not size and chunked is None:
            return None  # no body: cancel, delete
        limit = self.limits.for_path(scope["path"])
        if size is not None and size > limit:
            return 413, _too_large(limit)
        media = (content_type or b"").split(b";", 1)[0].strip().lower().decode("latin-1")
        if media not in ACCEPTED_TYPES:
            accepted = ", ".join(sorted(ACCEPTED_TYPES))
            return 415, f"unsupported content type {media or '(none)'!r}: send one of {accepted}"
        return None


def _host_name(host: bytes | None) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8000`` → ``::1``)."""
    text = (host or b"").decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _too_large(limit_bytes: int) -> str:
    return f"the request body is larger than this route's limit of {limit_bytes} bytes"


def _capped(receive: Receive, limit_bytes: int) -> Receive:
    """``receive`` that raises :class:`BodyTooLarge` once the body passes the limit."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit_bytes:
                raise BodyTooLarge(limit_bytes)
        return message

    return wrapped


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
