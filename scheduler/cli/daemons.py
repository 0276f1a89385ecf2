"""The processes ``jobworker up`` runs, each recorded under its home.

The API (the control plane) and the embedded services it starts: a local Ray
head (``ray start --head --block``) and the MLflow server. Each service runs as
a daemon in its own session, so a control plane that is killed leaves them
(and the jobs on Ray) running; a restarted ``up`` re-uses the healthy ones and
replaces the others. A record (``<home>/<name>.json``) holds the pid, the
process's start time (a reused pid is not mistaken for it) and its address;
``down`` stops each recorded process with its whole process group.

Only one ``up`` runs per home: it holds ``<home>/up.lock`` (an advisory lock
the kernel drops when the process dies, however it dies) for its lifetime.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import httpx
import psutil

from workers.interface.errors import ServiceError

API, RAY, MLFLOW = "api", "ray", "mlflow"


@dataclass(frozen=True)
class Daemon:
    """A recorded process: which one it is (pid and start time) and where it answers."""

    name: str
    pid: int
    started: float  # the process's start time: tells it from a later process with its pid
    port: int
    address: str

    def running(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.started) >= 0.01:
                return False  # another process got its pid
            if proc.status() == psutil.STATUS_ZOMBIE:  # exited; reaped here if ours
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, os.WNOHANG)
                return False
            return True
        except psutil.Error:
            return False

    def describe(self) -> str:
        return f"{self.name} (pid {self.pid}, {self.address})"


def record(home: Path, name: str) -> Daemon | None:
    """The recorded process ``name``, or None (never recorded, or its record is unreadable)."""
    try:
        return Daemon(**json.loads((home / f"{name}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write(home: Path, daemon: Daemon) -> None:
    path = home / f"{daemon.name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(daemon)))
    tmp.replace(path)


def _forget(home: Path, name: str) -> None:
    (home / f"{name}.json").unlink(missing_ok=True)


def this_process(home: Path, host: str, port: int) -> Daemon:
    """Record this process as the home's API."""
    me = Daemon(API, os.getpid(), psutil.Process().create_time(), port, f"http://{host}:{port}")
    _write(home, me)
    return me


def forget_this_process(home: Path) -> None:
    mine = record(home, API)
    if mine is not None and mine.pid == os.getpid():
        _forget(home, API)


