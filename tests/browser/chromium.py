"""Debian's chromium, started headless by the tests and driven by Playwright over the Chrome
DevTools Protocol: no browser is downloaded at test time (CI installs the package)."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

INSTALL_HINT = (
    "the browser tests need Debian's chromium on PATH: `apt-get install -y chromium` "
    "(as root; .ci/run installs it)"
)
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def chromium_path() -> str:
    """The chromium executable on PATH; an error that says how to install it otherwise."""
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError(INSTALL_HINT)
    return path


def _read_endpoint(stderr: queue.Queue[str | None], timeout_s: float) -> str:
    """The DevTools websocket URL chromium prints on stderr once it listens."""
    seen: list[str] = []
    while True:
        try:
            line = stderr.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(
                f"chromium printed no DevTools address within {timeout_s:g} s: {seen[-5:]}"
            ) from None
        if line is None:
            raise RuntimeError(f"chromium exited before listening: {''.join(seen[-20:])}")
        seen.append(line)
        found = _LISTENING.search(line)
        if found:
            return found.group(1)


@contextlib.contextmanager
def headless_chromium(profile_dir: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """Start chromium headless with a throw-away profile; yield its DevTools websocket URL
    (for Playwright's ``connect_over_cdp``); stop it, and wait for it, on the way out.

    ``timeout_s`` only ends a hang at start-up; no test relies on how long it takes.
    """
    args = [
        chromium_path(),
        "--headless=new",
        "--remote-debugging-port=0",  # any free port: read back from stderr
        "--remote-debugging-address=127.0.0.1",
        f"--user-data-dir={profile_dir}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "about:blank",
    ]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:  # keep reading so chromium never blocks on a full pipe
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield _read_endpoint(lines, timeout_s)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=5)
