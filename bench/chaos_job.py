"""The job bench/chaos.py runs: count steps, checkpoint, resume; fail on purpose if told.

``config``: ``steps``, ``step_s`` (sleep per step), ``checkpoint_every``, and
``fail_at`` (a step at which the job's own code raises: a failure that is the
job's fault, which the bench expects to end FAILED).
"""

from __future__ import annotations

import time
from typing import Any

from jobs.context import JobContext, StopRequested


def count(ctx: JobContext, config: dict[str, Any]) -> None:
    restored = ctx.load_checkpoint()
    start = restored[1] + 1 if restored else 1
    every = int(config.get("checkpoint_every", 5))
    fail_at = config.get("fail_at")
    for step in range(start, int(config["steps"]) + 1):
        if fail_at is not None and step == int(fail_at):
            raise RuntimeError(f"chaos_job: failing at step {step}, as configured")
        ctx.log_metrics({"counted": float(step)}, step=step)
        if step % every == 0:
            ctx.save_checkpoint({"step": step}, step=step)
        if ctx.should_stop():
            ctx.save_checkpoint({"step": step}, step=step)
            raise StopRequested
        time.sleep(float(config.get("step_s", 0.05)))
