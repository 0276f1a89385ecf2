"""The router against real replicas: ``ChannelServer``s on 127.0.0.1, in this process.

A replica's handler records the rows of every batch it gets and can be held
(it blocks on an event) to keep the replica "busy"; tests wait for a handler to
be entered rather than sleep. Every wait is bounded by ``GUARD_S``, so a hang
fails the test instead of stalling the suite; no assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.errors import DeploymentNotFound, PredictError
from scheduler.router import Router
from scheduler.routes import Prediction, ReplicaEndpoint, RouteConfig, RouteLoad
from scheduler.serving_metrics import ServingMetrics
from workers.replica_channel import ChannelServer

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
        self.server = ChannelServer(self._handle)
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


@pytest.fixture
def pool() -> Iterator[Pool]:
    made = Pool()
    yield made
    made.close()


@pytest.fixture(autouse=True)
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


# -- batching -----------------------------------------------------------------------------
def test_each_request_gets_the_model_output_of_its_own_rows(pool: Pool) -> None:
    replica = pool("a")
    inputs = [np.arange(i, i + 4 * (i % 3 + 1), dtype=np.float32).reshape(-1, 4) for i in range(30)]

    async def main() -> list[Prediction]:
        async with routing([replica], max_batch_size=8) as router:
            replica.hold()
            first = spawn(router, inputs[0])
            await pool.next_entry()
            rest = [spawn(router, x) for x in inputs[1:]]
            await until(lambda: router.load(MODEL).queue_depth == 29, "29 queued")
            replica.release()
            return await bounded(asyncio.gather(first, *rest))

    predictions = run(main())
    for x, prediction in zip(inputs, predictions, strict=True):
        np.testing.assert_array_equal(prediction.outputs, double_plus_one(x))
        assert prediction.endpoint.replica_id == "a"
    assert sum(replica.batches) == sum(len(x) for x in inputs)
    assert max(replica.batches) <= 8
    assert len(replica.batches) < len(inputs)  # the queued requests were batched


def test_at_concurrency_one_every_batch_has_one_row(pool: Pool) -> None:
    replica = pool("a")

    async def main() -> None:
        async with routing([replica], max_batch_size=32) as router:
            for i in range(10):
                prediction = await bounded(router.predict(MODEL, rows(i)))
                np.testing.assert_array_equal(prediction.outputs, rows(2 * i + 1))

    run(main())
    assert replica.batches == [1] * 10


def test_without_max_wait_a_request_that_finds_the_replica_idle_goes_alone(pool: Pool) -> None:
    replica = pool("a")

    async def main() -> None:
        async with routing([replica], max_batch_size=8, max_wait_ms=0) as router:
            await bounded(asyncio.gather(spawn(router, rows(1)), spawn(router, rows(2))))

    run(main())
    assert replica.batches == [1, 1]


def test_requests_that_arrive_while_the_replica_is_busy_form_the_next_batches(
    pool: Pool,
) -> None:
    replica = pool("a")
    max_batch = 8

    async def main() -> list[Prediction]:
        async with routing([replica], max_batch_size=max_batch) as router:
            replica.hold()
            busy = spawn(router, rows(-1))
            await pool.next_entry()
            queued = [spawn(router, rows(i)) for i in range(20)]
            await until(lambda: router.load(MODEL).queue_depth == 20, "20 queued")
            replica.release()
            await bounded(busy)
            return await bounded(asyncio.gather(*queued))

    predictions = run(main())
    assert [float(p.outputs[0, 0]) for p in predictions] == [2 * i + 1 for i in range(20)]
    after_release = replica.batches[1:]
    assert len(after_release) <= math.ceil(20 / max_batch)
    assert after_release == [8, 8, 4]


def test_max_wait_holds_a_partial_batch_to_fill_it(pool: Pool) -> None:
    replica = pool("a")

    async def main() -> None:
        # A long wait: a full batch must not sit through it.
        async with routing([replica], max_batch_size=4, max_wait_ms=60_000) as router:
            await bounded(asyncio.gather(*(spawn(router, rows(i)) for i in range(4))))
        assert replica.batches == [4]
        # A short one: the partial batch goes once it is over.
        async with routing([replica], max_batch_size=4, max_wait_ms=50) as router:
            await bounded(asyncio.gather(spawn(router, rows(1)), spawn(router, rows(2))))
        assert replica.batches == [4, 2]

    run(main())


def test_mixed_row_shapes_are_not_batched_together(pool: Pool) -> None:
    """A model without a signature accepts any width; one batch must hold one width."""
    replica = pool("a")

    async def main() -> list[Prediction]:
        async with routing([replica]) as router:
            replica.hold()
            busy = spawn(router, rows(0, width=3))
            await pool.next_entry()
            narrow, wide = spawn(router, rows(1, width=3)), spawn(router, rows(2, width=5))
            await until(lambda: router.load(MODEL).queue_depth == 2, "2 queued")
            replica.release()
            results = await bounded(asyncio.gather(busy, narrow, wide))
            after = await bounded(router.predict(MODEL, rows(3, width=3)))
            return [*results, after]

    predictions = run(main())
    assert [p.outputs.shape for p in predictions] == [(1, 3), (1, 3), (1, 5), (1, 3)]
    np.testing.assert_array_equal(predictions[2].outputs, rows(5, width=5))


# -- choosing the replica -----------------------------------------------------------------
def test_the_batch_goes_to_the_idle_replica(pool: Pool) -> None:
    a, b = pool("a"), pool("b")

    async def main() -> None:
        async with routing([a, b]) as router:
            a.hold()
            b.hold()
            first = spawn(router, rows(1))
            busy = await pool.next_entry()
            idle = b if busy is a else a
            idle.release()
            for i in range(5):
                prediction = await bounded(router.predict(MODEL, rows(i)))
                assert prediction.endpoint.replica_id == idle.replica_id
            assert busy.batches == [1]
            assert not first.done()
            busy.release()
            assert (await bounded(first)).endpoint.replica_id == busy.replica_id

    run(main())


# -- admission ----------------------------------------------------------------------------
def test_a_full_queue_is_429_with_retry_after(pool: Pool) -> None:
    replica = pool("a")
    metrics = ServingMetrics()

    async def main() -> None:
        async with routing([replica], metrics=metrics, max_batch_size=1, max_queue=3) as router:
            replica.hold()
            busy = spawn(router, rows(0))
            await pool.next_entry()
            queued = [spawn(router, rows(i)) for i in range(1, 4)]
            await until(lambda: router.load(MODEL).queue_depth == 3, "3 queued")
            error = await refusal(router.predict(MODEL, rows(9)))
            assert error.status == 429
            assert error.retry_after_s is not None and error.retry_after_s >= 1
            assert "3 requests queued (max_queue 3)" in str(error)
            replica.release()
            await bounded(asyncio.gather(busy, *queued))  # the admitted ones are served

    run(main())
    assert _sample(metrics, "jobworker_requests_shed_total", reason="queue_full") == 1


def test_slow_batches_do_not_shed_requests_that_find_a_replica_idle(pool: Pool) -> None:
    """Batches of >= 50 ms against a 110 ms SLO: an idle replica answers within it.

    (Counting a batch in flight that is not there, 2 x 50 ms, would shed them all.)
    """
    replica = pool("a", delay_s=0.05)

    async def main() -> None:
        async with routing([replica], max_batch_size=1, slo_p99_ms=110) as router:
            for i in range(4):
                await bounded(router.predict(MODEL, rows(i)))

    run(main())
    assert replica.batches == [1] * 4


def test_expected_latency_over_the_slo_is_429(pool: Pool) -> None:
    replica = pool("a", delay_s=0.05)  # so every batch takes >= 50 ms
    metrics = ServingMetrics()
    slo_ms = 260  # refused once (in flight + queued + own) x 50 ms > 260: by the 5th queued

    async def main() -> None:
        async with routing(
            [replica], metrics=metrics, max_batch_size=1, slo_p99_ms=slo_ms, max_queue=100
        ) as router:
            await bounded(router.predict(MODEL, rows(0)))  # the EWMA learns the batch time
            replica.hold()
            in_flight = spawn(router, rows(1))
            await pool.next_entry()
            queued: list[asyncio.Task[Prediction]] = []
            error: PredictError | None = None
            for i in range(10):
                task = spawn(router, rows(i))
                await asyncio.sleep(0)  # its first step: admitted (queued) or refused
                if task.done() and isinstance(task.exception(), PredictError):
                    exc = task.exception()
                    assert isinstance(exc, PredictError)
                    error = exc
                    break
                queued.append(task)
            assert error is not None, "never refused"
            assert error.status == 429
            assert error.retry_after_s is not None and error.retry_after_s >= 1
            assert "expected latency" in str(error) and f"{slo_ms} ms" in str(error)
            assert len(queued) <= 4  # 50 ms x (4 queued + 1 in flight + own) = 300 > 260
            assert router.load(MODEL).queue_depth == len(queued)
            replica.release()
            await bounded(asyncio.gather(in_flight, *queued))

    run(main())
    assert _sample(metrics, "jobworker_requests_shed_total", reason="slo") == 1


def test_no_ready_replica_is_503(pool: Pool) -> None:
    metrics = ServingMetrics()

    async def main() -> None:
        router = Router(metrics)
        router.bind(asyncio.get_running_loop())
        router.configure(RouteConfig(MODEL, 8, 0, 100, 100))
        await until(lambda: _known(router), "configured")
        error = await refusal(router.predict(MODEL, rows(1)))
        assert error.status == 503
        assert error.retry_after_s is not None and error.retry_after_s >= 1
        assert "no ready replica" in str(error)
        router.set_replicas(MODEL, [])
        await asyncio.sleep(0)
        assert (await refusal(router.predict(MODEL, rows(1)))).status == 503
        assert router.schema(MODEL) == (None, None)
        router.remove(MODEL)

    run(main())
    assert _sample(metrics, "jobworker_requests_shed_total", reason="unavailable") == 2


def test_unknown_deployment() -> None:
    async def main() -> None:
        router = Router(ServingMetrics())
        router.bind(asyncio.get_running_loop())
        with pytest.raises(DeploymentNotFound):
            await router.predict("nope", rows(1))
        with pytest.raises(DeploymentNotFound):
            router.schema("nope")
        assert router.load("nope") == RouteLoad(0, 0, None, 0)
        assert router.drained("nope", "r1")
        assert router.routed("nope") == set()

    run(main())


def test_calls_made_before_bind_take_effect_at_bind(pool: Pool) -> None:
    replica = pool("a")

    async def main() -> None:
        router = Router(ServingMetrics())
        router.configure(RouteConfig(MODEL, 8, 0, 1e6, 100))
        router.set_replicas(MODEL, [replica.endpoint((-1, 4), "float32")])
        router.bind(asyncio.get_running_loop())
        await until(lambda: router.load(MODEL).ready_replicas == 1, "ready")
        assert router.schema(MODEL) == ((-1, 4), "float32")
        await bounded(router.predict(MODEL, rows(1)))
        router.remove(MODEL)
        await until(lambda: not _known(router), "removed")
        await asyncio.sleep(0.01)

    run(main())


# -- failures -----------------------------------------------------------------------------
def test_a_model_error_is_500_and_serving_goes_on(pool: Pool) -> None:
    def picky(x: np.ndarray) -> np.ndarray:
        if (x < 0).any():
            raise ValueError("negative input")
        return x

    replica = pool("a", fn=picky)

    async def main() -> None:
        async with routing([replica]) as router:
            error = await refusal(router.predict(MODEL, rows(-1)))
            assert error.status == 500
            assert "ValueError: negative input" in str(error)
            await bounded(router.predict(MODEL, rows(1)))

    run(main())


def test_replica_death_mid_batch_is_retried_on_another_replica(pool: Pool) -> None:
    a, b = pool("a"), pool("b")

    async def main() -> None:
        async with routing([a, b]) as router:
            a.hold()
            b.hold()
            first = [spawn(router, rows(i)) for i in range(3)]
            victim = await pool.next_entry()
            survivor = b if victim is a else a
            survivor.release()
            victim.kill()
            predictions = await bounded(asyncio.gather(*first))
            for i, prediction in enumerate(predictions):
                assert prediction.endpoint.replica_id == survivor.replica_id
                np.testing.assert_array_equal(prediction.outputs, rows(2 * i + 1))
            await until(lambda: router.load(MODEL).ready_replicas == 1, "the dead one dropped")
            assert victim.replica_id not in router.routed(MODEL)
            later = await bounded(router.predict(MODEL, rows(7)))
            assert later.endpoint.replica_id == survivor.replica_id

    run(main())


def test_a_request_is_retried_once_only(pool: Pool) -> None:
    replicas = [pool("a"), pool("b"), pool("c")]

    async def main() -> None:
        async with routing(replicas) as router:
            for replica in replicas:
                replica.hold()
            request = spawn(router, rows(1))
            first = await pool.next_entry()
            first.kill()
            second = await pool.next_entry()  # the retry
            assert second is not first
            second.kill()
            error = await refusal(request)
            assert error.status == 503
            assert "died" in str(error)
            (third,) = (r for r in replicas if r not in (first, second))
            assert third.batches == []
            third.release()
            assert (await bounded(router.predict(MODEL, rows(1)))).endpoint.replica_id == (
                third.replica_id
            )

    run(main())


def test_replica_death_without_another_replica_is_503_at_once(pool: Pool) -> None:
    replica = pool("a")

    async def main() -> None:
        # The request timeout is far beyond the guard: only a prompt failure passes.
        async with routing([replica], max_batch_size=1, request_timeout_s=600) as router:
            replica.hold()
            in_flight = spawn(router, rows(0))
            await pool.next_entry()
            queued = [spawn(router, rows(i)) for i in (1, 2)]
            await until(lambda: router.load(MODEL).queue_depth == 2, "2 queued")
            replica.kill()
            error = await refusal(in_flight)
            assert error.status == 503
            assert "replica a" in str(error) and "died" in str(error)
            for task in queued:
                assert (await refusal(task)).status == 503
            later = await refusal(router.predict(MODEL, rows(3)))
            assert later.status == 503
            assert router.load(MODEL).ready_replicas == 0

    run(main())


def test_no_answer_within_the_request_timeout_is_503(pool: Pool) -> None:
    replica = pool("a")

    async def main() -> None:
        async with routing([replica], request_timeout_s=0.1) as router:
            replica.hold()
            error = await refusal(router.predict(MODEL, rows(0)))
            assert error.status == 503
            assert "no answer" in str(error)

    run(main())


def test_remove_fails_queued_requests_with_503(pool: Pool) -> None:
    replica = pool("a")

    async def main() -> None:
        router = Router(ServingMetrics())
        router.bind(asyncio.get_running_loop())
        router.configure(RouteConfig(MODEL, 1, 0, 1e6, 100, request_timeout_s=600))
        router.set_replicas(MODEL, [replica.endpoint()])
        await until(lambda: router.load(MODEL).ready_replicas == 1, "ready")
        replica.hold()
        in_flight = spawn(router, rows(0))
        await pool.next_entry()
        queued = [spawn(router, rows(i)) for i in (1, 2)]
        await until(lambda: router.load(MODEL).queue_depth == 2, "2 queued")
        router.remove(MODEL)
        for task in queued:
            error = await refusal(task)
            assert error.status == 503
            assert "was removed" in str(error)
        assert (await refusal(in_flight)).status == 503
        with pytest.raises(DeploymentNotFound):
            await router.predict(MODEL, rows(1))
        replica.release()
        await asyncio.sleep(0.01)

    run(main())


# -- replica set changes ------------------------------------------------------------------
def test_a_removed_replica_drains(pool: Pool) -> None:
    a, b = pool("a"), pool("b")

    async def main() -> None:
        async with routing([a, b]) as router:
            a.hold()
            b.hold()
            in_flight = spawn(router, rows(1))
            leaving = await pool.next_entry()
            staying = b if leaving is a else a
            staying.release()
            router.set_replicas(MODEL, [staying.endpoint()])
            await until(lambda: router.load(MODEL).ready_replicas == 1, "draining")
            assert not router.drained(MODEL, leaving.replica_id)  # its batch is in flight
            assert not router.drained(MODEL, staying.replica_id)
            for i in range(4):
                prediction = await bounded(router.predict(MODEL, rows(i)))
                assert prediction.endpoint.replica_id == staying.replica_id
            assert leaving.batches == [1]  # no new batch
            leaving.release()
            prediction = await bounded(in_flight)  # the batch in flight completes
            assert prediction.endpoint.replica_id == leaving.replica_id
            np.testing.assert_array_equal(prediction.outputs, rows(3))
            await until(lambda: router.drained(MODEL, leaving.replica_id), "drained")
            assert router.routed(MODEL) == {staying.replica_id}

    run(main())


def test_an_idle_removed_replica_is_drained_at_once(pool: Pool) -> None:
    a, b = pool("a"), pool("b")

    async def main() -> None:
        async with routing([a, b]) as router:
            router.set_replicas(MODEL, [b.endpoint()])
            await until(lambda: router.drained(MODEL, "a"), "drained")
            assert router.routed(MODEL) == {"b"}
            assert not router.drained(MODEL, "b")

    run(main())


def test_a_draining_replica_added_back_keeps_serving(pool: Pool) -> None:
    a, b = pool("a"), pool("b")

    async def main() -> None:
        async with routing([a, b]) as router:
            a.hold()
            b.hold()
            in_flight = spawn(router, rows(1))
            busy = await pool.next_entry()
            other = b if busy is a else a
            other.release()
            router.set_replicas(MODEL, [other.endpoint()])
            await until(lambda: router.load(MODEL).ready_replicas == 1, "draining")
            router.set_replicas(MODEL, [a.endpoint(), b.endpoint()])
            await until(lambda: router.load(MODEL).ready_replicas == 2, "back")
            busy.release()
            await bounded(in_flight)
            await asyncio.sleep(0.01)
            assert router.routed(MODEL) == {"a", "b"}
            assert router.load(MODEL).ready_replicas == 2
            assert not router.drained(MODEL, busy.replica_id)

    run(main())


def test_a_replica_removed_while_connecting_gets_no_traffic(pool: Pool) -> None:
    a, b = pool("a"), pool("b")

    async def main() -> None:
        async with routing([b]) as router:
            router.set_replicas(MODEL, [a.endpoint(), b.endpoint()])
            router.set_replicas(MODEL, [b.endpoint()])  # before a's connection is up
            await asyncio.sleep(0.2)  # time for a's connection to complete
            assert router.routed(MODEL) == {"b"}
            for i in range(4):
                await bounded(router.predict(MODEL, rows(i)))
        assert a.batches == []

    run(main())


# -- what the autoscaler and Prometheus read ----------------------------------------------
def test_load_reports_queue_in_flight_and_ready_replicas(pool: Pool) -> None:
    replica = pool("a")

    async def main() -> None:
        async with routing([replica], max_batch_size=2) as router:
            assert router.load(MODEL) == RouteLoad(0, 0, None, 1)
            replica.hold()
            in_flight = spawn(router, rows(0, n=2))
            await pool.next_entry()
            queued = [spawn(router, rows(i)) for i in range(3)]
            await until(lambda: router.load(MODEL).queue_depth == 3, "3 queued")
            assert router.load(MODEL) == RouteLoad(3, 2, None, 1)
            replica.release()
            await bounded(asyncio.gather(in_flight, *queued))
            load = router.load(MODEL)
            assert (load.queue_depth, load.in_flight, load.ready_replicas) == (0, 0, 1)
            assert load.p99_ms is not None and load.p99_ms > 0

    run(main())


def test_metrics_count_latencies_batches_and_shed_requests(pool: Pool) -> None:
    replica = pool("a")
    metrics = ServingMetrics()

    async def main() -> None:
        async with routing([replica], metrics=metrics, max_queue=1, max_batch_size=4) as router:
            for i in range(5):
                await bounded(router.predict(MODEL, rows(i)))
            replica.hold()
            busy = spawn(router, rows(0))
            await pool.next_entry()
            queued = spawn(router, rows(0))
            await until(lambda: router.load(MODEL).queue_depth == 1, "1 queued")
            assert (await refusal(router.predict(MODEL, rows(0)))).status == 429
            replica.release()
            await bounded(asyncio.gather(busy, queued))

    run(main())
    assert _sample(metrics, "jobworker_request_latency_seconds_count") == 7
    assert _sample(metrics, "jobworker_batch_size_count") == 7
    assert _sample(metrics, "jobworker_requests_shed_total", reason="queue_full") == 1
    assert _sample(metrics, "jobworker_replicas") == 0  # after remove()


# -- helpers ------------------------------------------------------------------------------
def _known(router: Router) -> bool:
    try:
        router.schema(MODEL)
    except DeploymentNotFound:
        return False
    return True


def _sample(metrics: ServingMetrics, name: str, **labels: str) -> float:
    """The value of the sample ``name`` for ``MODEL`` (and ``labels``) in the text format."""
    text = metrics.render().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == {"model": MODEL, **labels}:
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")
