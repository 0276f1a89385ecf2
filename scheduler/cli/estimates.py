"""Predicted starts and finishes as the CLI words them: ``starts in ~12 min``, ``finishes ~14:05``.

Pure: the caller passes ``now`` (and, for tests, the time zone; default: the
local one).

>>> start_text(1000.0 + 12 * 60, 1000.0)
'starts in ~12 min'
>>> run_text(1200.0, 240.0)
'runs ~20 min (±4)'
"""

from __future__ import annotations

from datetime import datetime, tzinfo
from typing import Any

NO_ESTIMATE = "no estimate yet (no finished runs of this family)"


def span_text(seconds: float) -> str:
    """A duration rounded as a person says it: ``45 s``, ``12 min``, ``2.5 h``, ``3 d``."""
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h".replace(".0 h", " h")
    return f"{s / 86400:.0f} d"


def _unit_value(seconds: float, like: float) -> str:
    """``seconds`` in the unit :func:`span_text` picks for ``like``, without the unit."""
    unit = span_text(like).split(" ")[1]
    per = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}[unit]
    value = seconds / per
    return f"{value:.1f}".removesuffix(".0") if unit == "h" else f"{value:.0f}"


def start_text(start_at: float | None, now: float) -> str:
    """When a pending job should start: ``starts in ~12 min``, ``should start now``."""
    if start_at is None:
        return "no start within the forecast's horizon"
    if start_at <= now + 1:
        return "should start now"
    return f"starts in ~{span_text(start_at - now)}"


def run_text(duration_s: float, spread_s: float | None) -> str:
    """A predicted run time and its ``±``, in one unit: ``runs ~20 min (±4)``."""
    spread = f" (±{_unit_value(spread_s, duration_s)})" if spread_s else ""
    return f"runs ~{span_text(duration_s)}{spread}"


def clock_text(at: float, now: float, tz: tzinfo | None = None) -> str:
    """``14:05`` today, ``Dec 06 14:05`` on another day (local time unless ``tz``)."""
    moment = datetime.fromtimestamp(at, tz).astimezone(tz)
    today = datetime.fromtimestamp(now, tz).astimezone(tz).date()
    return moment.strftime("%H:%M" if moment.date() == today else "%b %d %H:%M")


def estimate_text(prediction: dict[str, Any] | None, now: float, tz: tzinfo | None = None) -> str:
    """A pending or running job's ``prediction`` (``GET /jobs/{id}``) in words.

    >>> estimate_text({"samples": 0, "start_at": 5.0, "end_at": None}, 0.0)
    'no estimate yet (no finished runs of this family)'
    """
    if prediction is None or not prediction.get("samples"):
        return NO_ESTIMATE
    parts = []
    start_at = prediction.get("start_at")
    if start_at is not None and start_at > now:
        parts.append(start_text(start_at, now))
    if prediction.get("duration_s") is not None:
        parts.append(run_text(prediction["duration_s"], prediction.get("spread_s")))
    end_at = prediction.get("end_at")
    parts.append(f"finishes ~{clock_text(end_at, now, tz)}" if end_at is not None else "")
    return ", ".join(p for p in parts if p)
