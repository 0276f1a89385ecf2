"""The console's templates (Jinja2, autoescaped) and the filters they format with.

Each page is ``<page>.html``, which includes its live part ``_<page>.html``; the
same partial answers the page's ``?fragment=1`` refresh, so the first render and
every update come from one template.
"""

from __future__ import annotations

import time
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from workers.interface.telemetry import GIB

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"


def gib(value: int | None) -> str:
    """Bytes as GiB (``—`` when unknown)."""
    return "—" if value is None else f"{value / GIB:.1f} GiB"


def duration(seconds: float | None) -> str:
    """``3h 05m``, ``4m 20s``, ``12s`` (``—`` when unknown)."""
    if seconds is None:
        return "—"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def clock(at: float | None) -> str:
    """Unix seconds as ``YYYY-MM-DD HH:MM:SS`` UTC (``—`` when unknown)."""
    return "—" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))


def number(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(gib=gib, duration=duration, clock=clock, number=number)
    return env
