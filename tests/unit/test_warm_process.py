"""The warm process protocol (workers/warm_process.py) on a real child process: it says
ready, takes its job's environment, work dir, sys.path and output file, or ends when its
owner goes away before handing one. (The child imports only this module: no torch.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from workers.warm_process import hand, wait_ready

CHILD = """
import os, sys
from workers.warm_process import wait_for_job
work_dir = wait_for_job()
if work_dir is None:
    sys.exit(3)
print(os.environ["JOBWORKER_JOB_ID"], os.getcwd(), "extra-path" in sys.path[1], flush=True)
print("to stderr", file=sys.stderr, flush=True)
"""


def _child() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_a_warm_process_takes_its_jobs_environment_dir_and_output(tmp_path: Path) -> None:
    proc = _child()
    assert wait_ready(proc)
    assert hand(proc, tmp_path, {"JOBWORKER_JOB_ID": "j-1", "PYTHONPATH": f"extra-path:{REPO}"})
    assert proc.wait(timeout=60) == 0
    assert (tmp_path / "output.log").read_text() == f"j-1 {tmp_path} True\nto stderr\n"


def test_a_warm_process_whose_owner_leaves_ends(tmp_path: Path) -> None:
    proc = _child()
    assert wait_ready(proc)
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=60) == 3


def test_a_dead_warm_process_takes_no_job(tmp_path: Path) -> None:
    proc = _child()
    assert wait_ready(proc)
    proc.kill()
    proc.wait(timeout=60)
    assert not hand(proc, tmp_path, {"JOBWORKER_JOB_ID": "j-1"})
    assert not (tmp_path / "output.log").exists()
