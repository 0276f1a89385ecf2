"""Process identity on the node: is a recorded pid still the process that wrote the record?

The simulated GPUs' usage files and the GPU memory cap registry both name a
process by pid plus its start time (Linux ``/proc/<pid>/stat`` field 22), so
that a recycled pid is never taken for the process that is gone. Stdlib only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) from Linux ``/proc/<pid>/stat``; ``None`` elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # The command name (field 2) may hold spaces and parentheses: split after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, start_ticks: int | None) -> bool:
    """Whether ``pid`` is the live process that wrote the record (not a zombie, not recycled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    stat = proc_stat(pid)
    if stat is None:
        return True
    state, ticks = stat
    # A zombie has released its GPU context already; NVML would not list it.
    return state not in ("Z", "X") and (start_ticks is None or ticks == start_ticks)


def check_job_id(job_id: str) -> None:
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"job id {job_id!r} must match {_JOB_ID.pattern} to name a file")
