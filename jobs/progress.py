"""Progress lines of the training loop, for the job's log (``jobworker logs``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _stdout(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


class ProgressLog:
    """Writes ``step 120/500  loss 0.4312  1,830 samples/s`` lines.

    A line is written at the first and the last step, and in between once
    ``every_steps`` steps or ``every_s`` seconds have passed since the last one,
    whichever comes first. Throughput is over the steps since the last line.

    Example::

        progress = ProgressLog(total_steps=500)
        progress.step(1, loss=2.31, samples=64)
    """

    def __init__(
        self,
        total_steps: int,
        every_steps: int = 100,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], None] = _stdout,
    ) -> None:
        self._total = total_steps
        self._every_steps = every_steps
        self._every_s = every_s
        self._clock = clock
        self._write = write
        self._last_step: int | None = None
        self._last_at = clock()
        self._samples = 0

    def step(self, step: int, loss: float, samples: int) -> None:
        """Step ``step`` (1-based) ended with ``loss`` after training on ``samples`` rows."""
        self._samples += samples
        now = self._clock()
        due = (
            self._last_step is None
            or step >= self._total
            or step - self._last_step >= self._every_steps
            or now - self._last_at >= self._every_s
        )
        if not due:
            return
        elapsed_s = now - self._last_at
        rate = f"{self._samples / elapsed_s:,.0f} samples/s" if elapsed_s > 0 else "- samples/s"
        self._write(f"step {step}/{self._total}  loss {loss:.4f}  {rate}")
        self._last_step, self._last_at, self._samples = step, now, 0
