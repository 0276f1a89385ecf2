"""What MLflow knows about finished runs: :class:`MlflowRunFacts`, the control plane's
:class:`~workers.interface.history.RunFactsReader`.

Per run:

* ``peak_gpu_memory_gb``: the run's ``jobworker.peak_gpu_memory_gb`` tag (the job
  process measured it, see :mod:`workers.job_runner`); else the largest value
  MLflow's system-metrics monitor logged for any GPU
  (``system/gpu_<i>_memory_usage_megabytes``, MB of 10**6 bytes: the whole
  device's use, other processes' included, so it overstates on a shared GPU);
  else unknown.
* ``steps_per_s``: from the history of the run's training metric (``loss``, else
  the first by name of the metrics it logged, system metrics aside): the steps
  between consecutive points over the seconds between them, leaving out
  pauses (a preempted job waiting in the queue: an interval over
  ``min_pause_s`` and ten times the run's median interval).

Calls: one ``search_experiments`` (paged) and one ``search_runs`` per 100 run
ids, then per run one ``get_metric_history`` (and one per GPU for the
system-metrics fallback, only when the tag is absent). A finished run never
changes: its facts are cached for the reader's life; a run still going is
read again next time. An outage (or any other failure of a call) is logged
and the answer holds what was read before it.

Example::

    facts = MlflowRunFacts("http://127.0.0.1:5000").read(["3f1c…"])
    facts["3f1c…"].steps_per_s   # 118.4
"""

from __future__ import annotations

import itertools
import logging
import statistics
from collections.abc import Iterator, Mapping, Sequence

from mlflow.entities import Metric, Run, RunStatus, ViewType
from mlflow.tracking import MlflowClient

from workers.interface.history import PEAK_GPU_MEMORY_TAG, RunFacts
from workers.interface.telemetry import GIB

log = logging.getLogger(__name__)

TRAINING_METRIC = "loss"
"""The metric whose steps are counted when a run logged it."""
_RUNS_PER_SEARCH = 100
_PAUSE_FACTOR = 10.0  # an interval this many times the median one, and over min_pause_s
_SYSTEM_GPU_MEMORY = ("system/gpu_", "_memory_usage_megabytes")


class MlflowRunFacts:
    """Reads :class:`RunFacts` from the MLflow tracking server at ``tracking_uri``."""

    def __init__(self, tracking_uri: str, *, min_pause_s: float = 30.0) -> None:
        self._client = MlflowClient(tracking_uri)
        self._uri = tracking_uri
        self._min_pause_s = min_pause_s
        self._finished: dict[str, RunFacts] = {}

    def read(self, run_ids: Sequence[str]) -> Mapping[str, RunFacts]:
        """The facts of each run found; never raises for a failing call (see the module)."""
        found = {i: self._finished[i] for i in run_ids if i in self._finished}
        wanted = sorted(set(run_ids) - set(found))
        try:
            for run in self._runs(wanted):
                facts = self._facts(run)
                found[run.info.run_id] = facts
                if RunStatus.is_terminated(RunStatus.from_string(run.info.status)):
                    self._finished[run.info.run_id] = facts
        except Exception as exc:
            log.warning(
                "run facts: MLflow at %s did not answer (%s: %s); %d of %d runs known",
                self._uri,
                type(exc).__name__,
                exc,
                len(found),
                len(set(run_ids)),
            )
        return found

    def _runs(self, run_ids: list[str]) -> Iterator[Run]:
        """``search_runs`` over every experiment, by run id, 100 ids a call."""
        if not run_ids:
            return
        experiment_ids = self._experiment_ids()
        for i in range(0, len(run_ids), _RUNS_PER_SEARCH):
            chunk = run_ids[i : i + _RUNS_PER_SEARCH]
            quoted = ", ".join(f"'{run_id}'" for run_id in chunk if run_id.isalnum())
            if not quoted:
                continue
            yield from self._client.search_runs(
                experiment_ids,
                filter_string=f"attributes.run_id IN ({quoted})",
                run_view_type=ViewType.ALL,
                max_results=len(chunk),
            )

    def _experiment_ids(self) -> list[str]:
        ids: list[str] = []
        token: str | None = None
        while True:
            page = self._client.search_experiments(view_type=ViewType.ALL, page_token=token)
            ids.extend(str(e.experiment_id) for e in page)
            token = page.token
            if not token:
                return ids

    def _facts(self, run: Run) -> RunFacts:
        run_id = run.info.run_id
        metrics = run.data.metrics
        trained = [k for k in metrics if not k.startswith(("system/", "jobworker."))]
        key = TRAINING_METRIC if TRAINING_METRIC in trained else min(trained, default=None)
        steps_per_s = None
        if key is not None:
            steps_per_s = self._steps_per_s(self._client.get_metric_history(run_id, key))
        return RunFacts(run_id, self._peak_gpu_memory_gb(run), steps_per_s)

    def _peak_gpu_memory_gb(self, run: Run) -> float | None:
        tag = run.data.tags.get(PEAK_GPU_MEMORY_TAG)
        if tag is not None:
            return float(tag)
        prefix, suffix = _SYSTEM_GPU_MEMORY
        keys = [k for k in run.data.metrics if k.startswith(prefix) and k.endswith(suffix)]
        values = [
            m.value for k in keys for m in self._client.get_metric_history(run.info.run_id, k)
        ]
        return max(values) * 1e6 / GIB if values else None

    def _steps_per_s(self, history: Sequence[Metric]) -> float | None:
        """Steps over seconds between consecutive points, pauses left out; None: too few."""
        points = sorted((m.timestamp, m.step) for m in history)
        intervals = [
            ((t1 - t0) / 1000, s1 - s0)
            for (t0, s0), (t1, s1) in itertools.pairwise(points)
            if s1 > s0
        ]
        if not intervals:
            return None
        pause_s = max(self._min_pause_s, _PAUSE_FACTOR * statistics.median(s for s, _ in intervals))
        kept = [(s, n) for s, n in intervals if s <= pause_s]
        seconds = sum(s for s, _ in kept)
        return sum(n for _, n in kept) / seconds if seconds > 0 else None
