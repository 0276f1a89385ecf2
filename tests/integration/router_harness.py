"""The router's test harness: real replicas (``ChannelServer``s on 127.0.0.1, in this
process) and bounded waits, shared by ``test_router.py`` and ``test_router_failures.py``.

A replica's handler records the rows of every batch it gets and can be held
(it blocks on an event) to keep the replica "busy"; tests wait for a handler to
be entered rather than sleep. Every wait is bounded by ``GUARD_S``, so a hang
fails the test instead of stalling the suite; no assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.realtime.metrics import ServingMetrics
from scheduler.realtime.router import Prediction, ReplicaEndpoint, RouteConfig, RouteLoad, Router
from workers.interface.channel import ChannelServer, new_secret
from workers.interface.errors import DeploymentNotFound, PredictError

MODEL = "mlp"
GUARD_S = 5.0  # a bound on every wait: reaching it means a hang, and the test fails
T = TypeVar("T")


def double_plus_one(x: np.ndarray) -> np.ndarray:
    """The default model: row-wise, so a request's rows of a batch equal it applied alone."""
    return x * 2 + 1


class Replica:
    """A real replica: a started ``ChannelServer`` whose handler can be held busy."""

    def __init__(
        self,
        replica_id: str,
        entries: queue.Queue[Replica],
        fn: Callable[[np.ndarray], np.ndarray],
        delay_s: float,
    ) -> None:
        self.replica_id = replica_id
        self.batches: list[int] = []  # rows of each handler call, in order
        self._entries = entries
        self._fn = fn
        self._delay_s = delay_s
        self._open = threading.Event()
        self._open.set()
        self.secret = new_secret()
        self.server = ChannelServer(self._handle, secret=self.secret)
        self.server.start()

    def _handle(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        self._entries.put(self)
        if not self._open.wait(GUARD_S):
            raise RuntimeError("held for too long")
        if self._delay_s:
            time.sleep(self._delay_s)  # the model's compute time
        return self._fn(x)

    def hold(self) -> None:
        """From now on the handler blocks until :meth:`release`."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def kill(self) -> None:
        """Stop the replica: its connection drops, whatever it is computing."""
        self.server.close()

    def endpoint(
        self, shape: tuple[int, ...] | None = None, dtype: str | None = None
    ) -> ReplicaEndpoint:
        host, port = self.server.address
        return ReplicaEndpoint(
            replica_id=self.replica_id,
            host=host,
            port=port,
            model_name=MODEL,
            model_version="3",
            run_id="run-abc",
            input_shape=shape,
            input_dtype=dtype,
            secret=self.secret,
        )


class Pool:
    """Factory of replicas sharing one log of handler entries, closed after the test."""

    def __init__(self) -> None:
        self.entries: queue.Queue[Replica] = queue.Queue()
        self.replicas: list[Replica] = []

    def __call__(
        self,
        replica_id: str,
        fn: Callable[[np.ndarray], np.ndarray] = double_plus_one,
        delay_s: float = 0.0,
    ) -> Replica:
        replica = Replica(replica_id, self.entries, fn, delay_s)
        self.replicas.append(replica)
        return replica

    async def next_entry(self) -> Replica:
        """The replica whose handler is entered next (waits for it)."""
        return await asyncio.to_thread(self.entries.get, True, GUARD_S)

    def close(self) -> None:
        for replica in self.replicas:
            replica.release()
            replica.kill()


def open_pool() -> Iterator[Pool]:
    """The body of each test module's ``pool`` fixture."""
    made = Pool()
    yield made
    made.close()


def no_leftover_threads() -> Iterator[None]:
    """Every replica thread (accept loop, one per connection) is gone after the test."""
    before = set(threading.enumerate())
    yield
    pause = threading.Event()
    for _ in range(200):
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        pause.wait(0.01)
    pytest.fail(f"threads left running: {extra}")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 4 * GUARD_S)

    return asyncio.run(bounded())


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for progress made by the event loop or the replicas' threads."""
    deadline = time.monotonic() + GUARD_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def bounded(awaitable: Awaitable[T]) -> T:
    """``awaitable`` within ``GUARD_S``: a result that only a timeout would give fails."""
    return await asyncio.wait_for(awaitable, GUARD_S)


async def refusal(awaitable: Awaitable[Any]) -> PredictError:
    with pytest.raises(PredictError) as info:
        await bounded(awaitable)
    return info.value


@contextlib.asynccontextmanager
async def routing(
    replicas: list[Replica],
    endpoints: list[ReplicaEndpoint] | None = None,
    metrics: ServingMetrics | None = None,
    **config: Any,
) -> AsyncIterator[Router]:
    """A router bound to the running loop, routing ``MODEL`` to ``replicas`` (all ready)."""
    router = Router(metrics or ServingMetrics())
    router.bind(asyncio.get_running_loop())
    settings: dict[str, Any] = {
        "max_batch_size": 8,
        "max_wait_ms": 0.0,
        "slo_p99_ms": 1e6,
        "max_queue": 1000,
    }
    router.configure(RouteConfig(MODEL, **(settings | config)))
    router.set_replicas(MODEL, endpoints or [r.endpoint() for r in replicas])
    await until(lambda: router.load(MODEL).ready_replicas == len(replicas), "replicas ready")
    try:
        yield router
    finally:
        for replica in replicas:
            replica.release()
        router.remove(MODEL)
        await until(lambda: router.load(MODEL) == RouteLoad(0, 0, None, 0), "route removed")
        await asyncio.sleep(0.01)  # the closed transports go on the next loop turns


def rows(value: float, n: int = 1, width: int = 4) -> np.ndarray:
    return np.full((n, width), value, dtype=np.float32)


def spawn(router: Router, inputs: np.ndarray) -> asyncio.Task[Prediction]:
    return asyncio.get_running_loop().create_task(router.predict(MODEL, inputs))


def known(router: Router) -> bool:
    try:
        router.schema(MODEL)
    except DeploymentNotFound:
        return False
    return True


def sample(metrics: ServingMetrics, name: str, **labels: str) -> float:
    """The value of the sample ``name`` for ``MODEL`` (and ``labels``) in the text format."""
    text = metrics.render().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == {"model": MODEL, **labels}:
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")
