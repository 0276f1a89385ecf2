"""Warm job processes: a job process started before its job, handed one when it is placed.

``python -m workers.job_runner --warm`` imports torch, MLflow and the job runner,
says ``ready`` on its stdout, and blocks reading one line on its stdin: the job
(its work dir and the environment the job must see, as JSON). It then applies
that environment, moves to the work dir, sends its stdout and stderr to the job's
``output.log`` and runs the job runner's ``main`` as a cold job process would.
Nothing may start CUDA while the process waits: ``CUDA_VISIBLE_DEVICES`` and
``CUDA_DEVICE_ORDER`` are read when CUDA starts, so they take effect only because
the job's are set first. (OpenMP and MKL read their thread variables when torch
loads; the job runner sets torch's threads from the job's CPUs itself.)

A warm process runs one job and is never reused. Its stdin closing before a job
came (its owner went away) ends it. Stdlib only: the actor that owns it imports
this without torch.

Example::

    proc = spawn(Path("pool.log"), cwd=Path("/tmp"))
    if wait_ready(proc) and hand(proc, work_dir, {"CUDA_VISIBLE_DEVICES": "1"}):
        ...  # the job runs in proc
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

READY = b"ready\n"
TAKEN = b"taken\n"
TRACKING_URI_VAR = "JOBWORKER_WARM_TRACKING_URI"  # the MLflow store a warm process readies


def spawn(log_path: Path, cwd: Path, tracking_uri: str | None = None) -> subprocess.Popen[bytes]:
    """Start a warm job process; what it says before it has a job goes to ``log_path``.
    With ``tracking_uri``, it also readies MLflow's client for it (the jobs' usual one)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if tracking_uri:
        env[TRACKING_URI_VAR] = tracking_uri
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.job_runner", "--warm"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=cwd,
            start_new_session=True,  # its own process group: stop() signals the whole job
        )


def wait_ready(proc: subprocess.Popen[bytes]) -> bool:
    """Block until ``proc`` has imported everything and waits for a job; False: it died first."""
    assert proc.stdout is not None
    return proc.stdout.readline() == READY


def hand(proc: subprocess.Popen[bytes], work_dir: Path, env: Mapping[str, str]) -> bool:
    """Give ``proc`` its job: it runs in ``work_dir`` with ``env`` over its own environment.

    Whether it took it (it says so; a process that is gone, or dies first, cannot).
    Call it after :func:`wait_ready` said ready.
    """
    assert proc.stdin is not None and proc.stdout is not None
    line = json.dumps({"work_dir": str(work_dir), "env": dict(env)}).encode() + b"\n"
    try:
        with proc.stdin:
            proc.stdin.write(line)
    except BrokenPipeError:
        return False
    with proc.stdout:
        return proc.stdout.readline() == TAKEN


def wait_for_job() -> Path | None:
    """In the warm process: say ready, wait for the job, become its process; its work dir.

    None: the owner went away before handing a job.
    """
    out = sys.stdout.buffer
    out.write(READY)
    out.flush()
    line = sys.stdin.buffer.readline()
    if not line:
        return None
    job = json.loads(line)
    out.write(TAKEN)
    out.flush()
    env: dict[str, str] = job["env"]
    os.environ.update(env)
    # PYTHONPATH is read at start-up only: its entries go onto sys.path as they would have.
    entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[1:1] = [p for p in entries if p not in sys.path]
    work_dir = Path(job["work_dir"])
    os.chdir(work_dir)
    log = os.open(work_dir / "output.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    return work_dir
