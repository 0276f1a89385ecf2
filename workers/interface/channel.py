"""The data path between the router and an inference replica: arrays over a socket.

A replica listens on TCP and, when asked, also on a Unix domain socket: a router
on the replica's machine uses the Unix socket (no TCP/IP stack on the hop), one
on another machine TCP. The protocol is the same on both.

A replica serves one persistent connection per router with length-prefixed
frames; the router may pipeline several batches on it, matched by request id.
Control (start, stop, liveness) goes through Ray; only tensors take this path,
because a Ray actor call costs more than the model itself for small models
(``bench/hop.py`` measures both).

Frame layout (network byte order)::

    request:  u32 request id | u32 body length | u8 kind | body
    response: u32 request id | u32 body length | u8 kind | body

``kind`` is ``ARRAY`` (body: u8 dtype code, u8 ndim, ndim x u32 dims, raw
C-order data), ``ERROR`` (body: UTF-8 message) or ``HELLO``. Stdlib and numpy only.

Safe bytes. Each replica makes a random secret when it starts
(:func:`new_secret`) and hands it to the control plane with its address, through
the Ray call that reports it ready. A client's first frame is ``HELLO`` carrying
the secret; the replica compares it in constant time and answers an empty
``HELLO``, or drops the connection: also when the secret does not come within
``handshake_timeout_s`` (in all). Before it allocates a body, the replica checks
the length against :meth:`InputLimits.max_body_bytes` (the signature's row size
times ``max_rows``) and drops the connection when it is more; a body whose
array does not match the signature gets an ``ERROR`` frame. Once a frame has
begun, every read and write must make progress within ``io_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.interface.errors import ReplicaFailed, ReplicaGone

log = logging.getLogger(__name__)

ARRAY = 0
ERROR = 1
HELLO = 2
_HEAD = struct.Struct("!IIB")
_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
_CODES = {np.dtype(name): code for code, name in enumerate(_DTYPES)}

SECRET_BYTES = 32
# A frame may carry up to max_batch_size x this many rows: the router sends one request
# whole even when it alone is larger than a batch (the API caps a request's rows).
MAX_ROWS_FACTOR = 4
# The body cap when the signature does not bound a row (no signature, a free dimension).
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
# What the router takes from a replica in one frame (outputs are not in the signature).
DEFAULT_MAX_RESPONSE_BYTES = 256 * 2**20
HANDSHAKE_TIMEOUT_S = 5.0
IO_TIMEOUT_S = 10.0
MAX_PENDING_HANDSHAKES = 64  # connections not yet authenticated; more are closed at once


def new_secret() -> bytes:
    """A fresh channel secret (``secrets.token_bytes``)."""
    return secrets.token_bytes(SECRET_BYTES)


@dataclass(frozen=True)
class InputSchema:
    """The model's tensor input: ``shape`` with -1 for any size, numpy dtype name."""

    shape: tuple[int, ...]
    dtype: str

    def text(self) -> str:
        dims = ", ".join("N" if d == -1 else str(d) for d in self.shape)
        return f"({dims}) {self.dtype}"


