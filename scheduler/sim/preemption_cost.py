"""What a preemption costs a job, as the trace simulator and the forecast both model it.

A preempted job keeps its work up to its last checkpoint (one every
``checkpoint_every_s`` seconds of progress; 0 means continuous) and pays
``restart_s`` when it runs again. One definition, so that the forecast of a
queue (``scheduler.sim.forecast``) charges what the simulator charges.

>>> saved_progress_s(0.0, 1500.0, CHECKPOINT_EVERY_S), saved_progress_s(0.0, 1500.0, 0.0)
(1200.0, 1500.0)
"""

from __future__ import annotations

import math

CHECKPOINT_EVERY_S = 600.0
"""Default seconds of progress between two checkpoints."""

RESTART_S = 30.0
"""Default seconds a preempted job takes to start again (load the checkpoint, warm up)."""


def saved_progress_s(progress_s: float, done_s: float, checkpoint_every_s: float) -> float:
    """The progress kept when a job that had ``progress_s`` saved stops at ``done_s``.

    The last checkpoint at or before ``done_s`` (checkpoints fall on multiples
    of ``checkpoint_every_s``; all of ``done_s`` when that is 0 or less), never
    less than ``progress_s``.
    """
    every = checkpoint_every_s
    saved = done_s if every <= 0 else math.floor((done_s + 1e-6) / every) * every
    return min(done_s, max(progress_s, saved))
