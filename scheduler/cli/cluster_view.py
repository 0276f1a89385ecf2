"""The cluster and the queue as ``jobworker top`` draws them: pure rich renderables.

Each function takes the API's JSON (``GET /cluster``, ``GET /queue``) and, where time
matters, ``now``; nothing here calls the API or reads the clock. GPU dicts are read
with ``.get`` for ``replicas`` and ``holders`` (``{"kind": "job"|"replica"|"outside",
"id", "memory_bytes"}``), so an API without them still draws.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from scheduler.cli.estimates import span_text, start_text
from workers.interface.telemetry import GIB

BAR_WIDTH_CHARS = 16
HOLDER_STYLES = ("cyan", "magenta", "green", "yellow", "blue", "red")
OUTSIDE_STYLE = "grey50"
REPLICA_PREFIX = "replica:"


def holder_names(gpu: dict[str, Any]) -> list[str]:
    """Who holds a share of a GPU: its job ids, then ``replica:NAME`` per replica."""
    return [*gpu.get("jobs", []), *(REPLICA_PREFIX + name for name in gpu.get("replicas", []))]


def _holder_label(holder: dict[str, Any]) -> str:
    if holder.get("kind") == "replica":
        return REPLICA_PREFIX + str(holder.get("id"))
    if holder.get("kind") == "outside":
        return "outside"
    return str(holder.get("id"))


def _shares(gpu: dict[str, Any]) -> list[tuple[str, int]]:
    """``(label, bytes)`` per memory share; without ``holders``, the used memory as one."""
    shares = [
        (_holder_label(h), int(h["memory_bytes"]))
        for h in gpu.get("holders", [])
        if h.get("memory_bytes")
    ]
    if not shares and gpu.get("memory_used_bytes"):
        shares = [("used", int(gpu["memory_used_bytes"]))]
    return shares


def memory_bar(
    shares: list[tuple[str, int]], total_bytes: int, styles: dict[str, str], width: int
) -> Text:
    """A bar ``width`` characters wide: one coloured run per share, ∝ its bytes, then free."""
    bar = Text()
    used_chars = 0
    for label, size in shares:
        chars = min(width - used_chars, round(size / total_bytes * width)) if total_bytes else 0
        bar.append("█" * chars, style=styles.get(label, OUTSIDE_STYLE))
        used_chars += chars
    bar.append("░" * (width - used_chars), style="dim")
    return bar


def _legend_styles(cluster: dict[str, Any]) -> dict[str, str]:
    """A colour per holder, the same on every GPU it holds, in order of first appearance."""
    styles: dict[str, str] = {"outside": OUTSIDE_STYLE, "used": OUTSIDE_STYLE}
    for node in cluster.get("nodes", []):
        for gpu in node.get("gpus", []):
            for label, _ in _shares(gpu):
                if label not in styles:
                    styles[label] = HOLDER_STYLES[(len(styles) - 2) % len(HOLDER_STYLES)]
    return styles


def _gpu_type(gpu: dict[str, Any]) -> str:
    """The GPU's name without the vendor every row would repeat: ``A100-SXM4-40GB``."""
    return str(gpu.get("name") or "?").removeprefix("NVIDIA ")


def _number(value: float | None, fmt: str) -> str:
    return "?" if value is None else format(value, fmt)


def gpu_map(cluster: dict[str, Any], width: int = BAR_WIDTH_CHARS) -> Table:
    """Per node a row per GPU: memory bar by holder, used/total, util, temperature, holders."""
    styles = _legend_styles(cluster)
    table = Table(title="GPUs", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("node", "GPU", "type"):
        table.add_column(column, no_wrap=True)
    table.add_column("memory", no_wrap=True, min_width=width)
    for column in ("GiB", "util %", "°C"):
        table.add_column(column, justify="right")
    table.add_column("held by", overflow="fold")  # a narrow terminal wraps names, never cuts
    for node in cluster.get("nodes", []):
        gpus = node.get("gpus", [])
        if not gpus:
            table.add_row(node["hostname"], "-", "no GPUs", "", "", "", "", ", ".join(node["jobs"]))
        for i, gpu in enumerate(gpus):
            hostname = node["hostname"] if i == 0 else ""
            total = gpu.get("memory_total_bytes") or 0
            if not gpu.get("available", True):
                table.add_row(
                    hostname,
                    Text(f"{gpu['index']} lost", style="bold red"),
                    _gpu_type(gpu),
                    Text("unavailable", style="red"),
                    "",
                    "",
                    "",
                    ", ".join(holder_names(gpu)),
                )
                continue
            shares = _shares(gpu)
            used = gpu.get("memory_used_bytes")
            named = [label for label, _ in shares if label != "used"]
            unsized = [name for name in holder_names(gpu) if name not in named]
            held = Text(", ").join(
                [Text(label, style=styles[label]) for label in named] + list(map(Text, unsized))
            )
            table.add_row(
                hostname,
                str(gpu["index"]),
                _gpu_type(gpu),
                memory_bar(shares, total, styles, width),
                f"{_number(used and used / GIB, '.1f')}/{_number(total / GIB, '.0f')}",
                _number(gpu.get("util_pct"), ".0f"),
                _number(gpu.get("temperature_c"), ".0f"),
                held,
            )
    return table


def queue_table(entries: list[dict[str, Any]], now: float) -> Table | Text:
    """Pending jobs in scheduler order: team, priority, waiting time, reason, predicted start."""
    if not entries:
        return Text("no pending jobs", style="dim")
    table = Table(
        "#",
        "job",
        "name",
        "team",
        "prio",
        "waiting",
        "predicted start",
        "reason",
        title="queue",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for e in entries:
        start = e.get("predicted_start_at")
        table.add_row(
            str(e["position"]),
            e["job_id"],
            e["name"],
            e["team"],
            str(e["priority"]),
            span_text(now - e["submitted_at"]),
            start_text(start, now) if start is not None else "-",
            "\n".join(e["reasons"]),
        )
    return table


def frame(cluster: dict[str, Any], queue: list[dict[str, Any]], now: float) -> RenderableType:
    """One screen of ``jobworker top``: the GPU map above the queue."""
    return Group(gpu_map(cluster), queue_table(queue, now))
