"""The replica channel against hostile peers: no secret, a wrong one, silence, a header
claiming 1 GiB, inputs that do not match the signature. After each, the replica still
serves a client that presents its secret.

Servers in this process (short timeouts, so a drop comes fast), and one real Ray replica
actor serving a pt2 model from a real MLflow.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import tracemalloc
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import ray

from tests.conftest import wait_until
from tests.security.models import DIM, Registry, linear
from workers.interface.channel import (
    MAX_ROWS_FACTOR,
    ChannelClient,
    ChannelServer,
    InputLimits,
    InputSchema,
    encode_array,
    new_secret,
)
from workers.interface.errors import ReplicaFailed, ReplicaGone
from workers.interface.replicas import ReplicaPhase, ReplicaRequest, ReplicaStatus
from workers.ray_replicas import RayReplicaLauncher, listen_host

GUARD_S = 10.0  # a bound on every wait: reaching it means a hang
SHORT_S = 0.3  # the servers' handshake and I/O timeouts here
HEAD = struct.Struct("!IIB")  # request id | body length | kind
ARRAY, HELLO = 0, 2
GIB = 2**30
SCHEMA = InputSchema((-1, DIM), "float32")
MAX_ROWS = 8
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, GUARD_S)

    return asyncio.run(bounded())


@dataclass(frozen=True)
class Served:
    served: Served
    secret: bytes  # what an honest client knows

    @property
    def address(self) -> tuple[str, int]:
        return self.served.address


@pytest.fixture
def served() -> Iterator[Served]:
    """A replica of a (N, 4) float32 model taking up to 8 rows, with short timeouts."""
    secret = new_secret()
    server = ChannelServer(
        lambda x: x * 2,
        secret=secret,
        limits=InputLimits(SCHEMA, MAX_ROWS),
        handshake_timeout_s=SHORT_S,
        io_timeout_s=SHORT_S,
    )
    server.start()
    yield Served(server, secret)
    server.close()


def _raw(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=GUARD_S)
    return sock


def _hello(sock: socket.socket, secret: bytes) -> None:
    sock.sendall(HEAD.pack(0, len(secret), HELLO) + secret)
    assert sock.recv(HEAD.size) == HEAD.pack(0, 0, HELLO)


def _dropped(sock: socket.socket) -> bool:
    """Whether the server closed the connection (reads end); a bounded wait."""
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _serves(served: Served) -> np.ndarray:
    """A call of an honest client: it presents the secret."""

    async def main() -> np.ndarray:
        client = await ChannelClient.connect(*served.address, served.secret)
        try:
            return await client.call(np.ones((2, DIM), np.float32))
        finally:
            client.close()

    return run(main())


def test_connection_without_the_secret_is_dropped(served: Served) -> None:
    with _raw(served.address) as sock:
        body = encode_array(np.ones((1, DIM), np.float32))
        sock.sendall(HEAD.pack(1, len(body), ARRAY) + body)  # straight to work, no HELLO
        assert _dropped(sock)
    assert np.array_equal(_serves(served), np.full((2, DIM), 2.0, np.float32))


def test_wrong_secret_is_dropped_and_the_client_is_told(served: Served) -> None:
    with _raw(served.address) as sock:
        wrong = new_secret()
        sock.sendall(HEAD.pack(0, len(wrong), HELLO) + wrong)
        assert _dropped(sock)

    async def main() -> None:
        with pytest.raises(ConnectionError, match="refused the secret"):
            await ChannelClient.connect(*served.address, new_secret())

    run(main())
    assert _serves(served).shape == (2, DIM)


def test_silent_client_is_dropped_and_a_quiet_honest_one_is_not(served: Served) -> None:
    async def main() -> None:
        honest = await ChannelClient.connect(*served.address, served.secret)
        try:
            with _raw(served.address) as silent:  # connects, says nothing
                assert await asyncio.to_thread(_dropped, silent)
            # The honest connection sat idle at least as long as the I/O timeout meanwhile:
            # between frames it waits for as long as it takes.
            out = await honest.call(np.ones((1, DIM), np.float32))
            assert out.shape == (1, DIM)
        finally:
            honest.close()

    run(main())


def test_stalled_frame_times_out(served: Served) -> None:
    with _raw(served.address) as sock:
        _hello(sock, served.secret)
        sock.sendall(HEAD.pack(1, 100, ARRAY)[:5])  # half a header, then nothing
        assert _dropped(sock)
    assert _serves(served).shape == (2, DIM)


@pytest.mark.parametrize("greeted", [False, True], ids=["before-hello", "after-hello"])
def test_header_claiming_a_gib_is_refused_without_allocating_it(
    served: Served, greeted: bool
) -> None:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with _raw(served.address) as sock:
            if greeted:
                _hello(sock, served.secret)
            sock.sendall(HEAD.pack(1, GIB, ARRAY if greeted else HELLO))
            assert _dropped(sock)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < GIB // 16, f"{peak_bytes} bytes allocated for a refused frame"
    assert _serves(served).shape == (2, DIM)


def test_frame_cap_comes_from_the_signature_and_the_batch_size() -> None:
    limits = InputLimits(SCHEMA, max_rows=32 * MAX_ROWS_FACTOR)
    assert limits.max_body_bytes() == 2 + 4 * 2 + 32 * MAX_ROWS_FACTOR * DIM * 4
    images = InputLimits(InputSchema((-1, 3, 8, 8), "uint8"), max_rows=10)
    assert images.max_body_bytes() == 2 + 4 * 4 + 10 * 3 * 8 * 8


@pytest.mark.parametrize(
    ("array", "says"),
    [
        (np.ones((2, DIM + 1), np.float32), "got (2, 5) float32"),
        (np.ones((2, DIM), np.float64), "got (2, 4) float64"),
        (np.ones((2, DIM, 1), np.float32), "got (2, 4, 1) float32"),
        (np.ones((0, DIM), np.float32), "with 1 to 8 rows, got (0, 4)"),
        (np.float32(1.0), "got () float32"),
    ],
    ids=["width", "dtype", "rank", "no-rows", "scalar"],
)
def test_inputs_off_the_signature_get_an_error_frame(
    served: Served, array: np.ndarray, says: str
) -> None:
    async def main() -> None:
        client = await ChannelClient.connect(*served.address, served.secret)
        try:
            with pytest.raises(ReplicaFailed, match="expected inputs of shape") as failed:
                await client.call(array)
            assert says in str(failed.value)
            assert (await client.call(np.ones((1, DIM), np.float32))).shape == (1, DIM)
        finally:
            client.close()

    run(main())


def test_rows_beyond_the_cap_are_refused() -> None:
    """Past ``max_rows`` a frame of a fixed row size is over the cap: dropped unread. With
    a free dimension (no row size, so a fixed cap) the rows are counted: an error frame."""
    secret = new_secret()
    free = ChannelServer(
        lambda x: x, secret=secret, limits=InputLimits(InputSchema((-1, -1), "float32"), 2)
    )
    free.start()
    fixed = ChannelServer(lambda x: x, secret=secret, limits=InputLimits(SCHEMA, 2))
    fixed.start()

    async def main() -> None:
        client = await ChannelClient.connect(*free.address, secret)
        try:
            with pytest.raises(ReplicaFailed, match=r"with 1 to 2 rows, got \(3, 4\)"):
                await client.call(np.ones((3, DIM), np.float32))
            assert (await client.call(np.ones((2, 7), np.float32))).shape == (2, 7)
        finally:
            client.close()
        client = await ChannelClient.connect(*fixed.address, secret)
        try:
            with pytest.raises(ReplicaGone):
                await client.call(np.ones((3, DIM), np.float32))
        finally:
            client.close()

    try:
        run(main())
    finally:
        free.close()
        fixed.close()


@pytest.mark.parametrize(
    ("node_ip", "control_plane_ip", "host"),
    [
        ("192.0.2.2", "192.0.2.2", "127.0.0.1"),  # the embedded set-up: one machine
        ("127.0.0.1", "192.0.2.2", "127.0.0.1"),
        ("192.0.2.7", "192.0.2.2", "192.0.2.7"),  # another node of a cluster
    ],
)
def test_channel_listens_on_loopback_when_the_router_is_on_the_same_machine(
    node_ip: str, control_plane_ip: str, host: str
) -> None:
    assert listen_host(node_ip, control_plane_ip) == host


# -- a real replica actor -------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_real_replica_listens_on_loopback_and_guards_its_channel(
    ray_session: None, tmp_path: Path
) -> None:
    registry = Registry.create(tmp_path)
    uri = registry.log("pt2", linear(), serialization_format="pt2")
    launcher = RayReplicaLauncher(namespace="jw-security-channel")
    request = ReplicaRequest(
        replica_id="sec-1",
        deployment="sec",
        model_uri=uri,
        tracking_uri=registry.tracking_uri,
        node_id=ray.get_runtime_context().get_node_id(),
        gpu_indices=(),
        gpu_memory_bytes=0,
        cpus=1,
        max_batch_size=2,
    )
    launcher.start(request)
    try:

        def ready() -> ReplicaStatus | None:
            status = launcher.poll(["sec-1"])["sec-1"]
            assert status.phase in (ReplicaPhase.STARTING, ReplicaPhase.READY), status
            return status if status.phase is ReplicaPhase.READY else None

        status = wait_until(ready, "the replica is ready", 150)
        assert status.host == "127.0.0.1"  # the router runs on this machine
        assert status.port is not None and status.secret is not None
        address, secret = (status.host, status.port), status.secret
        assert secret.hex() not in repr(status) and repr(secret) not in repr(status)

        with _raw(address) as sock:  # no secret
            sock.sendall(HEAD.pack(1, GIB, ARRAY))
            assert _dropped(sock)
        with _raw(address) as sock:  # the secret, then a header claiming 1 GiB
            _hello(sock, secret)
            sock.sendall(HEAD.pack(1, GIB, ARRAY))
            assert _dropped(sock)

        async def main() -> None:
            client = await ChannelClient.connect(*address, secret)
            try:
                out = await client.call(np.ones((3, DIM), np.float32))
                assert out.shape == (3, 3)
                with pytest.raises(ReplicaFailed, match=r"expected inputs of shape \(N, 4\)"):
                    await client.call(np.ones((3, DIM), np.float64))
                most = 2 * MAX_ROWS_FACTOR  # max_batch_size x the factor
                assert (await client.call(np.ones((most, DIM), np.float32))).shape == (most, 3)
                with pytest.raises(ReplicaGone):  # over the cap: dropped unread
                    await client.call(np.ones((most + 1, DIM), np.float32))
            finally:
                client.close()
            client = await ChannelClient.connect(*address, secret)  # and it still serves
            try:
                assert (await client.call(np.ones((1, DIM), np.float32))).shape == (1, 3)
            finally:
                client.close()

        run(main())
    finally:
        launcher.stop("sec-1")