@dataclass(frozen=True)
class InputLimits:
    """What a replica accepts on its channel: arrays of ``schema`` (any array when it is
    None) with 1 to ``max_rows`` rows.

    Example::

        limits = InputLimits(InputSchema((-1, 64), "float32"), max_rows=128)
        limits.max_body_bytes()  # 2 + 4 * 2 + 128 * 64 * 4
        limits.check(np.zeros((3, 64), np.float32))  # passes; a mismatch is a ValueError
    """

    schema: InputSchema | None
    max_rows: int

    def max_body_bytes(self) -> int:
        """The largest ARRAY body an accepted array can take."""
        if self.schema is None:
            return DEFAULT_MAX_BODY_BYTES
        shape = self.schema.shape
        dims = [self.max_rows if i == 0 and d == -1 else d for i, d in enumerate(shape)]
        if any(d < 0 for d in dims):  # a free dimension besides the rows: no row size
            return DEFAULT_MAX_BODY_BYTES
        data_bytes = math.prod(dims) * np.dtype(self.schema.dtype).itemsize
        return 2 + 4 * len(shape) + data_bytes

    def check(self, array: np.ndarray) -> None:
        """``ValueError`` naming the expected and the received shape when ``array`` does not fit."""
        rows = array.shape[0] if array.ndim else 0
        schema = self.schema
        fits = 1 <= rows <= self.max_rows
        if schema is not None:
            fits = (
                fits
                and array.dtype == np.dtype(schema.dtype)
                and array.ndim == len(schema.shape)
                and all(d in (-1, got) for d, got in zip(schema.shape, array.shape, strict=True))
            )
        if not fits:
            want = schema.text() if schema is not None else "any array"
            got = ", ".join(str(d) for d in array.shape)
            raise ValueError(
                f"expected inputs of shape {want} with 1 to {self.max_rows} rows, "
                f"got ({got}) {array.dtype}"
            )


def encode_array(array: np.ndarray) -> bytes:
    """``array`` as an ARRAY body; its dtype must be one of the supported ones."""
    array = np.asarray(array)  # not ascontiguousarray: it turns a 0-d array into 1-d
    code = _CODES.get(array.dtype)
    if code is None:
        raise TypeError(f"dtype {array.dtype} cannot travel to a replica")
    dims = struct.pack(f"!BB{array.ndim}I", code, array.ndim, *array.shape)
    return dims + array.tobytes(order="C")


def decode_array(body: bytes | bytearray) -> np.ndarray:
    """The array of an ARRAY body (a copy-free view of ``body``)."""
    code, ndim = body[0], body[1]
    shape = struct.unpack_from(f"!{ndim}I", body, 2)
    return np.frombuffer(body, dtype=_DTYPES[code], offset=2 + 4 * ndim).reshape(shape)


def frame(request_id: int, kind: int, body: bytes) -> bytes:
    return _HEAD.pack(request_id, len(body), kind) + body


