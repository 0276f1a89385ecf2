"""bench/serving_report.py: per-round ratios, their median and spread, and no ratio against
a baseline that failed (did not start, or answered anything but 200)."""

from __future__ import annotations

import math
import re
from typing import Any

from bench.serving_report import Figure, Load, Report, Row, result_line

C1, C32 = Load("closed", concurrency=1), Load("closed", concurrency=32)


def _res(rps: float, p50_ms: float, p99_ms: float, **statuses: int) -> dict[str, Any]:
    return {
        "rps": rps,
        "p50_ms": p50_ms,
        "p95_ms": p99_ms,
        "p99_ms": p99_ms,
        "statuses": {"200": 100, **{k.lstrip("s"): v for k, v in statuses.items()}},
    }


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def _rounds(jw_rps: list[float], ray_rps: list[float]) -> list[Row]:
    rows = []
    for n, (jw, ray) in enumerate(zip(jw_rps, ray_rps, strict=True)):
        rows += [
            Row("jobworker", C32, _res(jw, 10, 20), n),
            Row("rayserve-direct", C32, _res(ray, 12, 30), n),
            Row("rayserve", C32, _res(ray / 2, 50, 90), n),
            Row("jobworker", C1, _res(500, 2.0, 3), n),
            Row("fastapi", C1, _res(900, 1.0, 2), n),
        ]
    return rows


def test_ratios_are_per_round_then_median_and_spread() -> None:
    report = Report(_rounds([3000, 2000, 4000], [1000, 2000, 1000]), {}, rounds=3)
    fields = _fields(result_line(report))
    # per round: 3.0, 1.0, 4.0 (against the best variant, rayserve-direct)
    assert fields["c32_vs_best_rayserve_x"] == "3.00"
    assert fields["c32_x_spread"] == "1.00-4.00"
    assert fields["c1_p50_vs_fastapi_x"] == "2.00"
    assert fields["c32_rps"] == "3000"
    assert fields["best_rayserve_c32_p99_ms"] == "30.000"
    assert fields["non200"] == "fastapi:0,jobworker:0,rayserve:0,rayserve-direct:0"
    assert fields["failed"] == "none"


def test_no_ratio_against_a_baseline_with_errors_or_that_did_not_start() -> None:
    rows = _rounds([3000, 3000], [1000, 1000])
    rows[1] = Row("rayserve-direct", C32, _res(1000, 12, 30, s503=4), 0)  # errors in round 0
    rows = [r for r in rows if not (r.server == "fastapi" and r.round_no == 1)]
    report = Report(rows, {"fastapi": {1}}, rounds=2)
    fields = _fields(result_line(report))
    assert fields["c32_vs_best_rayserve_x"] == "nan"
    assert fields["c1_p50_vs_fastapi_x"] == "nan"
    assert fields["non200"].split(",")[-1] == "rayserve-direct:4"
    assert fields["failed"] == "fastapi"
    assert fields["c32_rps"] == "3000"  # jobworker's own figure still stands


def test_figure_of_nothing_is_not_a_number() -> None:
    fig = Figure.of([])
    assert math.isnan(fig.median) and fig.text(".2f") == "n/a"
    assert Figure.of([3.0, 1.0, 2.0]) == Figure(2.0, 1.0, 3.0)
