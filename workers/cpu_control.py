"""The CPU side of co-location on a node: serving cores, training cores, CPU share, pausing.

Each node's cores are split in two: the first ``serving_cores`` serve (the API
process when it runs there, and inference replicas), the rest train. A training
job process gets ``resources.cpus`` of the training cores pinned (CPU
affinity), claimed in ``<node_dir>/cores`` under a file lock, since several
training worker actors on one node claim at once: each claim is a file naming
its cores and the pid holding them; a claim whose process is gone is dropped.
Claims are exclusive while free training cores last; past that, the least
claimed cores are shared. A node with no core beyond the serving ones (a
1-core box, or ``serving_cores`` at least the core count) has nothing to keep
apart: training may then use every core, and only its lower CPU share
protects the serving work.

Training also runs with a lower CPU share than everything else, on every node
(the real-time lane outranks the batch lane everywhere, and on a node with no
replica the lower share costs nothing while nothing else wants the CPU): in
its own cgroup with a low ``cpu.weight`` where ``/sys/fs/cgroup`` is a
writable cgroup v2 hierarchy with the cpu controller, else ``SCHED_IDLE``
(``nice 19`` where that is refused). Throttling a job (the SLO guard) shrinks
its cgroup to a CPU floor (``cpu.max``), or without a cgroup pauses its
process group (SIGSTOP, SIGCONT to release). Stdlib only: cheap to import in an
actor.

Example::

    cpu = JobCpu(node_dir, "job-1.r0", cpus=2, serving_cores=1)
    cpu.place(pid)          # affinity + lower share
    cpu.pause(pid, True)    # the SLO guard throttles it
    cpu.release()           # the job ended: its cores are free
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

from workers.node_dir import CPU_CLAIMS, subdir

log = logging.getLogger(__name__)

DEFAULT_SERVING_CORES = 1
"""Cores kept for serving on each node (a 2-core box: core 0 serves, core 1 trains)."""
TRAINING_CPU_WEIGHT = 10  # cgroup v2 cpu.weight of a training process (default 100)
THROTTLED_CPU_PCT = 5  # a throttled training cgroup's floor, in % of one core
_CPU_PERIOD_US = 100_000
CGROUP_ROOT = Path("/sys/fs/cgroup")
_CGROUP_NAME = "jobworker-training"


def node_cores() -> tuple[int, ...]:
    """The cores this process may run on (the node's, unless a cpuset narrows them)."""
    return tuple(sorted(os.sched_getaffinity(0)))


def split_cores(cores: Sequence[int], serving: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(serving cores, training cores); both are every core when none would be left to train.

    >>> split_cores([0, 1, 2, 3], 1)
    ((0,), (1, 2, 3))
    >>> split_cores([0], 1)
    ((0,), (0,))
    """
    ordered = tuple(sorted(cores))
    if len(ordered) <= serving:
        return ordered, ordered
    return ordered[: max(serving, 0)], ordered[max(serving, 0) :]


def _threads(pid: int) -> list[int]:
    """The thread ids of process ``pid``: affinity and scheduling policy are per thread
    (a thread started later inherits its creator's), so a process already running
    threads (an actor, a warm job process) is changed thread by thread."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return [pid]


def set_affinity(pid: int, cores: Sequence[int]) -> None:
    """Pin every thread of process ``pid`` to ``cores``."""
    for tid in _threads(pid):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(tid, cores)


def pin_serving(serving_cores: int) -> tuple[int, ...]:
    """Pin this process (every thread of it) to the serving cores; returns them. With no
    serving core (``serving_cores`` 0: training may use them all) it keeps every core."""
    serving, _ = split_cores(node_cores(), serving_cores)
    if not serving:
        return node_cores()
    set_affinity(os.getpid(), serving)
    return serving


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CoreClaims:
    """The training cores claimed on one node, one file per claim in ``directory``."""

    def __init__(self, directory: Path, training: Sequence[int]) -> None:
        self._dir = directory
        self._training = tuple(training)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._dir / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _live(self) -> dict[str, list[int]]:
        claims: dict[str, list[int]] = {}
        for path in self._dir.glob("*.json"):
            try:
                claim = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if _alive(int(claim["pid"])):
                claims[path.stem] = [int(c) for c in claim["cores"]]
            else:
                path.unlink(missing_ok=True)
        return claims

    def claim(self, owner: str, pid: int, cpus: float) -> tuple[int, ...]:
        """Claim ``cpus`` training cores (at least one, at most all) for ``pid``; the least
        claimed first, so that claims are disjoint while there are free cores."""
        count = min(max(1, int(cpus)), len(self._training))
        with self._locked():
            load = {core: 0 for core in self._training}
            for other, cores in self._live().items():
                if other != owner:
                    for core in cores:
                        if core in load:
                            load[core] += 1
            chosen = tuple(sorted(sorted(load, key=lambda c: (load[c], c))[:count]))
            (self._dir / f"{owner}.json").write_text(
                json.dumps({"pid": pid, "cores": list(chosen)})
            )
        return chosen

    def release(self, owner: str) -> None:
        with self._locked():
            (self._dir / f"{owner}.json").unlink(missing_ok=True)

    def claimed(self) -> dict[str, list[int]]:
        """Live claims by owner (dead ones dropped)."""
        with self._locked():
            return self._live()


class CgroupV2:
    """Training's cgroup v2 subtree (``<root>/jobworker-training/<owner>``), when usable."""

    def __init__(self, root: Path) -> None:
        self._base = root / _CGROUP_NAME

    @classmethod
    def find(cls, root: Path = CGROUP_ROOT) -> CgroupV2 | None:
        """The subtree, created with the cpu controller on; None when ``root`` is not a
        writable cgroup v2 hierarchy with the cpu controller (cgroup v1, a container)."""
        try:
            if "cpu" not in (root / "cgroup.controllers").read_text().split():
                return None
            group = cls(root)
            (root / "cgroup.subtree_control").write_text("+cpu")
            group._base.mkdir(exist_ok=True)
            (group._base / "cgroup.subtree_control").write_text("+cpu")
        except OSError:
            return None
        return group

    def place(self, owner: str, pid: int) -> None:
        """Move ``pid`` into its own group with a low ``cpu.weight``."""
        group = self._base / owner
        group.mkdir(exist_ok=True)
        (group / "cpu.weight").write_text(str(TRAINING_CPU_WEIGHT))
        (group / "cgroup.procs").write_text(str(pid))

    def limit(self, owner: str, throttled: bool) -> None:
        """Shrink the group to its floor (``cpu.max``), or lift the limit."""
        quota = str(_CPU_PERIOD_US * THROTTLED_CPU_PCT // 100) if throttled else "max"
        (self._base / owner / "cpu.max").write_text(f"{quota} {_CPU_PERIOD_US}")

    def remove(self, owner: str) -> None:
        with contextlib.suppress(OSError):  # still holds a process: the kernel refuses
            (self._base / owner).rmdir()


def lower_share(pid: int) -> str:
    """Run ``pid`` (and the threads it starts later) at the lowest CPU share without a cgroup:
    ``SCHED_IDLE``, else ``nice 19``; returns which."""
    threads = _threads(pid)
    try:
        for tid in threads:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except PermissionError:
        for tid in threads:
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        return "nice 19"


class JobCpu:
    """One training job process's cores, CPU share and throttle, on its node.

    ``node_dir`` None (no node state directory): no cores are claimed, the
    process keeps its affinity; its CPU share is lowered all the same.
    """

    def __init__(
        self,
        node_dir: str | None,
        owner: str,
        cpus: float,
        serving_cores: int,
        cgroup: CgroupV2 | None = None,
    ) -> None:
        self._owner = owner
        self._cpus = cpus
        self._cgroup = cgroup
        self._claims: CoreClaims | None = None
        if node_dir is not None:
            _, training = split_cores(node_cores(), serving_cores)
            self._claims = CoreClaims(subdir(node_dir, CPU_CLAIMS), training)
        self.cores: tuple[int, ...] = ()
        self.paused = False

    def place(self, pid: int) -> None:
        """Pin ``pid`` to its claimed cores and lower its CPU share (never raises: a job
        runs unpinned rather than not at all, and says so in the worker's log)."""
        try:
            if self._claims is not None:
                self.cores = self._claims.claim(self._owner, pid, self._cpus)
                set_affinity(pid, self.cores)
            if self._cgroup is not None:
                self._cgroup.place(self._owner, pid)
            else:
                lower_share(pid)
        except OSError as exc:
            log.warning("could not pin job process %d to its cores: %s", pid, exc)

    def pause(self, pid: int, paused: bool) -> None:
        """Throttle (``paused``) or release the job process and its children."""
        if paused == self.paused:
            return
        self.paused = paused
        if self._cgroup is not None:
            self._cgroup.limit(self._owner, paused)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def release(self) -> None:
        """The job process is gone: free its cores (and its cgroup)."""
        if self._claims is not None:
            self._claims.release(self._owner)
        if self._cgroup is not None:
            self._cgroup.remove(self._owner)
