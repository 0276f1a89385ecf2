"""The training worker actor: one per job attempt, pinned to the node the scheduler chose.

It runs the job as a child process (``workers.job_runner``) so that the job
sees exactly the GPUs it was given (``CUDA_VISIBLE_DEVICES`` set from the
scheduler's decision, not Ray's GPU accounting), uses only its CPU threads,
has its output captured to a log file, and can be stopped for real: a
terminated process frees its memory, a Python thread would not.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import ray

from workers.files import write_json_atomic
from workers.sim_backend import remove_usage, write_usage

_LOG_CHUNK_BYTES = 1 << 20


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)  # type: ignore[call-overload]
class TrainingWorker:
    """Runs one job attempt; polled by the executor, stopped on request."""

    def __init__(self, launch: dict[str, Any], work_dir: str) -> None:
        self._launch = launch
        self._work_dir = Path(work_dir)
        self._work_dir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop_timer: threading.Timer | None = None
        self._log_sent = 0

    def start(self) -> int:
        """Start the job process; returns its pid."""
        launch = self._launch
        write_json_atomic(self._work_dir / "launch.json", launch)
        env = dict(os.environ)
        threads = str(launch["cpus"])
        env.update(
            # NVML numbers GPUs in PCI bus order; CUDA must use the same order.
            CUDA_DEVICE_ORDER="PCI_BUS_ID",
            CUDA_VISIBLE_DEVICES=",".join(str(i) for i in launch["gpu_indices"]),
            OMP_NUM_THREADS=threads,
            MKL_NUM_THREADS=threads,
            PYTHONUNBUFFERED="1",
            JOBWORKER_JOB_ID=launch["job_id"],
            # Where Ray really put this actor: lets a job (and the tests) check the pinning.
            JOBWORKER_RAY_NODE_ID=ray.get_runtime_context().get_node_id(),
        )
        if launch["world_size"] > 1:  # a gang: torch.distributed's rendezvous (jobs/distributed.py)
            rank, world = str(launch["rank"]), str(launch["world_size"])
            env.update(
                JOBWORKER_RANK=rank,
                JOBWORKER_WORLD_SIZE=world,
                RANK=rank,
                WORLD_SIZE=world,
                LOCAL_RANK="0",
                MASTER_ADDR=launch["master_addr"],
                MASTER_PORT=str(launch["master_port"]),
            )
        if launch["python_path"]:
            env["PYTHONPATH"] = os.pathsep.join(
                [*launch["python_path"], env.get("PYTHONPATH", "")]
            ).rstrip(os.pathsep)
        log = open(self._work_dir / "output.log", "ab")  # noqa: SIM115 - the child owns it
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "workers.job_runner", str(self._work_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self._work_dir,
            start_new_session=True,
        )
        log.close()
        usage_dir = launch.get("simulated_usage_dir")
        if usage_dir and launch["gpu_indices"]:
            write_usage(
                Path(usage_dir),
                launch["job_id"],
                self._proc.pid,
                list(launch["gpu_indices"]),
                int(launch["gpu_memory_bytes"]),
            )
        return self._proc.pid

    def poll(self, log_offset: int | None = None) -> dict[str, Any]:
        """State, progress, and log output from byte ``log_offset`` on.

        Without an offset (a restarted scheduler re-attaching), from where the
        previous poll's output ended, so that no log line is copied twice.
        """
        if log_offset is None:
            log_offset = self._log_sent
        proc = self._proc
        code = proc.poll() if proc else None
        logs = b""
        try:
            with open(self._work_dir / "output.log", "rb") as fh:
                fh.seek(log_offset)
                logs = fh.read(_LOG_CHUNK_BYTES)
        except FileNotFoundError:
            pass
        report: dict[str, Any] = {
            "pid": proc.pid if proc else None,
            "exit_code": code,
            "logs": logs.decode("utf-8", "replace"),
            "log_bytes": len(logs),
            "log_offset": log_offset,
            "progress": _read_json(self._work_dir / "progress.json"),
            "result": None,
        }
        self._log_sent = log_offset + len(logs)
        if code is not None:
            if self._stop_timer:
                self._stop_timer.cancel()
            report["result"] = _read_json(self._work_dir / "result.json")
            self._release_usage()
        return report

    def stop(self, grace_s: float) -> None:
        """SIGTERM now (the job checkpoints and stops), SIGKILL after ``grace_s``."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        self._stop_timer = threading.Timer(grace_s, _signal_group, (proc.pid, signal.SIGKILL))
        self._stop_timer.daemon = True
        self._stop_timer.start()

    def kill(self) -> None:
        """Kill the job process at once (the actor is going away)."""
        if self._proc is not None and self._proc.poll() is None:
            _signal_group(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._release_usage()

    def _release_usage(self) -> None:
        usage_dir = self._launch.get("simulated_usage_dir")
        if usage_dir:
            remove_usage(Path(usage_dir), self._launch["job_id"])


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
