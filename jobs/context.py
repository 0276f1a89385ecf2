"""The small object through which ML code reports to whoever runs it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class StopRequested(Exception):
    """Raised by training code that stopped early because ``should_stop()`` was true."""


class JobContext(Protocol):
    """What a training loop may ask of its runner.

    The runner (MLflow-backed in ``workers/``, in-memory in tests) decides
    where metrics and checkpoints go; the loop only calls these methods.

    Example::

        def train(ctx: JobContext, config: dict) -> torch.nn.Module:
            for step in range(ctx.start_step, 100):
                ...
                ctx.log_metrics({"loss": loss}, step=step)
                if ctx.should_stop():
                    ctx.save_checkpoint({"model": model.state_dict()}, step=step)
                    raise StopRequested
    """

    @property
    def device(self) -> str:
        """The torch device to train on: ``"cuda"`` when GPUs were assigned, else ``"cpu"``."""
        ...

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        """Physical GPU indices the scheduler gave this job (empty on CPU)."""
        ...

    @property
    def cpus(self) -> int:
        """CPU threads the job may use."""
        ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record metric values at a training step. Must be cheap: runners batch."""
        ...

    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None:
        """Persist a resumable state taken after ``step``.

        ``state`` holds tensors and plain values only (numbers, strings, bytes, None, and
        lists, tuples, sets and dicts of them): it is read back with
        ``torch.load(weights_only=True)``, which runs no code; a runner refuses anything else.
        """
        ...

    def load_checkpoint(self) -> tuple[dict[str, Any], int] | None:
        """The last saved ``(state, step)``, or ``None`` when starting fresh."""
        ...

    def should_stop(self) -> bool:
        """True once the runner asked the job to stop (cancel or preemption)."""
        ...
