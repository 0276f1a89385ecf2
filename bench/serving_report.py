"""What ``bench/serving.py`` prints from its rounds: a table of medians with their spread,
the targets, and the ``RESULT serving …`` line.

Pure: rows in, text out. Ratios are taken within each round (the set-ups of one round
ran minutes apart on the same machine, so they share its load), then their median and
spread over rounds are reported. A ratio whose baseline (or jobworker itself) failed to
start in some round, or answered anything but 200 at that load, is not printed: ``n/a``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

RAY_VARIANTS = ("rayserve", "rayserve-batch", "rayserve-direct")
JOBWORKER = "jobworker"
NOAUTH = "jobworker-noauth"
FASTAPI = "fastapi"


@dataclass(frozen=True)
class Load:
    """One load pattern: a closed loop at ``concurrency`` or an open loop at ``rate``."""

    mode: str
    concurrency: int = 0
    rate: float = 0.0

    @property
    def name(self) -> str:
        return f"c{self.concurrency}" if self.mode == "closed" else f"open@{self.rate:g}/s"

    def loadgen_args(self, connections: int) -> list[str]:
        if self.mode == "closed":
            return ["--mode", "closed", "--concurrency", str(self.concurrency)]
        return ["--mode", "open", "--rate", str(self.rate), "--connections", str(connections)]


@dataclass
class Row:
    """One load on one server in one round (``round_no`` from 0)."""

    server: str
    load: Load
    result: dict[str, Any]
    round_no: int = 0

    def non_200(self) -> int:
        statuses: dict[str, int] = self.result.get("statuses", {})
        bad = sum(n for status, n in statuses.items() if status != "200")
        return bad + int(self.result.get("dropped", 0))


@dataclass(frozen=True)
class Figure:
    """A median over rounds and its spread; NaN when there is none."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Figure:
        finite = [v for v in values if not math.isnan(v)]
        if not finite:
            return cls(math.nan, math.nan, math.nan)
        return cls(statistics.median(finite), min(finite), max(finite))

    def text(self, fmt: str) -> str:
        if math.isnan(self.median):
            return "n/a"
        return f"{self.median:{fmt}} ({self.low:{fmt}}-{self.high:{fmt}})"


class Report:
    """The rows of every round, and which servers failed in which round."""

    def __init__(self, rows: Sequence[Row], failed: dict[str, set[int]], rounds: int) -> None:
        self.rows = list(rows)
        self.failed = failed  # server -> rounds in which it did not start or broke down
        self.rounds = rounds

    def find(self, server: str, load: Load, round_no: int) -> Row | None:
        for row in self.rows:
            if row.server == server and row.load == load and row.round_no == round_no:
                return row
        return None

    def clean(self, server: str, load: Load, round_no: int) -> dict[str, Any] | None:
        """The result of ``server`` at ``load`` in that round, when it ran with only 200s."""
        row = self.find(server, load, round_no)
        if row is None or round_no in self.failed.get(server, set()) or row.non_200():
            return None
        return row.result

    def figure(self, server: str, load: Load, key: str) -> Figure:
        values = [r.result[key] for r in self.rows if r.server == server and r.load == load]
        return Figure.of([float(v) for v in values])

    def ratio(self, compute: Callable[[int], float | None]) -> Figure:
        """Median and spread over rounds of ``compute(round)``; NaN when any round has none."""
        values = [compute(n) for n in range(self.rounds)]
        if not values or any(v is None for v in values):
            return Figure.of([])
        return Figure.of([v for v in values if v is not None])

    def best_rayserve(self, load: Load, round_no: int) -> dict[str, Any] | None:
        """The Ray Serve variant with the most req/s in that round, if every variant that
        was run ran clean there (a failed one might have been the best)."""
        ran = {r.server for r in self.rows if r.server in RAY_VARIANTS} | {
            s for s in self.failed if s in RAY_VARIANTS
        }
        results = [self.clean(server, load, round_no) for server in sorted(ran)]
        if not results or any(r is None for r in results):
            return None
        return max((r for r in results if r is not None), key=lambda r: float(r["rps"]))


