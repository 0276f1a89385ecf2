"""The predict path: admission control, dynamic batching, least-loaded replica.

Runs on the API's event loop. Per deployment there is one queue of admitted
requests. A replica with no batch in flight takes everything queued (up to
``max_batch_size`` rows) at once, so a request that finds a replica idle goes
straight out, and what arrives while every replica is busy forms the next
batch: batching costs nothing at low load and grows with load. The batch goes
to the ready replica with the fewest outstanding rows, as one call.

Admission: a request is refused with 429 when the queue holds ``max_queue``
requests or when the expected latency — queued batches spread over the ready
replicas times the recent batch service time — exceeds 80% of ``slo.p99_ms``.
A request of more than ``max_batch_size`` times ``MAX_ROWS_FACTOR`` rows (what a
replica's channel takes in one frame) is refused with 413, once and whatever the
load: no later try could succeed, and a 429 would have a client retry it forever.

The controller (another thread) calls :meth:`Router.configure`,
:meth:`Router.set_replicas`, :meth:`Router.remove`, :meth:`Router.load` and
:meth:`Router.drained`; they are thread-safe.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from scheduler.realtime.metrics import ServingMetrics
from workers.interface.channel import MAX_ROWS_FACTOR, ChannelClient
from workers.interface.errors import DeploymentNotFound, PredictError, ReplicaGone

log = logging.getLogger(__name__)

_EWMA = 0.2  # weight of the newest batch in the service-time estimate
# The queueing estimate is a mean; admitting only up to this share of the p99 target
# leaves room for the spread of batch times around it.
_ADMIT_SHARE_OF_SLO = 0.8
_LATENCY_WINDOW_S = 10.0


@dataclass(frozen=True)
class RouteConfig:
    """What the router needs of a deployment."""

    name: str
    max_batch_size: int
    max_wait_ms: float
    slo_p99_ms: float
    max_queue: int
    team: str | None = None  # whose deployment: predict needs a token of it
    request_timeout_s: float = 30.0
    # A replica that leaves one batch unanswered this long is taken as hung: its
    # connection is closed, and its requests retried on another replica once.
    replica_timeout_s: float = 10.0

    @property
    def max_request_rows(self) -> int:
        """The most rows one predict request may hold (413 beyond): what a replica's
        channel takes in one frame, so the API never lets through what a replica drops."""
        return self.max_batch_size * MAX_ROWS_FACTOR


@dataclass(frozen=True)
class ReplicaEndpoint:
    """A ready replica, the model version it serves and its input schema."""

    replica_id: str
    host: str
    port: int
    model_name: str
    model_version: str | None
    run_id: str | None
    input_shape: tuple[int, ...] | None
    input_dtype: str | None
    secret: bytes = field(repr=False)  # what the router presents on the replica's channel
    unix_path: str | None = None  # set when the replica is on this machine: used instead of TCP


@dataclass(frozen=True)
class RouteLoad:
    """A deployment's load, as the autoscaler reads it."""

    queue_depth: int
    in_flight: int
    p99_ms: float | None
    ready_replicas: int


@dataclass(frozen=True)
class Prediction:
    outputs: np.ndarray
    endpoint: ReplicaEndpoint


@dataclass(eq=False)
class _Request:
    inputs: np.ndarray
    future: asyncio.Future[Prediction]
    enqueued_at: float
    retried: bool = False


@dataclass(eq=False)
class _Replica:
    endpoint: ReplicaEndpoint
    client: ChannelClient
    batches: int = 0  # in flight
    rows: int = 0  # in flight
    draining: bool = False

    @property
    def usable(self) -> bool:
        return not self.draining and self.client.alive


@dataclass(eq=False)
class _Route:
    config: RouteConfig
    replicas: dict[str, _Replica] = field(default_factory=dict)
    queue: deque[_Request] = field(default_factory=deque)
    queued_rows: int = 0
    batch_s: float = 0.0  # EWMA of one batch's service time
    latencies: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=4096))
    wait_timer: asyncio.TimerHandle | None = None
    switching: asyncio.Lock = field(default_factory=asyncio.Lock)
    done: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))
    misses: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    answered: int = 0
    overhead_s: float = 0.0  # p95 of recent latency beyond the estimate at admission


