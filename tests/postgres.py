"""A throw-away PostgreSQL server for a test run: initdb into a temporary directory, then
``postgres`` on loopback with trust authentication, one fresh database per test.

PostgreSQL refuses to run as root; as root (CI) the server runs as the ``postgres``
system user, which owns the temporary directory. The binaries are looked up on PATH,
then in the Debian layout (/usr/lib/postgresql/<version>/bin).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

SUPERUSER = "postgres"
# Durability buys nothing in a throw-away server; each test's engines hold a few connections.
SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}
INSTALL_HINT = (
    "PostgreSQL's server binaries (initdb, postgres) are not installed: "
    "`apt-get install postgresql` (Debian/Ubuntu; .ci/run does it), or put a PostgreSQL 15 "
    "bin/ directory on PATH. The store tests run against PostgreSQL as well as SQLite."
)


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``: PATH first, then the newest
    /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(os.path.realpath(on_path)).parent
    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major, reverse=True):
        if (Path(initdb).parent / "postgres").exists():
            return Path(initdb).parent
    return None


def _major(initdb: str) -> int:
    version = Path(initdb).parent.parent.name  # /usr/lib/postgresql/<version>/bin/initdb
    return int(version) if version.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One ``postgres`` process on 127.0.0.1 with its data, socket and log in ``root``.

    Example::

        server = PostgresServer.start(find_bin_dir())
        wait_until(server.ready, "PostgreSQL accepts connections")
        url = server.create_database()  # postgresql+psycopg://postgres@127.0.0.1:<port>/test_1
        server.stop()
    """

    def __init__(self, bin_dir: Path, root: Path, port: int, process: subprocess.Popen[bytes]):
        self.bin_dir = bin_dir
        self.root = root
        self.port = port
        self.process = process
        self._names = itertools.count(1)

    @classmethod
    def start(cls, bin_dir: Path) -> PostgresServer:
        """initdb and start the server (not yet ready: wait on :meth:`ready`)."""
        root = Path(tempfile.mkdtemp(prefix="jobworker-pg-"))
        as_user = _server_user()
        try:
            (root / "sock").mkdir()
            if as_user is not None:
                for path in (root, root / "sock"):
                    os.chown(path, as_user.pw_uid, as_user.pw_gid)
            # Trust is safe here: the server listens on loopback and a private socket only.
            initdb = [str(bin_dir / "initdb"), "--pgdata", str(root / "data")]
            initdb += ["--username", SUPERUSER, "--auth", "trust"]
            _run([*initdb, "--encoding", "UTF8", "--locale", "C", "--no-sync"], root, as_user)
            port = _free_port()
            argv = [*_dies_with_us(), str(bin_dir / "postgres"), "-D", str(root / "data")]
            argv += ["-h", "127.0.0.1", "-p", str(port), "-k", str(root / "sock")]
            for name, value in SERVER_SETTINGS.items():
                argv += ["-c", f"{name}={value}"]
            with open(root / "server.log", "wb") as log:  # the child keeps its own copy
                process = subprocess.Popen(
                    argv, cwd=root, stdout=log, stderr=subprocess.STDOUT, **_as(as_user)
                )
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return cls(bin_dir, root, port, process)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _admin(self) -> psycopg.Connection[Any]:
        import psycopg  # the postgres extra: only tests that use the server need it

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            dbname="postgres",
            autocommit=True,
            connect_timeout=5,
        )

    def ready(self) -> bool:
        """Whether the server accepts connections; raises if it has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"postgres exited with {self.process.returncode} before it was ready:\n"
                + self.log_tail()
            )
        import psycopg

        try:
            with self._admin() as conn:
                conn.execute("select 1")
        except psycopg.OperationalError:
            return False
        return True

    def create_database(self) -> str:
        """A new, empty database; its SQLAlchemy URL."""
        name = f"test_{next(self._names)}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database of ``url``, cutting off any connection a test left open."""
        name = url.rsplit("/", 1)[1]
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def terminate_connections(self, url: str) -> int:
        """Cut every connection to the database of ``url`` (as a restart or a failover
        does); how many there were."""
        name = url.rsplit("/", 1)[1]
        with self._admin() as conn:
            rows = conn.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s",
                (name,),
            ).fetchall()
        return len(rows)

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "server.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), then remove the directory."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=timeout_s)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: the ``postgres`` system user when we are root, else us."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise RuntimeError(
            "running as root, and PostgreSQL refuses to: a 'postgres' system user is "
            "needed to run the test server (the postgresql package creates it)"
        ) from None


def _dies_with_us() -> list[str]:
    """A prefix that stops the server (fast shutdown) if this process dies without its
    teardown (a hang ended by pytest-timeout's os._exit, a kill): util-linux's setpriv,
    where there is one."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "INT", "--"] if setpriv else []


def _as(user: pwd.struct_passwd | None) -> dict[str, Any]:
    if user is None:
        return {}
    env = {**os.environ, "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "env": env}


def _run(argv: Sequence[str], cwd: Path, user: pwd.struct_passwd | None) -> None:
    done = subprocess.run(
        argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, **_as(user)
    )
    if done.returncode != 0:
        output = done.stdout.decode(errors="replace")
        raise RuntimeError(f"{argv[0]} failed with {done.returncode}:\n{output}")
