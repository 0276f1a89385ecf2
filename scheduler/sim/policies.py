"""The scheduling policies the trace simulator compares, as queue-policy settings.

* ``fifo``: strict arrival order; nothing passes a job that cannot start.
* ``fifo-backfill``: arrival order with EASY backfilling (what Slurm does),
  on exact run times (as if every user's time limit were exact).
* ``sjf``: shortest remaining run time first, with the same backfilling, on
  exact (oracle) run times.
* ``ours``: Tiresias-style discretized 2D-LAS: nine queues by attained
  GPU-seconds (:data:`OURS_THRESHOLDS_GPU_S`), FIFO within a queue; a job
  preempts jobs of lower queues once they have run 10 minutes since their
  last (re)start, so that a restart pays off; backfilling behind a gang that
  waits for a node. It never sees a job's run time, only the service it has
  attained. No aging: every trace job has the same priority, and a job that
  waits keeps its queue while the jobs that run sink below it.

* ``srpt``: the preemptive oracle, shortest remaining time first: the queue
  policy's ``srpt`` mode on each job's true remaining run time (restart
  included) times its GPUs, in buckets that double from one GPU-minute
  (:data:`SRPT_THRESHOLDS_GPU_S`); a job preempts one at least a bucket
  further from its end once that one has run 10 minutes, paying the same
  checkpoint loss and restart as ``ours``. The bar a predictor is held to.
* ``predictive``: ``ours``, except for the jobs whose predictions have
  earned trust (Lucid/QSSF-style, the queue policy's ``predictive`` mode):
  at submission :func:`scheduler.core.predictor.predict` answers from the
  runs of the job's family (same VC and GPU count, then same VC, then the
  cluster) that finished before it, with the median relative error of the
  predictions made for that family's recent runs (``Prediction.error``).
  A job whose family's error is at most :data:`PREDICTIVE_MAX_EST_ERROR` is
  ranked by its predicted remaining GPU-seconds (that frozen sample,
  conditioned on the time the job has held GPUs so far) in ``ours``' queues,
  as ``srpt`` is; any other job by its attained service, as ``ours``. Every
  job's prediction, trusted or not, serves the backfill reservations. When no
  family earns trust it is ``ours``; as predictions get good it becomes
  ``srpt`` on predictions. Its constants (``ours``' queues, the error bound,
  20 recent runs per family, 10 minutes' protection) were chosen on
  ``6c71a0`` only.

None of them reads a job's run time before it ends except where ``oracle``
is set (``fifo-backfill``, ``sjf``, ``srpt``).

>>> sorted(POLICIES)
['fifo', 'fifo-backfill', 'ours', 'predictive', 'sjf', 'srpt']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from scheduler.core.model import QueuePolicy

Estimates = Literal["none", "oracle", "predicted"]


@dataclass(frozen=True, slots=True)
class SimPolicy:
    """A named queue policy plus where its run-time estimates come from.

    ``oracle``: the simulator tells it each job's true remaining run time
    (restart included); ``predicted``: the remaining run time predicted by
    :mod:`scheduler.core.predictor` from the runs of the job's family that
    finished before the job was submitted; ``none``: no estimates at all.

    >>> POLICIES["sjf"].estimates
    'oracle'
    """

    name: str
    queue: QueuePolicy
    estimates: Estimates


HOUR_S = 3600.0
OURS_THRESHOLDS_GPU_S = tuple(HOUR_S * 3.0**k for k in range(-1, 8))
"""``ours``' queue boundaries: 1/3, 1, 3, 9, ..., 729 GPU-hours (geometric, ratio 3).

Chosen on ``6c71a0``'s first 2,000 jobs among ratios 2-8 and ranges; on
other windows of the trace it stays within a few percent of the best of them.
"""

SRPT_THRESHOLDS_GPU_S = tuple(60.0 * 2.0**k for k in range(24))
"""``srpt``'s buckets of remaining GPU-seconds: 1 GPU-minute, doubling."""

PREDICTIVE_MAX_EST_ERROR = 0.5
"""``predictive`` ranks a job by its prediction when its family's past predictions were
off by at most 50 % (median): on ``6c71a0`` 0.5 and 1.0 tied on real predictions
(bounds of 0.2-1.0 and none were tried); 0.5 trusts fewer families."""

POLICIES: dict[str, SimPolicy] = {
    "fifo": SimPolicy(
        "fifo",
        QueuePolicy(mode="fifo", backfill=False, preemption=False, aging_s_per_priority=None),
        estimates="none",
    ),
    "fifo-backfill": SimPolicy(
        "fifo-backfill",
        QueuePolicy(mode="fifo", backfill=True, preemption=False, aging_s_per_priority=None),
        estimates="oracle",
    ),
    "sjf": SimPolicy(
        "sjf",
        QueuePolicy(mode="sjf", backfill=True, preemption=False, aging_s_per_priority=None),
        estimates="oracle",
    ),
    "ours": SimPolicy(
        "ours",
        QueuePolicy(
            mode="las",
            backfill=True,
            preemption=True,
            aging_s_per_priority=None,
            las_thresholds_gpu_s=OURS_THRESHOLDS_GPU_S,
            min_run_s=600.0,
        ),
        estimates="none",
    ),
    "srpt": SimPolicy(
        "srpt",
        QueuePolicy(
            mode="srpt",
            backfill=True,
            preemption=True,
            aging_s_per_priority=None,
            las_thresholds_gpu_s=SRPT_THRESHOLDS_GPU_S,
            min_run_s=600.0,
        ),
        estimates="oracle",
    ),
    "predictive": SimPolicy(
        "predictive",
        QueuePolicy(
            mode="predictive",
            backfill=True,
            preemption=True,
            aging_s_per_priority=None,
            las_thresholds_gpu_s=OURS_THRESHOLDS_GPU_S,
            min_run_s=600.0,
            max_est_error=PREDICTIVE_MAX_EST_ERROR,
        ),
        estimates="predicted",
    ),
}
"""The policies ``jobworker simulate --policy`` accepts."""
