"""A job's MLflow spool: what the job reported and MLflow has not taken yet, on local disk.

Each record (a batch of metrics, a checkpoint to upload) is one JSON file in
``<work_dir>/mlflow-spool/``. Its name is its place in line and its id: the
spool's creation time, then a counter, so the records of successive job
processes sort in the order they were made. The sender takes them oldest first
and removes each once MLflow has it; an MLflow outage of any length so costs
local disk, not data.

The spool is bounded: :meth:`Spool.put` refuses a record that would take it
past ``max_bytes``, and the caller says what it dropped. A record that only
refers to a file kept anyway (a checkpoint, in the job's checkpoint folder) may
be put ``unbounded``: it costs the spool a few bytes and is never refused.

A job process that dies leaves its spool behind, locked (``flock``) only while
the process lives. The job's next attempt on the same node adopts such spools
of the same run: it moves their records into its own, ahead of the records it
makes itself, so nothing is sent by two processes or out of order.

Example::

    spool = Spool(work_dir / SPOOL_DIR, run_id, max_bytes=256 * 2**20)
    spool.put({"kind": "metrics", "metrics": [...]})
    while (entry := spool.oldest()) is not None:
        send(entry.record)
        spool.remove(entry)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

SPOOL_DIR = "mlflow-spool"
_META = "spool.json"
_LOCK = "lock"
_SUFFIX = ".rec"


@dataclass(frozen=True)
class Entry:
    """One waiting record: its file (whose stem is the record's id) and that file's size."""

    path: Path
    record: dict[str, Any]
    size_bytes: int

    @property
    def id(self) -> str:
        return self.path.stem


class Spool:
    """The records of one run that wait for MLflow, oldest first; see the module docstring."""

    def __init__(
        self, directory: Path, run_id: str, max_bytes: int, adopt: Iterable[Path] = ()
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        lock = _try_lock(directory)
        if lock is None:
            raise RuntimeError(f"the MLflow spool {directory} is in use by another process")
        self._lock = lock
        self.directory = directory
        self.max_bytes = max_bytes
        self._run_id = run_id
        (directory / _META).write_text(json.dumps({"run_id": run_id}))
        for other in adopt:
            self._adopt(other)
        self._prefix = f"{time.time_ns():020d}"
        self._counter = 0
        self._mutex = threading.Lock()
        self._entries = [e for p in sorted(directory.glob(f"*{_SUFFIX}")) if (e := _load(p))]
        self.used_bytes = sum(e.size_bytes for e in self._entries)

    def put(self, record: dict[str, Any], bounded: bool = True) -> bool:
        """Append ``record`` to the line; ``False`` (and nothing written) when it does not fit."""
        data = json.dumps(record).encode()
        size = len(data)
        with self._mutex:
            if bounded and self.used_bytes + size > self.max_bytes:
                return False
            self._counter += 1
            path = self.directory / f"{self._prefix}-{self._counter:09d}{_SUFFIX}"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # a record is whole or absent, even after a crash
            self._entries.append(Entry(path, record, size))
            self.used_bytes += size
        return True

    def oldest(self) -> Entry | None:
        with self._mutex:
            return self._entries[0] if self._entries else None

    def entries(self) -> list[Entry]:
        """Every waiting record, oldest first."""
        with self._mutex:
            return list(self._entries)

    def remove(self, entry: Entry) -> None:
        """Forget ``entry``: MLflow has it (or refused it for good)."""
        with self._mutex:
            entry.path.unlink(missing_ok=True)
            self._entries.remove(entry)
            self.used_bytes -= entry.size_bytes

    def __len__(self) -> int:
        with self._mutex:
            return len(self._entries)

    def _adopt(self, other: Path) -> None:
        """Move the records of the dead process's spool ``other`` of this run into this one."""
        if other.resolve() == self.directory.resolve():
            return
        lock = _try_lock(other)
        if lock is None:  # its process is alive: its records are its own
            return
        try:
            meta = json.loads((other / _META).read_text())
            if meta.get("run_id") != self._run_id:
                return
            for path in other.glob(f"*{_SUFFIX}"):
                os.replace(path, self.directory / path.name)
        except (OSError, ValueError):
            return  # unreadable: leave it where it is
        finally:
            lock.close()


def _try_lock(directory: Path) -> IO[bytes] | None:
    """An exclusive ``flock`` on the spool, held while the returned file stays open."""
    try:
        fh = open(directory / _LOCK, "ab")  # noqa: SIM115 - held for the spool's lifetime
    except OSError:
        return None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    return fh


def _load(path: Path) -> Entry | None:
    with contextlib.suppress(OSError, ValueError):
        data = path.read_bytes()
        record: dict[str, Any] = json.loads(data)
        return Entry(path, record, len(data))
    return None
