"""The router-replica data path over real loopback sockets: framing, pipelining, failures.

Each test starts its own ``ChannelServer`` on 127.0.0.1 (or a replica in a child
process, to kill it as a crashing replica dies) and drives ``ChannelClient``
with ``asyncio.run``. Every wait is bounded, so a hang fails the test instead of
stalling the suite.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from workers.interface.channel import (
    ChannelClient,
    ChannelServer,
    decode_array,
    encode_array,
    new_secret,
)
from workers.interface.errors import ReplicaFailed, ReplicaGone

REPO = Path(__file__).resolve().parents[2]
GUARD_S = 10.0  # a bound on every wait: reaching it means a hang, and the test fails
SUPPORTED = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
SECRET = new_secret()  # every server of this module's tests
T = TypeVar("T")

Handler = Callable[[np.ndarray], np.ndarray]


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, GUARD_S)

    return asyncio.run(bounded())


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equal (NaNs included), with the same dtype and shape."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    """Every server thread (accept loop, one per connection) is gone after the test."""
    before = set(threading.enumerate())
    yield
    deadline = threading.Event()
    for _ in range(200):
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        deadline.wait(0.01)
    pytest.fail(f"threads left running: {extra}")


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], ChannelServer]]:
    """Factory: a started ``ChannelServer`` for ``handler``, closed after the test."""
    servers: list[ChannelServer] = []

    def start(handler: Handler) -> ChannelServer:
        server = ChannelServer(handler, secret=SECRET)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def echo_address() -> Iterator[tuple[str, int]]:
    """One echo replica shared by the property test (hypothesis reruns the body)."""
    server = ChannelServer(lambda x: x, secret=SECRET)
    server.start()
    yield server.address
    server.close()


async def _connect(server_or_address: ChannelServer | tuple[str, int]) -> ChannelClient:
    if isinstance(server_or_address, ChannelServer):
        server_or_address = server_or_address.address
    return await ChannelClient.connect(*server_or_address, SECRET)


# -- encoding -----------------------------------------------------------------------------
arrays = st.sampled_from(SUPPORTED).flatmap(
    lambda dtype: hnp.arrays(
        dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
    )
)


@given(arrays)
def test_encode_decode_round_trip(array: np.ndarray) -> None:
    assert _same(decode_array(encode_array(array)), array)


def test_non_contiguous_arrays_travel_in_logical_order() -> None:
    array = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert _same(decode_array(encode_array(array.T)), np.ascontiguousarray(array.T))
    assert _same(decode_array(encode_array(array[:, ::2])), array[:, ::2].copy())


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(3, dtype=np.complex64),
        np.array(["a", "b"]),
        np.array([{}, None], dtype=object),
        np.zeros(3, dtype=">f4"),  # big-endian: same kind, other byte order
        np.zeros(3, dtype=np.uint32),
    ],
    ids=["complex64", "str", "object", "big-endian float32", "uint32"],
)
def test_unsupported_dtype_is_a_type_error(array: np.ndarray) -> None:
    with pytest.raises(TypeError, match="cannot travel"):
        encode_array(array)


# -- round trips over a socket ------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(arrays)
def test_round_trip_over_the_socket(echo_address: tuple[str, int], array: np.ndarray) -> None:
    async def main() -> np.ndarray:
        client = await _connect(echo_address)
        try:
            return await client.call(array)
        finally:
            client.close()

    assert _same(run(main()), array)


def test_large_array_round_trip(serve: Callable[[Handler], ChannelServer]) -> None:
    server = serve(lambda x: x * 2)
    array = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB

    async def main() -> np.ndarray:
        client = await _connect(server)
        try:
            return await client.call(array)
        finally:
            client.close()

    assert _same(run(main()), array * 2)


def test_pipelined_calls_on_one_connection_get_their_own_results(
    serve: Callable[[Handler], ChannelServer],
) -> None:
    counter = itertools.count()
    first_entered = threading.Event()
    release = threading.Event()

    def handler(x: np.ndarray) -> np.ndarray:
        call = next(counter)
        if call == 0:  # hold the first so that the others queue up behind it on the wire
            first_entered.set()
            assert release.wait(GUARD_S)
        return np.column_stack([x * 2, np.full(len(x), call, dtype=x.dtype)])

    server = serve(handler)
    inputs = [np.full((i % 3 + 1, 2), i, dtype=np.float64) for i in range(25)]

    async def main() -> list[np.ndarray]:
        client = await _connect(server)
        try:
            calls = [asyncio.ensure_future(client.call(x)) for x in inputs]
            assert await asyncio.to_thread(first_entered.wait, GUARD_S)
            release.set()
            return await asyncio.gather(*calls)
        finally:
            client.close()

    results = run(main())
    for x, out in zip(inputs, results, strict=True):
        assert _same(out[:, :2], x * 2)
    assert sorted({int(out[0, 2]) for out in results}) == list(range(25))


def test_answers_are_matched_by_request_id_not_by_order() -> None:
    """A peer that answers out of order (allowed by the frame layout) still gets matched."""
    head = struct.Struct("!IIB")  # request id | body length | kind
    listener = socket.create_server(("127.0.0.1", 0))

    def recv_exact(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            assert chunk, "router side closed early"
            data += chunk
        return data

    def reverse_replica() -> None:
        conn, _ = listener.accept()
        with conn:
            request_id, length, kind = head.unpack(recv_exact(conn, head.size))
            assert (kind, recv_exact(conn, length)) == (2, SECRET)  # HELLO with the secret
            conn.sendall(head.pack(request_id, 0, 2))
            requests = []
            for _ in range(5):
                request_id, length, kind = head.unpack(recv_exact(conn, head.size))
                assert kind == 0
                requests.append((request_id, decode_array(recv_exact(conn, length))))
            for request_id, array in reversed(requests):
                body = encode_array(array * 10)
                conn.sendall(head.pack(request_id, len(body), 0) + body)
            error = b"ValueError: the sixth"
            request_id, length, _ = head.unpack(recv_exact(conn, head.size))
            recv_exact(conn, length)
            conn.sendall(head.pack(request_id, len(error), 1) + error)

    thread = threading.Thread(target=reverse_replica)
    thread.start()

    async def main() -> tuple[list[np.ndarray], BaseException | None]:
        client = await _connect(listener.getsockname()[:2])
        try:
            results = await asyncio.gather(
                *(client.call(np.array([i], dtype=np.int64)) for i in range(5))
            )
            try:
                await client.call(np.array([5], dtype=np.int64))
            except ReplicaFailed as exc:
                return results, exc
            return results, None
        finally:
            client.close()

    try:
        results, error = run(main())
    finally:
        thread.join(GUARD_S)
        listener.close()
    assert [int(r[0]) for r in results] == [0, 10, 20, 30, 40]
    assert isinstance(error, ReplicaFailed)
    assert str(error) == "ValueError: the sixth"


# -- failures -----------------------------------------------------------------------------
def test_handler_error_is_replica_failed_and_serving_goes_on(
    serve: Callable[[Handler], ChannelServer],
) -> None:
    def handler(x: np.ndarray) -> np.ndarray:
        if x[0] == 7:
            raise ValueError("seven is not a valid input")
        return x + 1

    server = serve(handler)

    async def main() -> None:
        client = await _connect(server)
        try:
            with pytest.raises(ReplicaFailed, match="ValueError: seven is not a valid input"):
                await client.call(np.array([7.0]))
            assert client.alive
            assert _same(await client.call(np.array([1.0])), np.array([2.0]))
        finally:
            client.close()

    run(main())


def test_handler_returning_an_unsupported_dtype_is_replica_failed(
    serve: Callable[[Handler], ChannelServer],
) -> None:
    server = serve(lambda x: x.astype(np.complex64) if x[0] < 0 else x)

    async def main() -> None:
        client = await _connect(server)
        try:
            with pytest.raises(ReplicaFailed, match="TypeError"):
                await client.call(np.array([-1.0]))
            assert _same(await client.call(np.array([1.0])), np.array([1.0]))
        finally:
            client.close()

    run(main())


def test_sending_an_unsupported_dtype_is_a_type_error_and_the_connection_stays_usable(
    serve: Callable[[Handler], ChannelServer],
) -> None:
    server = serve(lambda x: x)

    async def main() -> None:
        client = await _connect(server)
        try:
            with pytest.raises(TypeError, match="cannot travel"):
                await client.call(np.zeros(2, dtype=np.complex128))
            assert client.alive
            assert _same(await client.call(np.ones(2)), np.ones(2))
        finally:
            client.close()

    run(main())


def test_server_closed_during_a_call_is_replica_gone_for_every_call_in_flight(
    serve: Callable[[Handler], ChannelServer],
) -> None:
    entered = threading.Event()
    release = threading.Event()

    def handler(x: np.ndarray) -> np.ndarray:
        entered.set()
        release.wait(GUARD_S)
        return x

    server = serve(handler)

    async def main() -> None:
        client = await _connect(server)
        try:
            calls = [asyncio.ensure_future(client.call(np.array([i]))) for i in range(3)]
            assert await asyncio.to_thread(entered.wait, GUARD_S)
            server.close()  # the replica is stopped while it computes
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, ReplicaGone) for r in results), results
            assert not client.alive
            with pytest.raises(ReplicaGone):
                await client.call(np.array([9]))
        finally:
            release.set()
            client.close()

    run(main())


def test_client_close_fails_calls_in_flight(serve: Callable[[Handler], ChannelServer]) -> None:
    entered = threading.Event()
    release = threading.Event()

    def handler(x: np.ndarray) -> np.ndarray:
        entered.set()
        release.wait(GUARD_S)
        return x

    server = serve(handler)

    async def main() -> None:
        client = await _connect(server)
        call = asyncio.ensure_future(client.call(np.array([1])))
        assert await asyncio.to_thread(entered.wait, GUARD_S)
        client.close()
        with pytest.raises(ReplicaGone, match="closed by the router"):
            await call
        release.set()

    run(main())


def test_server_close_stops_accepting_and_leaves_no_thread(
    serve: Callable[[Handler], ChannelServer],
) -> None:
    server = serve(lambda x: x)
    address = server.address
    server.close()

    async def main() -> None:
        with pytest.raises(OSError):
            await ChannelClient.connect(*address, SECRET, timeout_s=2)

    run(main())  # the autouse fixture checks that the accept thread ended


_CHILD = textwrap.dedent(
    """
    import sys, threading
    import numpy as np
    from workers.interface.channel import ChannelServer

    secret = bytes.fromhex(sys.argv[1])

    def handler(x):
        if x[0] < 0:
            print("entered", flush=True)
            threading.Event().wait()  # computes forever, until killed
        return x * 2

    server = ChannelServer(handler, secret=secret)
    server.start()
    print(server.address[1], flush=True)
    sys.stdin.read()
    """
)


def test_killed_replica_process_is_replica_gone() -> None:
    """The realistic case: the replica's process dies while it holds a batch."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, SECRET.hex()],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    stdout = child.stdout

    async def main() -> None:
        port = int(await asyncio.to_thread(stdout.readline))
        client = await ChannelClient.connect("127.0.0.1", port, SECRET)
        try:
            assert _same(await client.call(np.array([1.5])), np.array([3.0]))
            stuck = asyncio.ensure_future(client.call(np.array([-1.0])))
            assert (await asyncio.to_thread(stdout.readline)).strip() == "entered"
            child.kill()
            with pytest.raises(ReplicaGone, match="closed the connection"):
                await stuck
            assert not client.alive
        finally:
            client.close()

    try:
        run(main())
    finally:
        child.kill()
        child.wait(GUARD_S)
        stdout.close()
        assert child.stdin is not None
        child.stdin.close()
