"""The training script both paths of ``bench/dispatch.py`` run: a few steps of the zoo's mlp.

On its first optimizer step it appends one JSON line to the output file::

    {"tag": "jw-3", "first_step_at": 1700000000.123, "proc_started_at": ..., "entered_at": ...}

``first_step_at`` is what the benchmark measures; the other timestamps (the
process's creation time and when :func:`train_steps` was entered) split the
dispatch latency into "start a process" and "get to user code" for the report.

As a jobworker entrypoint (``entrypoint: bench.dispatch_train:main``, with
``config: {out: PATH, tag: TAG}``)::

    main(ctx, {"out": "/tmp/first_steps.jsonl", "tag": "jw-0"})

As a plain script (what Ray Jobs runs)::

    python bench/dispatch_train.py --out /tmp/first_steps.jsonl --tag ray-0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make ``jobs`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.context import JobContext
from jobs.zoo import build_model, example_input

DEFAULT_STEPS = 5


def train_steps(
    out: Path, tag: str, steps: int = DEFAULT_STEPS, ctx: JobContext | None = None
) -> None:
    """Train the default mlp for ``steps`` steps; record the first step's wall time in ``out``.

    ``ctx`` (when run by jobworker) receives the loss of every step, as a real job would.
    """
    entered_at = time.time()
    torch.manual_seed(0)
    model = build_model("mlp", {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs = example_input("mlp", {}, batch=32)
    targets = torch.randint(0, 10, (32,))
    for step in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        if step == 0:
            _record(out, tag, first_step_at=time.time(), entered_at=entered_at)
        if ctx is not None:
            ctx.log_metrics({"loss": float(loss)}, step=step)


def process_started_at() -> float | None:
    """This process's creation time on the ``time.time()`` clock, to ~10 ms; None off Linux.

    ``psutil.Process().create_time()`` adds the boot time, which ``/proc/stat``
    gives in whole seconds: up to a second off. The start tick in
    ``/proc/self/stat`` counts from boot on ``CLOCK_BOOTTIME``, so it is
    converted through that clock instead.
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after "comm"
        since_boot_s = time.clock_gettime(time.CLOCK_BOOTTIME)
        now_s = time.time()
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return now_s - (since_boot_s - start_ticks / os.sysconf("SC_CLK_TCK"))


def _record(out: Path, tag: str, *, first_step_at: float, entered_at: float) -> None:
    """Append this run's timestamps as one JSON line (one short write: atomic for O_APPEND)."""
    line = json.dumps(
        {
            "tag": tag,
            "first_step_at": first_step_at,
            "entered_at": entered_at,
            "proc_started_at": process_started_at(),
            "pid": os.getpid(),
        }
    )
    with out.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def main(ctx: JobContext, config: Mapping[str, Any]) -> None:
    """The jobworker entrypoint: ``config`` holds ``out``, ``tag`` and optionally ``steps``."""
    train_steps(
        Path(config["out"]), str(config["tag"]), int(config.get("steps", DEFAULT_STEPS)), ctx
    )


def cli(argv: list[str] | None = None) -> int:
    """The script entry (Ray Jobs): ``--out PATH --tag TAG [--steps N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    args = parser.parse_args(argv)
    train_steps(args.out, args.tag, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
