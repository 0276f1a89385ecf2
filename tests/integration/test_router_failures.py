"""The router against real replicas: failures, replica set changes, load and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from scheduler.realtime.metrics import ServingMetrics
from scheduler.realtime.router import RouteConfig, RouteLoad, Router
from tests.integration.router_harness import (
    MODEL,
    Pool,
    bounded,
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
from workers.interface.errors import DeploymentNotFound


@pytest.fixture
def pool() -> Iterator[Pool]:
    yield from open_pool()


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    yield from no_leftover_threads()


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


def test_a_hung_replica_is_cut_off_and_its_requests_retried_elsewhere(pool: Pool) -> None:
    a, b = pool("a"), pool("b")

    async def main() -> None:
        # The request timeout is far beyond the guard: only the replica timeout helps.
        async with routing([a, b], replica_timeout_s=0.2, request_timeout_s=600) as router:
            a.hold()
            b.hold()
            request = spawn(router, rows(3))
            hung = await pool.next_entry()  # it never answers while the test runs
            other = b if hung is a else a
            other.release()
            prediction = await bounded(request)
            assert prediction.endpoint.replica_id == other.replica_id
            np.testing.assert_array_equal(prediction.outputs, rows(7))
            await until(lambda: hung.replica_id not in router.routed(MODEL), "hung one dropped")
            assert (await bounded(router.predict(MODEL, rows(1)))).endpoint.replica_id == (
                other.replica_id
            )

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
            await until(lambda: router.routed(MODEL) == {"a", "b"}, "both routed")
            assert router.load(MODEL).ready_replicas == 2
            assert not router.drained(MODEL, busy.replica_id)

    run(main())


def test_a_replica_removed_while_connecting_gets_no_traffic(pool: Pool) -> None:
    a, b = pool("a"), pool("b")

    async def main() -> None:
        async with routing([b]) as router:
            router.set_replicas(MODEL, [a.endpoint(), b.endpoint()])
            router.set_replicas(MODEL, [b.endpoint()])  # before a's connection is up
            # The first change connects a; the second, queued behind it, drops it again.
            await until(lambda: a.server.connections == (1, 0), "a connected, then dropped")
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
    assert sample(metrics, "jobworker_request_latency_seconds_count") == 7
    assert sample(metrics, "jobworker_batch_size_count") == 7
    assert sample(metrics, "jobworker_requests_shed_total", reason="queue_full") == 1
    assert sample(metrics, "jobworker_replicas") == 0  # after remove()
