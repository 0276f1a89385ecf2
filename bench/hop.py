"""The cost of the hop from the router to a replica, per transport.

The serving path's fixed cost is one round trip to the replica process. This
measures it for the same model (``bench/serving_model.py``, one torch thread)
and the same (rows, 64) float32 batch, sequentially from an asyncio loop
(uvloop) as the router runs:

- ``inproc``: the model called in the caller's process (no hop: the floor);
- ``channel``: jobworker's length-prefixed TCP channel (``workers/interface/channel.py``)
  to a ``ChannelServer`` in a child process;
- ``channel_unix``: the same server over its Unix socket (what a router on the replica's
  machine uses);
- ``ray_actor``: ``await actor.predict.remote(batch)`` on a local Ray actor.

    .venv/bin/python bench/hop.py [--calls 2000] [--rows 1,32]

Last line: ``RESULT hop channel_p50_us=… ray_actor_p50_us=… ray_over_channel_x=…
inproc_p50_us=… unix_p50_us=… tcp_over_unix_x=…`` (rows=1).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_model import build_model, configure_torch, example_rows

from workers.interface.channel import ChannelClient, ChannelServer, new_secret


def _model_fn() -> Callable[[np.ndarray], np.ndarray]:
    import torch

    configure_torch()
    model = build_model()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(model(torch.from_numpy(batch)).numpy())

    return run


def _serve_channel(ready: mp.Queue, unix_path: str) -> None:  # type: ignore[type-arg]
    secret = new_secret()
    server = ChannelServer(_model_fn(), secret=secret, unix_path=unix_path)
    server.start()
    ready.put((*server.address, secret))
    while True:
        time.sleep(3600)


async def _timed(call: Callable[[], Awaitable[object]], calls: int) -> list[float]:
    for _ in range(50):  # warm-up
        await call()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        out.append((time.perf_counter() - start) * 1e6)
    return out


async def _inproc(batch: np.ndarray, calls: int) -> list[float]:
    fn = _model_fn()

    async def call() -> object:
        return fn(batch)

    return await _timed(call, calls)


async def _channel(address: tuple[str, int, bytes], batch: np.ndarray, calls: int) -> list[float]:
    client = await ChannelClient.connect(*address)
    try:
        return await _timed(lambda: client.call(batch), calls)
    finally:
        client.close()


async def _channel_unix(path: str, secret: bytes, batch: np.ndarray, calls: int) -> list[float]:
    client = await ChannelClient.connect_unix(path, secret)
    try:
        return await _timed(lambda: client.call(batch), calls)
    finally:
        client.close()


async def _ray(actor: object, batch: np.ndarray, calls: int) -> list[float]:
    async def call() -> object:
        return await actor.predict.remote(batch)  # type: ignore[attr-defined]

    return await _timed(call, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rows", default="1,32")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    unix_dir = tempfile.mkdtemp(prefix="jw-hop-")
    unix_path = str(Path(unix_dir) / "channel.sock")
    server = ctx.Process(target=_serve_channel, args=(ready, unix_path), daemon=True)
    server.start()
    address = ready.get(timeout=120)

    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")  # as bench/serving.py: no starved actors
    ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")

    @ray.remote(num_cpus=0)
    class Replica:
        def __init__(self) -> None:
            self._fn = _model_fn()

        def predict(self, batch: np.ndarray) -> np.ndarray:
            return self._fn(batch)

    actor = Replica.remote()  # type: ignore[attr-defined]
    ray.get(actor.predict.remote(example_rows(1)))
    rows = [int(r) for r in args.rows.split(",")]
    p50: dict[tuple[str, int], float] = {}
    print(f"{'transport':<14}{'rows':>6}{'p50 µs':>10}{'p99 µs':>10}")
    try:
        for n in rows:
            batch = example_rows(n)
            for name, run in (
                ("inproc", _inproc(batch, args.calls)),
                ("channel", _channel(address, batch, args.calls)),
                ("channel_unix", _channel_unix(unix_path, address[2], batch, args.calls)),
                ("ray_actor", _ray(actor, batch, args.calls)),
            ):
                samples = sorted(asyncio.run(run))
                p50[(name, n)] = statistics.median(samples)
                p99 = samples[int(0.99 * (len(samples) - 1))]
                print(f"{name:<14}{n:>6}{p50[(name, n)]:>10.0f}{p99:>10.0f}")
    finally:
        ray.shutdown()
        server.kill()
        shutil.rmtree(unix_dir, ignore_errors=True)
    channel, actor_us = p50[("channel", rows[0])], p50[("ray_actor", rows[0])]
    unix = p50[("channel_unix", rows[0])]
    print(
        f"RESULT hop channel_p50_us={channel:.0f} ray_actor_p50_us={actor_us:.0f} "
        f"ray_over_channel_x={actor_us / channel:.1f} inproc_p50_us={p50[('inproc', rows[0])]:.0f} "
        f"unix_p50_us={unix:.0f} tcp_over_unix_x={channel / unix:.2f}"
    )


if __name__ == "__main__":
    main()
