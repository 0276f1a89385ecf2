"""The load generator of ``bench/serving.py``: a lean HTTP/1.1 keep-alive client.

Runs as its own process so that it never shares an interpreter (or a GIL) with a server::

    .venv/bin/python bench/serving_loadgen.py --port 8000 --path /predict \\
        --body-file body.json --mode closed --concurrency 32 --duration 5

and prints one JSON object (throughput, latency percentiles, status counts) on stdout.

- ``closed``: ``--concurrency`` connections, each sending the same pre-encoded request
  back-to-back. After ``--warmup`` seconds, every response completed in the next
  ``--duration`` seconds is counted; latency is send → last byte of the response.
- ``open``: arrivals at ``--rate`` req/s (Poisson, fixed seed; ``--arrivals fixed`` for
  even spacing) served by a pool of ``--connections`` keep-alive connections, one request
  in flight on each. Latency runs from the request's *scheduled* send time, so time spent
  waiting for a free connection counts (no coordinated omission). Requests still unsent
  ``--grace`` seconds after the end are counted as ``dropped``.

Only the standard library (and uvloop when installed): raw ``asyncio.open_connection``,
a request encoded once, responses parsed by status line and ``Content-Length`` (chunked
bodies are read too). Nothing here imports torch, Ray or the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONNECT_TIMEOUT_S = 10.0


class ProtocolError(Exception):
    """The server's answer is not an HTTP/1.1 response this client understands."""


@dataclass
class Recorder:
    """Outcomes of the measured requests, and 200s completed inside the measured window.

    ``window_ok`` is what throughput is computed from; in an open loop under overload it
    also counts answers to warm-up requests that a backlog delayed into the window.
    """

    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    send_lags_s: list[float] = field(default_factory=list)
    window_ok: int = 0
    last_done: float = 0.0

    def done(self, status: int, latency_s: float, measured: bool, in_window: bool) -> None:
        if in_window and status == 200:
            self.window_ok += 1
        if measured:
            self.statuses[str(status)] += 1
            if status == 200:
                self.latencies_s.append(latency_s)

    def error(self, kind: str) -> None:
        self.statuses[kind] += 1


def encode_request(
    host: str, port: int, path: str, body: bytes, headers: Sequence[str] = ()
) -> bytes:
    """The whole POST, encoded once and written as-is for every request; ``headers`` are
    extra ``Name: value`` lines (an ``Authorization`` bearer token)."""
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        + "".join(f"{h}\r\n" for h in headers)
        + "Content-Type: application/json\r\n"
        "Accept: */*\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower-case, with the colon) in a raw header block."""
    lower = head.lower()
    idx = lower.find(b"\r\n" + name)
    if idx < 0:
        return None
    start = idx + 2 + len(name)
    end = lower.find(b"\r\n", start)
    return lower[start:end].strip()


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


class Connection:
    """One keep-alive connection; ``roundtrip`` sends the request and reads the response."""

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host = host
        self.port = port
        self.request = request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.close()
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT_S
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def roundtrip(self) -> int:
        """Send the request, read the whole response, return its status code."""
        if self.writer is None:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 "):
            raise ProtocolError(head[:40])
        status = int(head[9:12])
        length = _header(head, b"content-length:")
        if length is not None:
            await self.reader.readexactly(int(length))
        elif _header(head, b"transfer-encoding:") == b"chunked":
            await _read_chunked(self.reader)
        else:
            raise ProtocolError("response has neither Content-Length nor chunked encoding")
        if _header(head, b"connection:") == b"close":
            self.close()
        return status


async def _safe_roundtrip(conn: Connection, rec: Recorder, measured: bool) -> int | None:
    """``roundtrip`` that turns failures into an ``error``/``timeout`` count and reconnects."""
    try:
        return await conn.roundtrip()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError):
        if measured:
            rec.error("error")
    except TimeoutError:
        if measured:
            rec.error("timeout")
    conn.close()
    await asyncio.sleep(0.01)  # a refused connection must not become a hot loop
    return None


# -- closed loop ---------------------------------------------------------------------------
async def _closed_worker(conn: Connection, rec: Recorder, t_measure: float, t_end: float) -> None:
    while (t0 := time.perf_counter()) < t_end:
        status = await _safe_roundtrip(conn, rec, measured=t0 >= t_measure)
        t1 = time.perf_counter()
        in_window = t_measure <= t1 <= t_end
        if status is not None:
            rec.done(status, t1 - t0, measured=in_window and t0 >= t_measure, in_window=in_window)