def _div(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if a is None or b is None or float(b[key]) == 0:
        return None
    return float(a[key]) / float(b[key])


def print_table(report: Report, loads: Sequence[Load], servers: Sequence[str]) -> None:
    head = (
        f"{'server':16s} {'load':12s} {'req/s median (min-max)':>24s} "
        f"{'p50 ms':>24s} {'p99 ms':>26s} {'non-200':>8s}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for server in servers:
        for load in loads:
            rows = [r for r in report.rows if r.server == server and r.load == load]
            if not rows:
                print(f"{server:16s} {load.name:12s} {'(did not run)':>24s}")
                continue
            rps, p50, p99 = (report.figure(server, load, k) for k in ("rps", "p50_ms", "p99_ms"))
            print(
                f"{server:16s} {load.name:12s} {rps.text('.0f'):>24s} {p50.text('.3f'):>24s} "
                f"{p99.text('.3f'):>26s} {sum(r.non_200() for r in rows):8d}"
            )


def result_line(report: Report) -> str:
    """The targets, then the ``RESULT serving …`` line (``nan`` where no ratio holds)."""
    c1, c32 = Load("closed", concurrency=1), Load("closed", concurrency=32)
    jw = JOBWORKER

    c32_x = report.ratio(
        lambda n: _div(report.clean(jw, c32, n), report.best_rayserve(c32, n), "rps")
    )
    c1_x = report.ratio(
        lambda n: _div(report.clean(jw, c1, n), report.clean(FASTAPI, c1, n), "p50_ms")
    )
    auth_c1 = report.ratio(
        lambda n: _div(report.clean(jw, c1, n), report.clean(NOAUTH, c1, n), "p50_ms")
    )
    auth_c32 = report.ratio(
        lambda n: _div(report.clean(jw, c32, n), report.clean(NOAUTH, c32, n), "rps")
    )
    best_p99 = Figure.of(
        [float(b["p99_ms"]) for n in range(report.rounds) if (b := report.best_rayserve(c32, n))]
    )
    jw_p99 = report.figure(jw, c32, "p99_ms")
    print(
        f"\nper-round ratios, median (min-max) over {report.rounds} rounds:\n"
        f"  c32 req/s, jobworker / best Ray Serve: {c32_x.text('.2f')}  (target >= 1.5)\n"
        f"  c32 p99 ms, jobworker {jw_p99.text('.3f')} vs best Ray Serve {best_p99.text('.3f')}"
        "  (target: no higher)\n"
        f"  c1 p50, jobworker / FastAPI: {c1_x.text('.2f')}  (target <= 1.5)"
    )
    servers = sorted({r.server for r in report.rows} | set(report.failed))
    non_200 = ",".join(
        f"{s}:{sum(r.non_200() for r in report.rows if r.server == s)}" for s in servers
    )
    failed = ",".join(sorted(report.failed)) or "none"
    return (
        f"RESULT serving c32_vs_best_rayserve_x={c32_x.median:.2f} "
        f"c1_p50_vs_fastapi_x={c1_x.median:.2f} "
        f"c32_rps={report.figure(jw, c32, 'rps').median:.0f} "
        f"c1_p50_ms={report.figure(jw, c1, 'p50_ms').median:.3f} "
        f"auth_c1_p50_x={auth_c1.median:.3f} auth_c32_rps_x={auth_c32.median:.3f} "
        f"c32_x_spread={c32_x.low:.2f}-{c32_x.high:.2f} "
        f"c1_x_spread={c1_x.low:.2f}-{c1_x.high:.2f} "
        f"c32_p99_ms={jw_p99.median:.3f} best_rayserve_c32_p99_ms={best_p99.median:.3f} "
        f"rounds={report.rounds} non200={non_200 or 'none'} failed={failed}"
    )
