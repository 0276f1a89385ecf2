"""Bearer tokens: created (the secret shown once), stored hashed, verified, revoked.

A token reads ``jw_<id>_<secret>``: the id finds its row, the secret is checked
against the row's salted scrypt hash (``hashlib.scrypt``, a per-token salt) in
constant time, once per token: a verified token is remembered (keyed by a
SHA-256 of the token) and trusted for ``cache_ttl_s`` before its row is read
again to see whether it was revoked. A revocation in this process forgets
every remembered token at once; one in another process (a standby) is seen
within the TTL.

Example::

    tokens = TokenStore(engine)
    record, secret = tokens.create(team="vision", role=Role.MEMBER, name="ci")
    tokens.verify(secret)  # Identity(token_id=record.id, name="ci", team="vision", ...)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from scheduler.auth.identity import Identity, Role
from scheduler.db import tokens
from workers.interface.errors import JobworkerError

PREFIX = "jw"
# scrypt at n=2**14, r=8, p=1 (16 MiB, tens of ms): the secrets are random 256-bit
# values, so the KDF guards a stolen table, not a guessable password.
_KDF = "scrypt:n=16384,r=8,p=1"
_KDF_PARAMS = {"n": 16384, "r": 8, "p": 1, "maxmem": 64 * 1024 * 1024, "dklen": 32}


class TokenNotFound(JobworkerError):
    """No token has that id."""


@dataclass(frozen=True)
class TokenRecord:
    """A token as listed: never its secret."""

    id: str
    name: str
    team: str
    role: Role
    created_at: float
    created_by: str | None
    revoked_at: float | None


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **_KDF_PARAMS)


def split(presented: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a ``jw_<id>_<secret>`` token, or None for any other shape."""
    prefix, _, rest = presented.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != PREFIX or not token_id or not secret or len(presented) > 200:
        return None
    return token_id, secret


def _record(row: sa.Row[Any]) -> TokenRecord:
    d = row._mapping
    return TokenRecord(
        id=d["id"],
        name=d["name"],
        team=d["team"],
        role=Role(d["role"]),
        created_at=d["created_at"],
        created_by=d["created_by"],
        revoked_at=d["revoked_at"],
    )


class TokenStore:
    """Create, verify, list and revoke tokens; see the module docstring."""

    def __init__(
        self,
        engine: sa.Engine,
        cache_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._cache_ttl_s = cache_ttl_s
        self._clock = clock
        self._monotonic = monotonic
        # A token whose secret matched its row's hash, by a SHA-256 of the token; and
        # until when it is trusted before its row is read again (to see a revocation).
        self._verified: dict[bytes, Identity] = {}
        self._fresh_until: dict[bytes, float] = {}
        self._gates: dict[bytes, threading.Lock] = {}  # one KDF at a time per token
        self._lock = threading.Lock()

    def create(
        self, team: str, role: Role, name: str, created_by: str | None = None
    ) -> tuple[TokenRecord, str]:
        """A new token and its plaintext, which is never stored: show it once."""
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = os.urandom(16)
        with self._engine.begin() as conn:
            conn.execute(
                tokens.insert().values(
                    id=token_id,
                    name=name,
                    team=team,
                    role=role.value,
                    kdf=_KDF,
                    salt=salt.hex(),
                    secret_hash=_hash(secret, salt).hex(),
                    created_at=self._clock(),
                    created_by=created_by,
                    revoked_at=None,
                )
            )
        return self.get(token_id), f"{PREFIX}_{token_id}_{secret}"

    def get(self, token_id: str) -> TokenRecord:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(tokens).where(tokens.c.id == token_id)).first()
        if row is None:
            raise TokenNotFound(f"no token {token_id!r}")
        return _record(row)

    def list(self) -> list[TokenRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(tokens).order_by(tokens.c.created_at)).all()
        return [_record(r) for r in rows]

    def revoke(self, token_id: str) -> TokenRecord:
        """Revoke a token (at once in this process); revoking twice keeps the first time."""
        with self._engine.begin() as conn:
            conn.execute(
                tokens.update()
                .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=self._clock())
            )
        with self._lock:
            self._verified.clear()
            self._fresh_until.clear()
        return self.get(token_id)

    def cached(self, presented: str) -> Identity | None:
        """The identity of a token checked less than the TTL ago (cheap: no KDF, no I/O)."""
        key = hashlib.sha256(presented.encode()).digest()
        identity = self._verified.get(key)
        if identity is None or self._fresh_until.get(key, 0.0) < self._monotonic():
            return None
        return identity

    def verify(self, presented: str) -> Identity | None:
        """The identity of a valid, unrevoked token, or None.

        The KDF runs once per token (one at a time for the same token, so a burst of
        requests as it expires from the cache costs one): later checks only re-read
        whether its row still stands, every ``cache_ttl_s``.
        """
        key = hashlib.sha256(presented.encode()).digest()
        identity = self._verified.get(key)
        if identity is not None:
            return self._recheck(key, identity)
        parts = split(presented)
        if parts is None:
            return None
        with self._lock:
            gate = self._gates.setdefault(key, threading.Lock())
        try:
            with gate:
                identity = self._verified.get(key)
                if identity is not None:  # verified meanwhile by the holder of the gate
                    return self._recheck(key, identity)
                identity = self._check_secret(*parts)
                if identity is not None:
                    with self._lock:
                        if len(self._verified) > 10_000:  # many distinct tokens: start afresh
                            self._verified.clear()
                            self._fresh_until.clear()
                        self._verified[key] = identity
                        self._fresh_until[key] = self._monotonic() + self._cache_ttl_s
                return identity
        finally:
            with self._lock:
                self._gates.pop(key, None)

    def _check_secret(self, token_id: str, secret: str) -> Identity | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(tokens).where(tokens.c.id == token_id)).first()
        if row is None or row.revoked_at is not None or row.kdf != _KDF:
            return None
        if not hmac.compare_digest(_hash(secret, bytes.fromhex(row.salt)).hex(), row.secret_hash):
            return None
        return Identity(token_id=row.id, name=row.name, team=row.team, role=Role(row.role))

    def _recheck(self, key: bytes, identity: Identity) -> Identity | None:
        """``identity`` unless its token was revoked (perhaps by another process)."""
        if self._fresh_until.get(key, 0.0) >= self._monotonic():
            return identity
        query = sa.select(tokens.c.revoked_at).where(tokens.c.id == identity.token_id)
        with self._engine.connect() as conn:
            row = conn.execute(query).first()
        with self._lock:
            if row is None or row.revoked_at is not None:
                self._verified.pop(key, None)
                self._fresh_until.pop(key, None)
                return None
            self._fresh_until[key] = self._monotonic() + self._cache_ttl_s
        return identity

    def ensure_admin_file(self, path: Path, team: str = "default") -> bool:
        """Make sure ``path`` holds a valid admin token; create one if it does not.

        The file is written only through a new file created with mode 0600 (never
        chmod-ed after) and renamed into place. True when a token was created.
        """
        try:
            current = path.read_text().strip()
        except FileNotFoundError:
            current = ""
        identity = self.verify(current) if current else None
        if identity is not None and identity.admin:
            return False
        _, secret = self.create(team, Role.ADMIN, name=f"admin of {path.parent}")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
        os.replace(tmp, path)
        return True
