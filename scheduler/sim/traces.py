"""Job traces for the simulator: the Microsoft Philly trace as preprocessed by Pollux.

The CSV (``shared/traces/philly_pollux.csv``; see ``shared/traces/README.md``)
has the columns ``timestamp`` (submit time, ``YYYY-MM-DD HH:MM:SS``),
``duration`` (run seconds), ``num_gpus``, ``gpu_time`` and ``cluster`` (a
hashed virtual-cluster id); its rows are not sorted. :func:`read_philly`
keeps one cluster's jobs (or all), drops jobs with fewer than 1 or more than
``max_gpus`` GPUs, sorts by submit time (ties in file order), takes the first
``jobs`` and makes submit times relative to the first of them.

**GPU memory rule.** The trace has no memory figures, so each job gets a
per-GPU memory request drawn from :data:`MEMORY_GIB_BY_SIZE`, a small table
of typical needs keyed by job size (larger data-parallel jobs tend to train
larger models): 1 GPU mostly 8-24 GiB (fine-tunes, CNNs), 2-4 GPUs 16-40 GiB,
8 or more 24-76 GiB. The draw uses ``random.Random(f"{seed}:{job_id}")``, so
a job's request depends only on the seed and its own id: not on how many jobs
are read nor on the filters.

>>> MEMORY_GIB_BY_SIZE[0][0]
1
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from workers.interface.telemetry import GIB

COLUMNS = ("timestamp", "duration", "num_gpus", "cluster")

MEMORY_GIB_BY_SIZE: tuple[tuple[int, tuple[int, ...], tuple[float, ...]], ...] = (
    # (smallest job size in GPUs, per-GPU GiB choices, their weights)
    (1, (8, 16, 24, 40), (0.35, 0.35, 0.20, 0.10)),
    (2, (16, 24, 40, 64), (0.30, 0.30, 0.30, 0.10)),
    (8, (24, 40, 64, 76), (0.20, 0.40, 0.30, 0.10)),
)
"""The GPU memory rule's table (see the module docstring)."""


class TraceError(ValueError):
    """The trace cannot be used as asked: a bad row, a missing column, an unknown cluster."""


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One job of a trace: ``gpus`` in total, ``gpu_memory_bytes`` per GPU.

    >>> TraceJob("6c71a0-00002", 0.0, 3600.0, 4, 16 * GIB, "6c71a0").gpus
    4
    """

    job_id: str
    submit_s: float
    duration_s: float
    gpus: int
    gpu_memory_bytes: int
    cluster: str


def memory_request_bytes(job_id: str, gpus: int, seed: int) -> int:
    """The seeded per-GPU memory request of the GPU memory rule."""
    choices, weights = MEMORY_GIB_BY_SIZE[0][1], MEMORY_GIB_BY_SIZE[0][2]
    for smallest, c, w in MEMORY_GIB_BY_SIZE:
        if gpus >= smallest:
            choices, weights = c, w
    rng = random.Random(f"{seed}:{job_id}")
    return rng.choices(choices, weights)[0] * GIB


def _parse_time(text: str, line: int) -> float:
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
    except ValueError as exc:
        raise TraceError(f"line {line}: bad timestamp {text!r}") from exc


def read_philly(
    path: Path,
    cluster: str | None = None,
    jobs: int | None = None,
    max_gpus: int = 16,
    seed: int = 0,
) -> list[TraceJob]:
    """Read, filter and sort the Philly CSV (see the module docstring).

    Raises ``OSError`` when the file cannot be read and :class:`TraceError`
    for a malformed file or an unknown ``cluster`` id.
    """
    rows: list[tuple[float, int, float, int, str]] = []  # submit, line, duration, gpus, cluster
    clusters: set[str] = set()
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise TraceError(f"{path}: missing column(s) {', '.join(missing)}")
        for line, row in enumerate(reader, start=2):
            if not any((v or "").strip() for v in row.values()):
                continue  # a blank line
            vc = (row["cluster"] or "").strip()
            clusters.add(vc)
            if cluster is not None and vc != cluster:
                continue
            try:
                duration_s, gpus = float(row["duration"]), int(row["num_gpus"])
            except (TypeError, ValueError) as exc:
                raise TraceError(f"line {line}: bad duration or num_gpus") from exc
            if duration_s < 0:
                raise TraceError(f"line {line}: negative duration {duration_s}")
            if 1 <= gpus <= max_gpus:
                rows.append((_parse_time(row["timestamp"], line), line, duration_s, gpus, vc))
    if cluster is not None and cluster not in clusters:
        known = ", ".join(sorted(clusters)) or "none"
        raise TraceError(f"unknown cluster {cluster!r}; the trace has: {known}")
    rows.sort()
    if jobs is not None:
        rows = rows[: max(0, jobs)]
    first = rows[0][0] if rows else 0.0
    out = []
    for submit, line, duration_s, gpus, vc in rows:
        job_id = f"{vc}-{line:05d}"
        mem = memory_request_bytes(job_id, gpus, seed)
        out.append(TraceJob(job_id, submit - first, duration_s, gpus, mem, vc))
    return out
