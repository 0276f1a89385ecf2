"""The MLflow-backed :class:`jobs.context.JobContext` a job process runs with.

Metrics are buffered and sent with ``MlflowClient.log_batch`` from a
background thread, so a training step never waits on the tracking server
(one call costs ~70 ms; a step of a small model costs ~1 ms). Checkpoints are
written locally and uploaded as run artifacts, also in the background.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from workers.files import write_json_atomic
from workers.interface.executor import Progress

CHECKPOINT_DIR = "checkpoints"
_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class MlflowJobContext:
    """Reports one job attempt to one MLflow run and to its progress file.

    In a multi-node job only rank 0 (``leader``) records metrics and
    checkpoints; the other ranks read the same checkpoints, so all resume alike.
    """

    def __init__(
        self,
        *,
        client: MlflowClient,
        run_id: str,
        experiment_id: str,
        work_dir: Path,
        gpu_ids: tuple[int, ...],
        cpus: int,
        flush_interval_s: float = 1.0,
        leader: bool = True,
    ) -> None:
        self._leader = leader
        self._client = client
        self.run_id = run_id
        self._work_dir = work_dir
        self._gpu_ids = gpu_ids
        self._cpus = cpus
        self._stop = threading.Event()
        self._metrics: list[Metric] = []
        self._lock = threading.Lock()
        self._uploads: queue.Queue[Path] = queue.Queue()
        self._flush_interval_s = flush_interval_s
        self._closed = threading.Event()
        self._last_progress_s = 0.0
        self._progress = Progress(run_id=run_id, experiment_id=experiment_id)
        self._latest: dict[str, float] = {}  # each metric's latest value
        self._errors: list[str] = []
        self._thread = threading.Thread(target=self._background, name="mlflow-flush", daemon=True)
        self._thread.start()
        self._write_progress()

    # -- JobContext -------------------------------------------------------------------
    @property
    def device(self) -> str:
        return "cuda" if self._gpu_ids and torch.cuda.is_available() else "cpu"

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return self._gpu_ids

    @property
    def cpus(self) -> int:
        return self._cpus

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self._leader:
            return
        now_ms = int(time.time() * 1000)
        with self._lock:
            self._metrics.extend(
                Metric(key=k, value=float(v), timestamp=now_ms, step=step)
                for k, v in metrics.items()
            )
            self._latest.update({k: float(v) for k, v in metrics.items()})
            first = self._progress.first_step_at
            self._progress = self._progress.model_copy(
                update={
                    "step": step,
                    "metrics": dict(self._latest),
                    "first_step_at": now_ms / 1000 if first is None else first,
                }
            )
        if now_ms / 1000 - self._last_progress_s > 0.25:
            self._write_progress()

    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None:
        if not self._leader:
            return
        local = self._work_dir / CHECKPOINT_DIR
        local.mkdir(exist_ok=True)
        path = local / f"step-{step:09d}.pt"
        torch.save(dict(state), path)
        self._uploads.put(path)

    def load_checkpoint(self) -> tuple[dict[str, Any], int] | None:
        """The newest checkpoint uploaded to this run (a resumed run finds its own)."""
        names = [
            a.path
            for a in self._client.list_artifacts(self.run_id, CHECKPOINT_DIR)
            if a.path.endswith(".pt")
        ]
        if not names:
            return None
        newest = max(names)
        local = self._client.download_artifacts(self.run_id, newest, str(self._work_dir))
        state: dict[str, Any] = torch.load(local, map_location="cpu", weights_only=False)
        step = int(Path(newest).stem.removeprefix("step-"))
        return state, step

    def should_stop(self) -> bool:
        return self._stop.is_set()

    # -- runner side ------------------------------------------------------------------
    def request_stop(self) -> None:
        """Called from the SIGTERM handler: the loop checkpoints and stops at its next step."""
        self._stop.set()

    def close(self) -> list[str]:
        """Flush every metric and upload; returns the errors met while logging."""
        self._closed.set()
        self._thread.join()
        self._flush()
        self._drain_uploads()
        self._write_progress()
        return self._errors

    def _write_progress(self) -> None:
        with self._lock:
            progress = self._progress
        self._last_progress_s = time.time()
        write_json_atomic(self._work_dir / "progress.json", progress.model_dump(mode="json"))

    def _background(self) -> None:
        while not self._closed.wait(self._flush_interval_s):
            self._flush()
            self._drain_uploads()

    def _flush(self) -> None:
        with self._lock:
            pending, self._metrics = self._metrics, []
        for i in range(0, len(pending), _MAX_BATCH):
            try:
                self._client.log_batch(self.run_id, metrics=pending[i : i + _MAX_BATCH])
            except Exception as exc:  # tracking outage must not kill training; reported at close
                self._errors.append(f"log_batch failed: {exc}")

    def _drain_uploads(self) -> None:
        while True:
            try:
                path = self._uploads.get_nowait()
            except queue.Empty:
                return
            try:
                self._client.log_artifact(self.run_id, str(path), CHECKPOINT_DIR)
            except Exception as exc:
                self._errors.append(f"checkpoint upload failed: {exc}")