# -- replica side (blocking sockets, one thread per connection) ---------------------------
class ChannelServer:
    """Serves ``handler(array) -> array`` to clients that present ``secret``, on 127.0.0.1 or
    a given host, port chosen by the OS. ``limits`` bounds and checks the arrays (None: any
    array whose body fits :data:`DEFAULT_MAX_BODY_BYTES`).

    Example::

        secret = new_secret()
        server = ChannelServer(lambda x: x * 2, secret=secret, unix_path="/tmp/jw-x/r.sock")
        server.start()
        host, port = server.address  # ChannelClient.connect(host, port, secret)
        # or ChannelClient.connect_unix(server.unix_path, secret) on the same machine
    """

    def __init__(
        self,
        handler: Callable[[np.ndarray], np.ndarray],
        *,
        secret: bytes,
        limits: InputLimits | None = None,
        host: str = "127.0.0.1",
        unix_path: str | None = None,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        io_timeout_s: float = IO_TIMEOUT_S,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("a channel secret has at least 16 bytes (see new_secret())")
        self._handler = handler
        self._secret = secret
        self._limits = limits
        self._max_body_bytes = limits.max_body_bytes() if limits else DEFAULT_MAX_BODY_BYTES
        self._handshake_timeout_s = handshake_timeout_s
        self._io_timeout_s = io_timeout_s
        self._sock = socket.create_server((host, 0))
        self._unix_sock: socket.socket | None = None
        if unix_path is not None:
            self._unix_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._unix_sock.bind(unix_path)
            self._unix_sock.listen()
        self._unix_path = unix_path
        self._lock = threading.Lock()  # one batch at a time on the model
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._accepted = 0
        self._pending = 0  # connections that have not presented the secret yet

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def unix_path(self) -> str | None:
        """The Unix socket's path, when the server listens on one too."""
        return self._unix_path

    @property
    def connections(self) -> tuple[int, int]:
        """``(accepted so far, open now)``: who is connected to this replica."""
        with self._conns_lock:
            return self._accepted, len(self._conns)

    def start(self) -> None:
        for sock in self._listening():
            threading.Thread(
                target=self._accept, args=(sock,), name="replica-accept", daemon=True
            ).start()

    def _listening(self) -> list[socket.socket]:
        return [self._sock] if self._unix_sock is None else [self._sock, self._unix_sock]

    def close(self) -> None:
        """Stop accepting and drop every connection, as a dying replica would.

        Calls in flight fail on the router's side with :class:`ReplicaGone`.
        """
        with self._conns_lock:
            self._closed = True
            conns = list(self._conns)
        # close() alone neither wakes a thread blocked in accept() (Linux) nor stops the
        # socket from listening until accept() returns; shutdown() does both.
        for sock in (*self._listening(), *conns):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for sock in self._listening():
            with contextlib.suppress(OSError):
                sock.close()
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)

    def _accept(self, listening: socket.socket) -> None:
        while True:
            try:
                conn, _ = listening.accept()
            except OSError:
                return
            with self._conns_lock:
                if self._closed or self._pending >= MAX_PENDING_HANDSHAKES:
                    conn.close()
                    if self._closed:
                        return
                    continue
                self._conns.add(conn)
                self._accepted += 1
                self._pending += 1
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                try:
                    greeted = self._greet(conn)
                finally:
                    with self._conns_lock:
                        self._pending -= 1
                if not greeted:
                    return
                while True:
                    head = _recv_exact(conn, _HEAD.size, idle=True)
                    request_id, length, kind = _HEAD.unpack(head)
                    if kind != ARRAY or length > self._max_body_bytes:
                        log.warning(
                            "replica channel: dropping a connection that sent a frame of kind "
                            "%d and %d bytes (at most %d bytes of ARRAY)",
                            kind,
                            length,
                            self._max_body_bytes,
                        )
                        return
                    body = _recv_exact(conn, length)
                    conn.sendall(self._answer(request_id, body))
            except (ConnectionError, OSError):
                return
            finally:
                with self._conns_lock:
                    self._conns.discard(conn)

    def _greet(self, conn: socket.socket) -> bool:
        """Whether the client presented the secret in time (then it is told so)."""
        deadline = time.monotonic() + self._handshake_timeout_s
        request_id, length, kind = _HEAD.unpack(_recv_exact(conn, _HEAD.size, deadline=deadline))
        if kind != HELLO or length != len(self._secret):
            log.warning("replica channel: dropping a connection that did not say HELLO first")
            return False
        if not hmac.compare_digest(
            bytes(_recv_exact(conn, length, deadline=deadline)), self._secret
        ):
            log.warning("replica channel: dropping a connection with a wrong secret")
            return False
        conn.settimeout(self._io_timeout_s)
        conn.sendall(frame(request_id, HELLO, b""))
        return True

    def _answer(self, request_id: int, body: bytearray) -> bytes:
        try:
            array = decode_array(body)
            if self._limits is not None:
                self._limits.check(array)
            with self._lock:
                result = self._handler(array)
            return frame(request_id, ARRAY, encode_array(result))
        except Exception as exc:  # the model's error goes back to the caller, serving goes on
            log.exception("replica handler failed")
            return frame(request_id, ERROR, f"{type(exc).__name__}: {exc}".encode())


def _recv_exact(
    conn: socket.socket, n: int, deadline: float | None = None, idle: bool = False
) -> bytearray:
    """Exactly ``n`` bytes (writable, so that arrays decoded from it are too).

    Each read waits at most the socket's timeout, or until ``deadline`` (monotonic) for
    all of them. ``idle``: waiting for the first byte never times out (a connection may be
    quiet between frames).
    """
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise TimeoutError("the peer was too slow")
            conn.settimeout(left_s)
        try:
            k = conn.recv_into(view[got:], n - got)
        except TimeoutError:
            if idle and got == 0:
                continue
            raise
        if k == 0:
            raise ConnectionError("peer closed")
        got += k
    return buf


