"""Server processes for ``bench/serving.py``: start one, wait until it answers, tear it down.

Every server runs in its own session (``start_new_session=True``), so what it spawns
(Ray's GCS, raylet, workers) stays in that session; ``stop`` signals the server, then
kills whatever of that session, of its remembered descendants, or with a marker (a Ray
temp dir) in its command line is still alive. Processes started by anyone else are never
touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

POLL_S = 0.2


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerFailed(RuntimeError):
    """A server exited or did not become ready; the message ends with its log's tail."""


@dataclass
class ServerProcess:
    """One server subprocess and what is needed to clean up after it."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stdout_path: Path
    markers: Sequence[str] = ()
    remove_dirs: Sequence[Path] = ()  # removed once the server and its leftovers are gone
    seen: dict[int, float] = field(default_factory=dict)  # pid → create_time

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, why: str) -> ServerFailed:
        return ServerFailed(
            f"{self.name}: {why}\n--- log tail ({self.log_path}) ---\n{self.log_tail()}"
        )

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise self.fail(f"exited with code {self.popen.returncode}")

    def remember_descendants(self) -> None:
        """Note the server's process tree now, to be sure to reap it at ``stop``."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.popen.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.seen[child.pid] = child.create_time()


def launch(
    name: str,
    cmd: Sequence[str],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    markers: Sequence[str] = (),
    keep_stdin: bool = False,
    remove_dirs: Sequence[Path] = (),
    cwd: Path | None = None,
) -> ServerProcess:
    """Start ``cmd`` in a new session (in ``cwd``), stdout and stderr to files under
    ``log_dir``."""
    log_path = log_dir / f"{name}.log"
    stdout_path = log_dir / f"{name}.out"
    with log_path.open("wb") as log, stdout_path.open("wb") as out:
        popen = subprocess.Popen(
            list(cmd),
            stdin=subprocess.PIPE if keep_stdin else subprocess.DEVNULL,
            stdout=out,
            stderr=log,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            cwd=cwd,
        )
    return ServerProcess(name, popen, log_path, stdout_path, markers, remove_dirs)


def wait_until(
    server: ServerProcess, probe: Callable[[], str | None], timeout_s: float, what: str
) -> str:
    """Poll ``probe`` until it returns a value; fail if the server exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        server.check_alive()
        if (value := probe()) is not None:
            server.remember_descendants()
            return value
        time.sleep(POLL_S)
    raise server.fail(f"not {what} within {timeout_s:.0f}s")


def ready_line(server: ServerProcess, timeout_s: float) -> str:
    """The URL from the ``READY <url>`` line the server prints on stdout."""

    def probe() -> str | None:
        for line in server.stdout_path.read_text(errors="replace").splitlines():
            if line.startswith("READY "):
                return line.split(None, 1)[1].strip()
        return None

    return wait_until(server, probe, timeout_s, "ready")


def http_ok(server: ServerProcess, url: str, timeout_s: float) -> str:
    """Wait until ``GET url`` answers 200."""

    def probe() -> str | None:
        try:
            return url if httpx.get(url, timeout=2.0).status_code == 200 else None
        except httpx.HTTPError:
            return None

    return wait_until(server, probe, timeout_s, f"answering 200 on {url}")


def _leftovers(server: ServerProcess) -> list[psutil.Process]:
    """Live processes of the server's session, tree or markers (not this process)."""
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        if proc.pid == os.getpid():
            continue
        try:
            same_session = os.getsid(proc.pid) == server.popen.pid
        except OSError:
            continue
        seen = server.seen.get(proc.pid) == proc.info["create_time"]
        cmdline = " ".join(proc.info["cmdline"] or ())
        marked = any(m in cmdline for m in server.markers)
        if same_session or seen or marked:
            found.append(proc)
    return found


def _signal_and_wait(procs: Sequence[psutil.Process], sig: int, timeout_s: float) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
    psutil.wait_procs(procs, timeout=timeout_s)


def stop(server: ServerProcess, grace_s: float = 30.0) -> list[str]:
    """SIGINT, then SIGTERM, then SIGKILL the server's group; reap its leftovers.

    Returns a description of each leftover that had to be killed after the server itself
    was gone (an empty list means the server cleaned up after itself).
    """
    server.remember_descendants()
    if server.popen.stdin is not None:
        with contextlib.suppress(OSError):
            server.popen.stdin.close()
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0)):
        if server.popen.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            server.popen.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.popen.wait(timeout=wait_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.popen.pid, signal.SIGKILL)
    server.popen.wait(timeout=10)
    time.sleep(0.5)  # Ray's own reaper kills its processes right after the driver exits
    leftovers = _leftovers(server)
    described = []
    for proc in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:100]}")
    _signal_and_wait(leftovers, signal.SIGTERM, 5.0)
    _signal_and_wait([p for p in leftovers if p.is_running()], signal.SIGKILL, 5.0)
    for path in server.remove_dirs:
        shutil.rmtree(path, ignore_errors=True)
    return described