class Router:
    """Routes predictions of every deployment to its replicas.

    Example::

        router = Router(metrics)
        router.bind(asyncio.get_running_loop())       # at API start-up
        router.configure(RouteConfig("mlp", 32, 0, 100, 256))
        router.set_replicas("mlp", [endpoint])
        prediction = await router.predict("mlp", np.zeros((1, 64), np.float32))
    """

    def __init__(
        self, metrics: ServingMetrics, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._routes: dict[str, _Route] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._early: list[Callable[[], None]] = []  # calls made before bind()
        self._lock = threading.Lock()

    # -- control (any thread) ----------------------------------------------------------
    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loop = loop
            early, self._early = self._early, []
        for call in early:
            loop.call_soon_threadsafe(call)

    def configure(self, config: RouteConfig) -> None:
        """Create or update a deployment's route (batching, SLO, queue bound)."""
        self._call(lambda: self._configure(config))

    def set_replicas(self, name: str, endpoints: list[ReplicaEndpoint]) -> None:
        """The replicas to route to from now on; others drain and are closed."""
        self._call(lambda: self._set_replicas(name, endpoints))

    def remove(self, name: str) -> None:
        """Stop routing a deployment; queued requests fail with 503."""
        self._call(lambda: self._remove(name))

    def load(self, name: str) -> RouteLoad:
        route = self._routes.get(name)
        if route is None:
            return RouteLoad(0, 0, None, 0)
        replicas = list(route.replicas.values())
        return RouteLoad(
            queue_depth=len(route.queue),
            in_flight=sum(r.rows for r in replicas),
            p99_ms=self._p99_ms(route),
            ready_replicas=sum(1 for r in replicas if r.usable),
        )

    def drained(self, name: str, replica_id: str) -> bool:
        """True once ``replica_id`` takes no traffic and has nothing in flight."""
        route = self._routes.get(name)
        rep = route.replicas.get(replica_id) if route else None
        return rep is None

    def team(self, name: str) -> str | None:
        """The team that owns the deployment; :class:`DeploymentNotFound` if none is routed."""
        route = self._routes.get(name)
        if route is None:
            raise DeploymentNotFound(f"no deployment named {name!r}")
        return route.config.team

    def schema(self, name: str) -> tuple[tuple[int, ...] | None, str | None]:
        """The input shape and dtype that the deployment's replicas declare."""
        route = self._routes.get(name)
        if route is None:
            raise DeploymentNotFound(f"no deployment named {name!r}")
        for rep in route.replicas.values():
            if rep.usable:
                return rep.endpoint.input_shape, rep.endpoint.input_dtype
        return None, None

    def routed(self, name: str) -> set[str]:
        """Replica ids that currently receive traffic."""
        route = self._routes.get(name)
        return {r.endpoint.replica_id for r in route.replicas.values()} if route else set()

    def _call(self, fn: Callable[[], None]) -> None:
        with self._lock:
            loop = self._loop
            if loop is None:
                self._early.append(fn)
                return
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the API's loop has closed: nothing is routed any more
            log.debug("router call after the event loop closed; dropped")

    # -- control (event loop) ----------------------------------------------------------
    def _configure(self, config: RouteConfig) -> None:
        route = self._routes.get(config.name)
        if route is None:
            self._routes[config.name] = _Route(config)
        else:
            route.config = config

    def _set_replicas(self, name: str, endpoints: list[ReplicaEndpoint]) -> None:
        route = self._routes.get(name)
        if route is not None:
            asyncio.get_running_loop().create_task(self._switch(route, endpoints))

    async def _switch(self, route: _Route, endpoints: list[ReplicaEndpoint]) -> None:
        """Connect the new replicas first, then drain the old: no gap without a replica."""
        async with route.switching:
            wanted = {e.replica_id: e for e in endpoints}
            fresh = [e for rid, e in wanted.items() if rid not in route.replicas]
            clients = await asyncio.gather(*(self._connect(e) for e in fresh))
            if self._routes.get(route.config.name) is not route:  # removed meanwhile
                for client in clients:
                    if client is not None:
                        client.close()
                return
            for endpoint, client in zip(fresh, clients, strict=True):
                if client is not None:
                    route.replicas[endpoint.replica_id] = _Replica(endpoint, client)
            for rid, rep in list(route.replicas.items()):
                rep.draining = rid not in wanted  # one wanted again while draining stays
                self._retire_if_idle(route, rep)
            self._metrics.replicas(route.config.name, len(wanted))
            self._pump(route)

    async def _connect(self, endpoint: ReplicaEndpoint) -> ChannelClient | None:
        if endpoint.unix_path is not None:
            try:
                return await ChannelClient.connect_unix(endpoint.unix_path, endpoint.secret)
            except (OSError, TimeoutError) as exc:
                log.warning(
                    "cannot reach replica %s over %s (%s); trying TCP",
                    endpoint.replica_id,
                    endpoint.unix_path,
                    exc,
                )
        try:
            return await ChannelClient.connect(endpoint.host, endpoint.port, endpoint.secret)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot reach replica %s: %s", endpoint.replica_id, exc)
            return None

    def _remove(self, name: str) -> None:
        route = self._routes.pop(name, None)
        if route is None:
            return
        self._fail_queue(route, f"deployment {name!r} was removed")
        for rep in route.replicas.values():
            rep.client.close()
        self._metrics.replicas(name, 0)

    def _retire_if_idle(self, route: _Route, rep: _Replica) -> None:
        if rep.batches == 0 and (rep.draining or not rep.client.alive):
            route.replicas.pop(rep.endpoint.replica_id, None)
            rep.client.close()

    # -- the predict path (event loop) -------------------------------------------------
    async def predict(self, name: str, inputs: np.ndarray) -> Prediction:
        """Outputs for ``inputs`` (rows along axis 0), or a :class:`PredictError`."""
        route = self._routes.get(name)
        if route is None:
            raise DeploymentNotFound(f"no deployment named {name!r}")
        if len(inputs) > route.config.max_request_rows:
            cfg = route.config
            raise PredictError(
                413,
                f"inputs: {len(inputs)} rows; deployment {name!r} takes at most "
                f"{cfg.max_request_rows} per request (max_batch_size {cfg.max_batch_size} "
                f"times {MAX_ROWS_FACTOR}): split the request",
            )
        expected_s = self._admit(route, len(inputs))
        started = self._clock()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Prediction] = loop.create_future()
        request = _Request(inputs, future, started)
        route.queue.append(request)
        route.queued_rows += len(inputs)
        self._pump(route)
        timer = loop.call_later(route.config.request_timeout_s, self._expire, route, request)
        try:
            result = await future
        finally:
            timer.cancel()
        latency_s = self._clock() - started
        route.latencies.append((started, latency_s))
        # What the estimate misses (the API's own work, event-loop lag) is learnt here:
        # its 95th percentile over recent requests is added to later estimates.
        route.misses.append(max(0.0, latency_s - expected_s))
        route.answered += 1
        if route.answered % 32 == 0:
            ranked = sorted(route.misses)
            route.overhead_s = ranked[int(0.95 * (len(ranked) - 1))]
        self._metrics.observe_latency(name, latency_s)
        return result

    def _expire(self, route: _Route, request: _Request) -> None:
        """A request unanswered for ``request_timeout_s``: out of the queue, 503."""
        if request.future.done():
            return
        try:
            route.queue.remove(request)
            route.queued_rows -= len(request.inputs)
        except ValueError:
            pass  # already sent: its batch's answer, when it comes, finds the future done
        timeout_s = route.config.request_timeout_s
        request.future.set_exception(
            PredictError(
                503,
                f"no answer from deployment {route.config.name!r} within {timeout_s:g} s",
                retry_after_s=1,
            )
        )

    def _admit(self, route: _Route, rows: int) -> float:
        """Refuse the request (429, 503) or return its expected latency in seconds."""
        cfg = route.config
        usable = sum(1 for r in route.replicas.values() if r.usable)
        if usable == 0:
            self._metrics.shed(cfg.name, "unavailable")
            raise PredictError(
                503, f"deployment {cfg.name!r} has no ready replica yet", retry_after_s=2
            )
        if len(route.queue) >= cfg.max_queue:
            self._metrics.shed(cfg.name, "queue_full")
            raise PredictError(
                429,
                f"deployment {cfg.name!r} is overloaded: {len(route.queue)} requests queued "
                f"(max_queue {cfg.max_queue})",
                retry_after_s=self._drain_s(route, usable),
            )
        batches_ahead = math.ceil((route.queued_rows + rows) / cfg.max_batch_size) / usable
        # Plus the batch in flight, unless a replica is free to take this one now.
        idle = any(r.usable and r.batches == 0 for r in route.replicas.values())
        expected_s = route.batch_s * (batches_ahead + (0 if idle else 1))
        # Under load, the measured drain rate also counts what batch times miss (the
        # API's own work between batches); trust whichever estimate is worse.
        rate = self._drain_rate(route)
        if rate and not idle:
            in_flight = sum(r.rows for r in route.replicas.values())
            expected_s = max(expected_s, (route.queued_rows + in_flight + rows) / rate)
        expected_s += route.overhead_s
        expected_ms = expected_s * 1000
        # An idle route (nothing queued, a replica free) always admits: nothing is ahead to
        # shed, and only answered requests refresh an estimate that a burst inflated.
        if expected_ms > cfg.slo_p99_ms * _ADMIT_SHARE_OF_SLO and not (idle and not route.queue):
            self._metrics.shed(cfg.name, "slo")
            raise PredictError(
                429,
                f"deployment {cfg.name!r} is overloaded: expected latency {expected_ms:.0f} ms "
                f"exceeds {_ADMIT_SHARE_OF_SLO:.0%} of its p99 target of {cfg.slo_p99_ms:g} ms",
                retry_after_s=self._drain_s(route, usable),
            )
        return expected_s

    def _drain_s(self, route: _Route, usable: int) -> int:
        batches = route.queued_rows / route.config.max_batch_size / max(usable, 1)
        rate = self._drain_rate(route)
        drain = max(batches * route.batch_s, route.queued_rows / rate if rate else 0.0)
        return max(1, math.ceil(drain))

    def _drain_rate(self, route: _Route) -> float | None:
        """Rows answered per second over the last second, when there were enough batches."""
        done = route.done
        if len(done) < 3:
            return None
        horizon = self._clock() - 1.0
        recent = [(at, rows) for at, rows in done if at >= horizon]
        if len(recent) < 3:
            return None
        span = self._clock() - recent[0][0]
        return sum(rows for _, rows in recent[1:]) / span if span > 0 else None

    def _pump(self, route: _Route, waited: bool = False) -> None:
        """Send batches to idle replicas while requests are queued."""
        cfg = route.config
        while route.queue:
            rep = self._least_loaded(route)
            if rep is None:
                return
            if cfg.max_wait_ms > 0 and not waited and route.queued_rows < cfg.max_batch_size:
                wait_s = route.queue[0].enqueued_at + cfg.max_wait_ms / 1000 - self._clock()
                if wait_s > 0:
                    if route.wait_timer is None:
                        route.wait_timer = asyncio.get_running_loop().call_later(
                            wait_s, self._wait_over, route
                        )
                    return
            self._send(route, rep, self._take(route))

    def _wait_over(self, route: _Route) -> None:
        route.wait_timer = None
        self._pump(route, waited=True)

    def _least_loaded(self, route: _Route) -> _Replica | None:
        best: _Replica | None = None
        for rep in route.replicas.values():
            if rep.batches == 0 and rep.usable and (best is None or rep.rows < best.rows):
                best = rep
        return best

    def _take(self, route: _Route) -> list[_Request]:
        limit = route.config.max_batch_size
        batch = [route.queue.popleft()]
        rows = len(batch[0].inputs)
        head = batch[0].inputs
        # Rows of other shapes or dtypes (a model without a signature takes any) cannot be
        # concatenated with these: they wait for the next batch.
        while (
            route.queue
            and rows + len(route.queue[0].inputs) <= limit
            and route.queue[0].inputs.shape[1:] == head.shape[1:]
            and route.queue[0].inputs.dtype == head.dtype
        ):
            req = route.queue.popleft()
            rows += len(req.inputs)
            batch.append(req)
        route.queued_rows -= rows
        return batch

    def _send(self, route: _Route, rep: _Replica, batch: list[_Request]) -> None:
        """One call to the replica for the whole batch; answers are handed out on return."""
        inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([r.inputs for r in batch])
        rep.batches += 1
        rep.rows += len(inputs)
        answer = rep.client.submit(inputs)
        timeout_s = route.config.replica_timeout_s
        timer = asyncio.get_running_loop().call_later(timeout_s, self._hung, rep, answer, timeout_s)
        answer.add_done_callback(lambda _: timer.cancel())
        answer.add_done_callback(
            functools.partial(self._answered, route, rep, batch, len(inputs), self._clock())
        )

    @staticmethod
    def _hung(rep: _Replica, answer: asyncio.Future[np.ndarray], timeout_s: float) -> None:
        if not answer.done():
            why = f"replica {rep.endpoint.replica_id} left a batch unanswered for {timeout_s:g} s"
            log.warning("%s; closing its connection", why)
            rep.client.close(why)

    def _answered(
        self,
        route: _Route,
        rep: _Replica,
        batch: list[_Request],
        rows: int,
        started: float,
        answer: asyncio.Future[np.ndarray],
    ) -> None:
        name = route.config.name
        try:
            exc = answer.exception()
            if isinstance(exc, ReplicaGone):
                self._replica_lost(route, rep, batch, str(exc))
            elif exc is not None:
                _fail(batch, PredictError(500, f"the model of {name!r} raised {exc}"))
            else:
                now = self._clock()
                elapsed = now - started
                route.batch_s = (
                    elapsed if route.batch_s == 0 else (1 - _EWMA) * route.batch_s + _EWMA * elapsed
                )
                route.done.append((now, rows))
                self._metrics.observe_batch(name, rows)
                _deliver(batch, answer.result(), rep.endpoint)
        finally:
            rep.batches -= 1
            rep.rows -= rows
            self._retire_if_idle(route, rep)
            self._pump(route)

    def _replica_lost(self, route: _Route, rep: _Replica, batch: list[_Request], why: str) -> None:
        """Retry each request once on another replica; else fail it fast with 503."""
        others = any(r.usable and r is not rep for r in route.replicas.values())
        for req in reversed(batch):
            if others and not req.retried and not req.future.done():
                req.retried = True
                route.queue.appendleft(req)
                route.queued_rows += len(req.inputs)
            elif not req.future.done():
                req.future.set_exception(
                    PredictError(
                        503,
                        f"replica {rep.endpoint.replica_id} of {route.config.name!r} died "
                        f"while serving this request ({why}); retry",
                        retry_after_s=1,
                    )
                )
        if not any(r.usable for r in route.replicas.values()):
            # As admission refuses new requests now, fail the queued ones at once rather
            # than after their timeout.
            self._fail_queue(
                route,
                f"replica {rep.endpoint.replica_id} of {route.config.name!r} died and no "
                "other replica is ready; retry",
            )

    def _fail_queue(self, route: _Route, why: str) -> None:
        while route.queue:
            req = route.queue.popleft()
            if not req.future.done():
                req.future.set_exception(PredictError(503, why, retry_after_s=1))
        route.queued_rows = 0

    def _p99_ms(self, route: _Route) -> float | None:
        horizon = self._clock() - _LATENCY_WINDOW_S
        recent = sorted(lat for at, lat in list(route.latencies) if at >= horizon)
        if not recent:
            return None
        return recent[min(len(recent) - 1, int(0.99 * len(recent)))] * 1000


def _deliver(batch: list[_Request], outputs: np.ndarray, endpoint: ReplicaEndpoint) -> None:
    start = 0
    for req in batch:
        end = start + len(req.inputs)
        if not req.future.done():
            req.future.set_result(Prediction(outputs[start:end], endpoint))
        start = end


def _fail(batch: list[_Request], exc: PredictError) -> None:
    for req in batch:
        if not req.future.done():
            req.future.set_exception(exc)
