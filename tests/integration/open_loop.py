"""Open-loop load for the overload test: ``python -m tests.integration.open_loop URL RATE S``.

Sends one-row predictions at a fixed rate for S seconds, whatever the answers,
from its own process (its own GIL), over raw keep-alive HTTP/1.1 connections
(a full HTTP client would itself be the bottleneck on two cores). Prints one
JSON object: status counts, 429s lacking ``Retry-After``, transport errors and
the latencies of admitted (200) requests from their scheduled send time.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

_TIMEOUT_S = 30.0
_MAX_IDLE_S = 4.0
"""A pooled connection idle this long is closed, not reused: the server (uvicorn's
keep-alive timeout, 5 s) may be closing it, and a request written as its close crosses
reads 0 bytes. That race is the client's to avoid, not an error of the server's."""

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _reusable(idle: list[tuple[Conn, float]], now: float) -> Conn | None:
    """The most recently used pooled connection the server cannot be closing."""
    while idle:
        conn, since = idle.pop()
        if not conn[0].at_eof() and now - since < _MAX_IDLE_S:
            return conn
        conn[1].close()
    return None


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, dict[str, str]]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)
    }
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers


async def main(url: str, rate: float, duration_s: float, token: str) -> dict[str, object]:
    parts = urlsplit(url)
    body = json.dumps({"inputs": [[0.5] * 64]}).encode()
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    idle: list[tuple[Conn, float]] = []  # with when each was last answered
    statuses: Counter[str] = Counter()
    missing_retry_after = 0
    latencies_ms: list[float] = []
    errors: list[str] = []

    async def one(scheduled: float) -> None:
        nonlocal missing_retry_after
        try:
            conn = _reusable(idle, time.perf_counter())
            if conn is None:
                conn = await asyncio.open_connection(parts.hostname, parts.port)
            status, headers = await asyncio.wait_for(_exchange(*conn, request), _TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            errors.append(repr(exc))
            return
        idle.append((conn, time.perf_counter()))
        statuses[str(status)] += 1
        if status == 200:
            latencies_ms.append((time.perf_counter() - scheduled) * 1000)
        elif status == 429 and "retry-after" not in headers:
            missing_retry_after += 1

    start = time.perf_counter()
    tasks = []
    n = int(rate * duration_s)
    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    for (_, writer), _ in idle:
        writer.close()
    return {
        "sent": n,
        "statuses": dict(statuses),
        "missing_retry_after": missing_retry_after,
        "errors": errors[:20],
        "error_count": len(errors),
        "latencies_ms": latencies_ms,
        "lag_s": time.perf_counter() - start - duration_s,
    }


if __name__ == "__main__":
    url, rate, duration = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    token = os.environ["JOBWORKER_TOKEN"]  # not in argv, where `ps` would show it
    print(json.dumps(asyncio.run(main(url, rate, duration, token))))