# -- one `up` per home, one owner per port ---------------------------------------------------
def lock_home(home: Path) -> IO[str]:
    """Take the home's lock for this process's lifetime; keep the returned file open.

    Raises :class:`ServiceError` naming the running instance when another holds it.
    """
    lock = (home / "up.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        running = record(home, API)
        who = running.describe() if running else "another `jobworker up`"
        raise ServiceError(
            f"jobworker is already up on {home}: {who}; stop it with "
            f"`jobworker down --home {home}`, or use another --home"
        ) from None
    return lock


def holder_of(port: int) -> str:
    """Who listens on ``port`` on this machine, in words."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    break
                with contextlib.suppress(psutil.Error):
                    command = " ".join(psutil.Process(conn.pid).cmdline())[:100]
                    return f"pid {conn.pid} ({command})"
                return f"pid {conn.pid}"
    except psutil.Error:
        pass
    return "another process"


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise :class:`ServiceError`, naming the holder, when ``port`` cannot be bound."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise ServiceError(
                f"port {port} ({what}) is already in use by {holder_of(port)}; "
                "stop it or choose another port"
            ) from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -- starting and stopping --------------------------------------------------------------------
def _start(
    home: Path,
    name: str,
    command: list[str],
    port: int,
    address: str,
    ready: Callable[[], bool],
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> Daemon:
    """Start ``command`` as a daemon, record it at once, and wait until ``ready``."""
    log_path = home / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    daemon = Daemon(name, proc.pid, psutil.Process(proc.pid).create_time(), port, address)
    _write(home, daemon)  # recorded before it is ready: a `down` meanwhile still finds it
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            _forget(home, name)
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise ServiceError(
                f"{name} exited with code {proc.returncode} while starting; "
                f"see {log_path}:\n  " + "\n  ".join(tail)
            )
        if time.monotonic() > deadline:
            stop(home, name)
            raise ServiceError(f"{name} did not start within {timeout_s:.0f} s; see {log_path}")
        time.sleep(0.3)
    return daemon


def stop(home: Path, name: str, grace_s: float = 20.0) -> Daemon | None:
    """Stop the recorded process ``name`` and its process group; the one stopped, or None."""
    daemon = record(home, name)
    if daemon is None:
        return None
    if daemon.running():
        _signal(daemon, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while daemon.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal(daemon, signal.SIGKILL)
        while daemon.running():
            time.sleep(0.1)
    else:
        daemon = None  # already gone: nothing was stopped
    _forget(home, name)
    return daemon


def _signal(daemon: Daemon, sig: int) -> None:
    """``sig`` to the daemon's process group (its children too), or to it alone."""
    try:
        if os.getpgid(daemon.pid) == daemon.pid:
            os.killpg(daemon.pid, sig)
        else:
            os.kill(daemon.pid, sig)
    except ProcessLookupError:
        pass


# -- the embedded services --------------------------------------------------------------------
MLFLOW_ADMIN, MLFLOW_AUTH = "admin", "mlflow-auth.ini"  # the admin user, its config file
MLFLOW_LOGIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # read by MLflow's client


def mlflow_auth_config(home: Path) -> Path:
    """The home's config of MLflow's basic-auth app, made once, readable by this user only.

    It is MLflow's own ini (``MLFLOW_AUTH_CONFIG_PATH``): the auth database
    (SQLite under the home), the admin user and its generated password, and
    ``default_permission = NO_PERMISSIONS`` (a user an admin adds sees nothing
    until granted). Its ``[jobworker]`` section holds the Flask secret key the
    auth app needs. A restarted ``up`` re-uses it, edits included.
    """
    path = home.resolve() / MLFLOW_AUTH
    if not path.exists():
        config = configparser.ConfigParser()
        config["mlflow"] = {
            "default_permission": "NO_PERMISSIONS",
            "database_uri": f"sqlite:///{home.resolve() / 'mlflow-auth.db'}",
            "admin_username": MLFLOW_ADMIN,
            "admin_password": secrets.token_urlsafe(24),
            "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        }
        config["jobworker"] = {"flask_secret_key": secrets.token_hex(32)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            config.write(fh)
    return path


def _read_mlflow_auth(home: Path) -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(mlflow_auth_config(home))
    return config


def mlflow_credentials(home: Path) -> dict[str, str]:
    """The environment with which MLflow's client logs in to the home's MLflow server."""
    admin = _read_mlflow_auth(home)["mlflow"]
    return dict(zip(MLFLOW_LOGIN, (admin["admin_username"], admin["admin_password"]), strict=True))


def mlflow_server(home: Path, port: int, timeout_s: float = 120.0) -> tuple[Daemon, bool]:
    """The home's MLflow server (SQLite + local artifacts) on ``port``, with MLflow's
    basic-auth app on (see :func:`mlflow_auth_config`): (daemon, re-used).

    A running server is re-used only when it refuses a request without the
    home's credentials and answers one with them.
    """
    base = f"http://127.0.0.1:{port}"
    login = mlflow_credentials(home)
    auth = (login["MLFLOW_TRACKING_USERNAME"], login["MLFLOW_TRACKING_PASSWORD"])
    probe = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"

    def status(credentials: tuple[str, str] | None) -> int | None:
        try:  # (the first login checks a PBKDF2 hash, on a busy machine in seconds)
            return httpx.get(probe, auth=credentials, timeout=30).status_code
        except httpx.HTTPError:
            return None

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    known = record(home, MLFLOW)
    if (
        known is not None
        and known.running()
        and known.port == port
        and healthy()
        and status(None) == 401  # basic-auth on
        and status(auth) == 200  # and our login
    ):
        return known, True
    stop(home, MLFLOW)  # not running, not answering, on another port, or not ours to log in to
    check_port_free("127.0.0.1", port, "MLflow server")
    state = home.resolve()
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth"),
        *("--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}"),
        *("--artifacts-destination", str(state / "mlartifacts")),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    config = mlflow_auth_config(home)
    env = {  # the operator's own MLFLOW_AUTH_ADMIN_* would override the ini's
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_USERNAME": auth[0],
        "MLFLOW_AUTH_ADMIN_PASSWORD": auth[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": _read_mlflow_auth(home)["jobworker"]["flask_secret_key"],
    }
    started = _start(home, MLFLOW, command, port, base, healthy, timeout_s, env)
    if status(auth) != 200:  # an auth database whose admin has another password
        stop(home, MLFLOW)
        raise ServiceError(
            f"the MLflow server refuses the credentials in {config}: its auth database "
            f"{state / 'mlflow-auth.db'} holds another password for {auth[0]!r}; put that "
            "password in the config, or move the database away to start a fresh one"
        )
    return started, False


def ray_auth(home: Path) -> dict[str, str]:
    """The environment that turns on Ray's token authentication with the home's own token.

    The token is made once per home, readable by this user only. The Ray head
    runs with it, and the control plane (which sets it in its environment
    before it connects) presents it.
    """
    path = home.resolve() / "ray.token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def ray_temp_dir(home: Path) -> Path:
    """Where the home's Ray keeps its sockets and logs: short, as socket paths must be."""
    tag = hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"jobworker-ray-{tag}"


def _has_our_mlflow_login(daemon: Daemon) -> bool:
    """Whether ``daemon`` started with this process's MLflow login (or both without one)."""
    try:
        theirs = psutil.Process(daemon.pid).environ()
    except psutil.Error:
        return False
    return all(theirs.get(key) == os.environ.get(key) for key in MLFLOW_LOGIN)


def ray_head(home: Path, timeout_s: float = 120.0) -> tuple[Daemon, bool]:
    """The home's local Ray head on 127.0.0.1, with token authentication: (daemon, re-used).

    (127.0.0.1 is the address it advertises; Ray 2.60's GCS, raylet and agents
    still listen on every interface, where the token guards all but the
    agents' health and metrics endpoints.) Its workers (the job processes, the
    replicas) inherit its environment, and with it the MLflow login
    (``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``) this process has: a running head
    started with another login is replaced (its jobs are lost to Ray and
    requeued), as its workers could not log to MLflow.
    """
    known = record(home, RAY)
    if (
        known is not None
        and known.running()
        and _listening(known.port)
        and _has_our_mlflow_login(known)
    ):
        return known, True
    stop(home, RAY)
    port = _free_port()
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    command = [
        *(ray, "start", "--head", "--block", "--port", str(port)),
        *("--node-ip-address", "127.0.0.1", "--temp-dir", str(ray_temp_dir(home))),
        *("--include-dashboard", "false", "--disable-usage-stats"),
    ]
    log_path = home / f"{RAY}.log"
    offset = log_path.stat().st_size if log_path.exists() else 0

    def started() -> bool:  # `ray start` says so once the head's processes are all up
        with log_path.open("rb") as log:
            log.seek(offset)
            return b"Ray runtime started" in log.read()

    address = f"127.0.0.1:{port}"
    return _start(home, RAY, command, port, address, started, timeout_s, ray_auth(home)), False
