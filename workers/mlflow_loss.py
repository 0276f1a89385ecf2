"""A run's ``loss`` history from MLflow, cached, for the console's sparklines.

One ``get_metric_history`` per run per ``ttl_s`` at most, however often the
job page re-renders; the ``max_runs`` most recently read runs are kept. A
failing MLflow is logged and answers what was read before (or nothing).

Example::

    losses = LossHistory("http://127.0.0.1:5000")
    losses("3f1c…")   # (2.31, 1.87, 1.52, …), by step
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

METRIC = "loss"


class LossHistory:
    """``reader(run_id) -> losses by step``; see the module docstring."""

    def __init__(
        self,
        tracking_uri: str,
        ttl_s: float = 10.0,
        max_runs: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = MlflowClient(tracking_uri)
        self._ttl_s = ttl_s
        self._max_runs = max_runs
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, tuple[float, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, run_id: str) -> tuple[float, ...]:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(run_id)
            if cached is not None and now - cached[0] < self._ttl_s:
                return cached[1]
        try:
            history = self._client.get_metric_history(run_id, METRIC)
        except Exception:  # an outage, a deleted run: keep what we had
            log.warning("reading %s of run %s failed", METRIC, run_id, exc_info=True)
            values = cached[1] if cached is not None else ()
        else:
            values = tuple(m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp)))
        with self._lock:
            self._cache[run_id] = (now, values)
            self._cache.move_to_end(run_id)
            while len(self._cache) > self._max_runs:
                self._cache.popitem(last=False)
        return values
