"""The SLO guard's throttles on each job's MLflow run: :class:`MlflowThrottleLog`.

Implements :class:`~workers.interface.throttles.ThrottleLog`: ``record`` queues,
and one writer thread sends what has queued, one ``log_batch`` per run (its
throttle count tag and the throttled metric's points). A call that fails
(MLflow down) is logged and its points dropped: the job's store history keeps
every throttle all the same.

Example::

    log = MlflowThrottleLog("http://127.0.0.1:5000")
    log.record(run_id, throttled=True, throttles=1, at_s=time.time())
    log.close()
"""

from __future__ import annotations

import logging
import queue
import threading

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from workers.interface.throttles import THROTTLED_METRIC, THROTTLES_TAG

log = logging.getLogger(__name__)

_Entry = tuple[str, bool, int, float]


class MlflowThrottleLog:
    def __init__(self, tracking_uri: str) -> None:
        self._client = MlflowClient(tracking_uri)
        self._queue: queue.Queue[_Entry | None] = queue.Queue()
        self._thread = threading.Thread(
            target=self._run, name="jobworker-throttle-log", daemon=True
        )
        self._thread.start()

    def record(self, run_id: str, throttled: bool, throttles: int, at_s: float) -> None:
        self._queue.put((run_id, throttled, throttles, at_s))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            entries = [e for e in batch if e is not None]
            self._write(entries)
            if len(entries) < len(batch):
                return

    def _write(self, entries: list[_Entry]) -> None:
        by_run: dict[str, list[_Entry]] = {}
        for entry in entries:
            by_run.setdefault(entry[0], []).append(entry)
        for run_id, points in by_run.items():
            metrics = [
                Metric(THROTTLED_METRIC, 1.0 if paused else 0.0, int(at_s * 1000), count)
                for _, paused, count, at_s in points
            ]
            tags = [RunTag(THROTTLES_TAG, str(max(count for _, _, count, _ in points)))]
            try:
                self._client.log_batch(run_id, metrics=metrics, tags=tags)
            except Exception as exc:
                log.warning("throttles of run %s not written to MLflow: %s", run_id, exc)