# -- router side (asyncio) ----------------------------------------------------------------
class ChannelClient:
    """One pipelined connection to a replica, used from an asyncio event loop.

    Example::

        client = await ChannelClient.connect("127.0.0.1", port, secret)
        outputs = await client.call(inputs)
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._max_response_bytes = max_response_bytes
        self._pending: dict[int, asyncio.Future[np.ndarray]] = {}
        self._next_id = 0
        self._closed: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        secret: bytes,
        timeout_s: float = 10.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> ChannelClient:
        """Connect over TCP and present ``secret``; ``ConnectionError`` when the replica
        refuses it, ``TimeoutError`` when connecting or the answer takes more than
        ``timeout_s``."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        sock: Any = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await _hello(reader, writer, secret, timeout_s, f"{host}:{port}")
        return cls(reader, writer, max_response_bytes)

    @classmethod
    async def connect_unix(
        cls,
        path: str,
        secret: bytes,
        timeout_s: float = 10.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> ChannelClient:
        """:meth:`connect`, over the replica's Unix socket at ``path`` (same machine only)."""
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout_s)
        await _hello(reader, writer, secret, timeout_s, path)
        return cls(reader, writer, max_response_bytes)

    @property
    def alive(self) -> bool:
        return self._closed is None

    async def call(self, array: np.ndarray) -> np.ndarray:
        """Send ``array``; its result, or :class:`ReplicaGone` / :class:`ReplicaFailed`."""
        return await self.submit(array)

    def submit(self, array: np.ndarray) -> asyncio.Future[np.ndarray]:
        """Send ``array`` now; a future of its result (errors, even a bad dtype, go in it).

        What the router uses: a callback on the future costs less than a task per call.
        """
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        if self._closed is not None:
            future.set_exception(ReplicaGone(str(self._closed)))
            return future
        try:
            body = encode_array(array)  # before registering: a TypeError leaves nothing pending
        except TypeError as exc:
            future.set_exception(exc)
            return future
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        request_id = self._next_id
        self._pending[request_id] = future
        self._writer.write(frame(request_id, ARRAY, body))
        return future

    def close(self, why: str = "the connection was closed by the router") -> None:
        self._fail_all(ReplicaGone(why))
        self._writer.close()
        self._task.cancel()

    async def _read(self) -> None:
        try:
            while True:
                head = await self._reader.readexactly(_HEAD.size)
                request_id, length, kind = _HEAD.unpack(head)
                if length > self._max_response_bytes:
                    self._fail_all(
                        ReplicaGone(
                            f"the replica sent a frame of {length} bytes, more than the "
                            f"{self._max_response_bytes} the router takes"
                        )
                    )
                    self._writer.close()
                    return
                body = await self._reader.readexactly(length)
                future = self._pending.pop(request_id, None)
                if future is None or future.done():
                    continue
                if kind == ARRAY:
                    future.set_result(decode_array(body))
                else:
                    future.set_exception(ReplicaFailed(body.decode("utf-8", "replace")))
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self._fail_all(ReplicaGone(f"the replica closed the connection ({exc!r})"))

    def _fail_all(self, exc: BaseException) -> None:
        if self._closed is None:
            self._closed = exc
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)


async def _hello(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: bytes,
    timeout_s: float,
    where: str,
) -> None:
    """Present ``secret`` and wait for the replica's empty HELLO; the writer is closed
    when that fails."""
    try:
        writer.write(frame(0, HELLO, secret))
        head = await asyncio.wait_for(reader.readexactly(_HEAD.size), timeout_s)
        _, length, kind = _HEAD.unpack(head)
        if kind != HELLO or length != 0:
            raise ConnectionError(f"{where} did not answer as a replica does")
    except asyncio.IncompleteReadError as exc:
        writer.close()
        raise ConnectionError(
            f"the replica at {where} closed the connection instead of answering "
            "HELLO: it refused the secret (or it is stopping)"
        ) from exc
    except BaseException:
        writer.close()
        raise
