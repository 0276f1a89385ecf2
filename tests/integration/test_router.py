"""The router against real replicas: batching, choosing a replica, admission (429, 503)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

import numpy as np
import pytest

from scheduler.realtime.metrics import ServingMetrics
from scheduler.realtime.router import Prediction, RouteConfig, RouteLoad, Router
from tests.integration.router_harness import (
    MODEL,
    Pool,
    bounded,
    double_plus_one,
    known,
    no_leftover_threads,
    open_pool,
    refusal,
    routing,
    rows,
    run,
    sample,
    spawn,
    until,
)
from workers.interface.errors import DeploymentNotFound, PredictError


@pytest.fixture
def pool() -> Iterator[Pool]:
    yield from open_pool()


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    yield from no_leftover_threads()


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
    assert sample(metrics, "jobworker_requests_shed_total", reason="queue_full") == 1


def test_slow_batches_do_not_shed_requests_that_find_a_replica_idle(pool: Pool) -> None:
    """Batches of >= 50 ms against a 124 ms SLO (admitted up to 99 ms): an idle replica
    answers within it.

    Counting a batch in flight that is not there (2 x >= 50 ms) would shed them all; the
    SLO leaves the most room below that for a slow machine's batch times.
    """
    replica = pool("a", delay_s=0.05)

    async def main() -> None:
        async with routing([replica], max_batch_size=1, slo_p99_ms=124) as router:
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
    assert sample(metrics, "jobworker_requests_shed_total", reason="slo") == 1


def test_an_idle_route_admits_even_when_its_estimate_is_over_the_slo(pool: Pool) -> None:
    replica = pool("a", delay_s=0.05)  # every batch takes >= 50 ms, over 80% of the SLO
    metrics = ServingMetrics()

    async def main() -> None:
        async with routing(
            [replica], metrics=metrics, max_batch_size=1, slo_p99_ms=40, max_queue=100
        ) as router:
            for i in range(3):  # one after another: nothing ahead of any of them
                await bounded(router.predict(MODEL, rows(i)))  # a 429 would raise

    run(main())
    assert b'reason="slo"' not in metrics.render()


def test_no_ready_replica_is_503(pool: Pool) -> None:
    metrics = ServingMetrics()

    async def main() -> None:
        router = Router(metrics)
        router.bind(asyncio.get_running_loop())
        router.configure(RouteConfig(MODEL, 8, 0, 100, 100))
        await until(lambda: known(router), "configured")
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
    assert sample(metrics, "jobworker_requests_shed_total", reason="unavailable") == 2


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
        await until(lambda: not known(router), "removed")
        await asyncio.sleep(0.01)

    run(main())