async def closed_loop(args: argparse.Namespace, request: bytes) -> dict[str, Any]:
    conns = [Connection(args.host, args.port, request) for _ in range(args.concurrency)]
    await asyncio.gather(*(c.connect() for c in conns))
    rec = Recorder()
    t_measure = time.perf_counter() + args.warmup
    t_end = t_measure + args.duration
    workers = [_closed_worker(c, rec, t_measure, t_end) for c in conns]
    await _run_bounded(workers, t_end + args.grace, rec)
    for c in conns:
        c.close()
    return summarize(rec, args.duration, extra={"concurrency": args.concurrency})


# -- open loop -----------------------------------------------------------------------------
def arrival_offsets(rate: float, span_s: float, kind: str, seed: int) -> list[float]:
    """Send times (seconds from start) for ``rate`` req/s over ``span_s`` seconds."""
    if kind == "fixed":
        return [i / rate for i in range(int(rate * span_s))]
    rng = random.Random(seed)
    offsets: list[float] = []
    t = rng.expovariate(rate)
    while t < span_s:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


@dataclass
class Schedule:
    """The shared arrival list; each worker claims the next unsent arrival."""

    t0: float
    offsets: list[float]
    warmup_s: float
    deadline: float
    next_index: int = 0

    def claim(self) -> float | None:
        """The next scheduled offset, or None when all are sent or the deadline passed."""
        if self.next_index >= len(self.offsets) or time.perf_counter() > self.deadline:
            return None
        offset = self.offsets[self.next_index]
        self.next_index += 1
        return offset

    def dropped(self) -> int:
        return sum(1 for o in self.offsets[self.next_index :] if o >= self.warmup_s)


async def _open_worker(conn: Connection, sched: Schedule, rec: Recorder) -> None:
    while (offset := sched.claim()) is not None:
        t_sched = sched.t0 + offset
        if (delay := t_sched - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        measured = offset >= sched.warmup_s
        t_send = time.perf_counter()
        status = await _safe_roundtrip(conn, rec, measured)
        t_done = time.perf_counter()
        if status is None:
            continue
        in_window = t_done >= sched.t0 + sched.warmup_s
        rec.done(status, t_done - t_sched, measured, in_window)
        if in_window:
            rec.last_done = max(rec.last_done, t_done)
        if measured:
            rec.send_lags_s.append(max(0.0, t_send - t_sched))


async def open_loop(args: argparse.Namespace, request: bytes) -> dict[str, Any]:
    conns = [Connection(args.host, args.port, request) for _ in range(args.connections)]
    await asyncio.gather(*(c.connect() for c in conns))
    offsets = arrival_offsets(args.rate, args.warmup + args.duration, args.arrivals, args.seed)
    t0 = time.perf_counter() + 0.05
    end = t0 + args.warmup + args.duration
    sched = Schedule(t0, offsets, args.warmup, deadline=end + args.grace)
    rec = Recorder()
    await _run_bounded([_open_worker(c, sched, rec) for c in conns], end + 2 * args.grace, rec)
    for c in conns:
        c.close()
    # Throughput over the time it really took: a backlog drained after the end still counts.
    span_s = max(args.duration, rec.last_done - (t0 + args.warmup))
    extra = {
        "rate": args.rate,
        "connections": args.connections,
        "dropped": sched.dropped(),
        "send_lag_p50_ms": percentile(sorted(rec.send_lags_s), 50) * 1e3,
    }
    return summarize(rec, span_s, extra=extra)


# -- shared --------------------------------------------------------------------------------
async def _run_bounded(workers: Sequence[Any], hard_stop: float, rec: Recorder) -> None:
    """Run the workers; those still waiting on a response at ``hard_stop`` count as timeouts."""
    tasks = [asyncio.ensure_future(w) for w in workers]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, hard_stop - time.perf_counter()))
    for task in pending:
        task.cancel()
        rec.error("timeout")
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*pending, return_exceptions=True)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(rec: Recorder, span_s: float, extra: dict[str, Any]) -> dict[str, Any]:
    lat = sorted(rec.latencies_s)
    return {
        "completed": rec.statuses.get("200", 0),
        "rps": rec.window_ok / span_s if span_s > 0 else 0.0,
        "p50_ms": percentile(lat, 50) * 1e3,
        "p95_ms": percentile(lat, 95) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        "statuses": dict(rec.statuses),
        "span_s": span_s,
        **extra,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--body-file", type=Path, required=True)
    p.add_argument("--header", action="append", default=[], help="extra 'Name: value' line")
    p.add_argument("--mode", choices=["closed", "open"], default="closed")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--arrivals", choices=["poisson", "fixed"], default="poisson")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--grace", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]]:
    """``uvloop.run`` when uvloop is installed (a cheaper client), else ``asyncio.run``."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    body = args.body_file.read_bytes()
    request = encode_request(args.host, args.port, args.path, body, args.header)
    run = closed_loop if args.mode == "closed" else open_loop
    result = _event_loop_runner()(run(args, request))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
