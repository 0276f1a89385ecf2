"""The console's logins: one-time login codes and browser sessions, in memory.

A CLI holding a token asks ``POST /ui/links`` for a code (single use, valid
``CODE_TTL_S``); the browser trades it at ``/ui/login?code=…`` for a session
(valid ``SESSION_TTL_S``) kept in an HttpOnly cookie. Each session has its own
CSRF token, which every console action must send back. Sessions live in this
control plane's memory: a restart logs everyone out, which a new link undoes.

Example::

    sessions = Sessions()
    code, expires_at = sessions.create_code(identity)
    session_id = sessions.exchange(code)
    assert sessions.identity(session_id) == identity
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.auth.identity import Identity

CODE_TTL_S = 120.0
SESSION_TTL_S = 12 * 3600.0


@dataclass(frozen=True)
class Session:
    identity: Identity
    csrf_token: str
    expires_at: float


class Sessions:
    """Login codes and sessions; thread-safe; ``clock`` gives unix seconds."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        code_ttl_s: float = CODE_TTL_S,
        session_ttl_s: float = SESSION_TTL_S,
    ) -> None:
        self._clock = clock
        self._code_ttl_s = code_ttl_s
        self._session_ttl_s = session_ttl_s
        self._codes: dict[str, tuple[Identity, float]] = {}
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create_code(self, identity: Identity) -> tuple[str, float]:
        """A one-time login code for ``identity`` and when it expires (unix seconds)."""
        code = secrets.token_urlsafe(24)
        now = self._clock()
        expires_at = now + self._code_ttl_s
        with self._lock:
            self._drop_expired(now)
            self._codes[code] = (identity, expires_at)
        return code, expires_at

    def exchange(self, code: str) -> str | None:
        """A new session for a valid code (which is spent); None for an unknown, spent or
        expired one."""
        now = self._clock()
        with self._lock:
            found = self._codes.pop(code, None)
            if found is None or found[1] <= now:
                return None
            return self._open(found[0], now)

    def open(self, identity: Identity) -> str:
        """A new session for an identity already verified (a pasted token)."""
        with self._lock:
            return self._open(identity, self._clock())

    def session(self, session_id: str) -> Session | None:
        """The live session of that id, or None (unknown or expired)."""
        now = self._clock()
        with self._lock:
            found = self._sessions.get(session_id)
            if found is not None and found.expires_at <= now:
                del self._sessions[session_id]
                return None
            return found

    def identity(self, session_id: str) -> Identity | None:
        found = self.session(session_id)
        return found.identity if found else None

    def check_csrf(self, session_id: str, presented: str | None) -> bool:
        """Whether ``presented`` is that live session's CSRF token."""
        found = self.session(session_id)
        if found is None or not presented:
            return False
        return hmac.compare_digest(found.csrf_token, presented)

    def _open(self, identity: Identity, now: float) -> str:
        self._drop_expired(now)
        session_id = secrets.token_urlsafe(32)
        self._sessions[session_id] = Session(
            identity, secrets.token_urlsafe(24), now + self._session_ttl_s
        )
        return session_id

    def _drop_expired(self, now: float) -> None:
        for code in [c for c, (_, exp) in self._codes.items() if exp <= now]:
            del self._codes[code]
        for sid in [s for s, v in self._sessions.items() if v.expires_at <= now]:
            del self._sessions[sid]
