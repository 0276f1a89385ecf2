"""The leader lease: of the control planes sharing one store, exactly one acts on jobs.

A row of the store's ``leases`` table names the holder, a generation and when the
lease expires. The leader renews it every pass; a standby takes it over once it
has expired (or at once when its holder is a process of this machine that is
gone), and the generation goes up by one. Every change is a conditional UPDATE,
so two control planes racing for it cannot both win, on SQLite or PostgreSQL.

Fencing: the placement of a job is written in the same transaction as a check
that this process still holds the lease at its generation (:meth:`Lease.fence`),
and records that generation on the job. A leader that paused (a GC stop, a
frozen VM) and missed its renewals cannot place anything once another one has
taken over: its write fails with :class:`NotLeader` and it launches nothing.

Example::

    lease = Lease(engine, holder=Lease.holder_id(), ttl_s=5.0)
    if lease.renew():         # at the start of every pass
        store.transition(job, SCHEDULED, "...", fence=lease.fence, lease_generation=...)
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable

import psutil
import sqlalchemy as sa

from scheduler.db import leases
from workers.interface.errors import NotLeader

log = logging.getLogger(__name__)

NAME = "scheduler"


class Lease:
    """This process's claim to lead, renewed each pass."""

    def __init__(
        self,
        engine: sa.Engine,
        holder: str,
        ttl_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self.holder = holder
        self._ttl_s = ttl_s
        self._clock = clock
        self.generation: int | None = None  # set while this process leads

    @staticmethod
    def holder_id() -> str:
        """``host:pid:nonce``: who holds it, and a way to tell a dead local holder."""
        return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    @property
    def leading(self) -> bool:
        return self.generation is not None

    def renew(self) -> bool:
        """Renew the lease, or take it if it is free; whether this process leads now."""
        now = self._clock()
        expires_at = now + self._ttl_s
        if self.generation is None:
            self._create_row()
        with self._engine.begin() as conn:
            if self.generation is not None:
                kept = conn.execute(
                    leases.update()
                    .where(
                        leases.c.name == NAME,
                        leases.c.holder == self.holder,
                        leases.c.generation == self.generation,
                    )
                    .values(expires_at=expires_at)
                ).rowcount
                if kept:
                    return True
                log.warning("lost the leader lease (generation %d)", self.generation)
                self.generation = None
            row = conn.execute(sa.select(leases).where(leases.c.name == NAME)).one()
            if row.expires_at < now or _gone(row.holder):
                generation = row.generation + 1
                taken = conn.execute(
                    leases.update()
                    .where(leases.c.name == NAME, leases.c.generation == row.generation)
                    .values(holder=self.holder, generation=generation, expires_at=expires_at)
                ).rowcount
            else:
                return False
        if taken:
            self.generation = generation
            log.info("leading the scheduler (lease generation %d)", generation)
        return bool(taken)

    def _create_row(self) -> None:
        """The lease row, expired and held by nobody, unless it exists (first come wins)."""
        try:
            with self._engine.begin() as conn:
                if conn.execute(sa.select(leases.c.name).where(leases.c.name == NAME)).first():
                    return
                conn.execute(
                    leases.insert().values(name=NAME, holder="", generation=0, expires_at=0.0)
                )
        except sa.exc.IntegrityError:
            pass  # another process created it meanwhile

    def fence(self, conn: sa.Connection) -> None:
        """In a transaction about to act on a job: raise :class:`NotLeader` unless this
        process still holds the lease. The UPDATE locks the row until the transaction
        ends, so no takeover can commit in between."""
        held = conn.execute(
            leases.update()
            .where(
                leases.c.name == NAME,
                leases.c.holder == self.holder,
                leases.c.generation == (self.generation or 0),
                leases.c.expires_at >= self._clock(),
            )
            .values(expires_at=leases.c.expires_at)
        ).rowcount
        if not held:
            raise NotLeader(f"{self.holder} no longer holds the leader lease")

    def release(self) -> None:
        """Give the lease up at a clean stop, so a standby takes over at once."""
        if self.generation is None:
            return
        with self._engine.begin() as conn:
            conn.execute(
                leases.update()
                .where(leases.c.name == NAME, leases.c.holder == self.holder)
                .values(expires_at=0.0)
            )
        self.generation = None


def _gone(holder: str) -> bool:
    """Whether ``holder`` is a process of this machine that no longer runs."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))
