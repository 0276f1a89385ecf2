"""The data path between the router and an inference replica: arrays over a TCP socket.

A replica serves one persistent connection per router with length-prefixed
frames; the router may pipeline several batches on it, matched by request id.
Control (start, stop, liveness) goes through Ray; only tensors take this path,
because a Ray actor call costs more than the model itself for small models
(``bench/hop.py`` measures both).

Frame layout (network byte order)::

    request:  u32 request id | u32 body length | u8 kind | body
    response: u32 request id | u32 body length | u8 kind | body

``kind`` is ``ARRAY`` (body: u8 dtype code, u8 ndim, ndim x u32 dims, raw
C-order data) or ``ERROR`` (body: UTF-8 message). Stdlib and numpy only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from workers.interface.errors import ReplicaFailed, ReplicaGone

log = logging.getLogger(__name__)

ARRAY = 0
ERROR = 1
_HEAD = struct.Struct("!IIB")
_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
_CODES = {np.dtype(name): code for code, name in enumerate(_DTYPES)}


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
    """Serves ``handler(array) -> array`` on 127.0.0.1 or a given host, port chosen by the OS.

    Example::

        server = ChannelServer(lambda x: x * 2)
        server.start()
        host, port = server.address
    """

    def __init__(
        self, handler: Callable[[np.ndarray], np.ndarray], host: str = "127.0.0.1"
    ) -> None:
        self._handler = handler
        self._sock = socket.create_server((host, 0))
        self._lock = threading.Lock()  # one batch at a time on the model
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._accepted = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def connections(self) -> tuple[int, int]:
        """``(accepted so far, open now)``: who is connected to this replica."""
        with self._conns_lock:
            return self._accepted, len(self._conns)

    def start(self) -> None:
        threading.Thread(target=self._accept, name="replica-accept", daemon=True).start()

    def close(self) -> None:
        """Stop accepting and drop every connection, as a dying replica would.

        Calls in flight fail on the router's side with :class:`ReplicaGone`.
        """
        with self._conns_lock:
            self._closed = True
            conns = list(self._conns)
        # close() alone neither wakes a thread blocked in accept() (Linux) nor stops the
        # socket from listening until accept() returns; shutdown() does both.
        for sock in (self._sock, *conns):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._conns_lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
                self._accepted += 1
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    head = _recv_exact(conn, _HEAD.size)
                    request_id, length, _kind = _HEAD.unpack(head)
                    body = _recv_exact(conn, length)
                    conn.sendall(self._answer(request_id, body))
            except (ConnectionError, OSError):
                return
            finally:
                with self._conns_lock:
                    self._conns.discard(conn)

    def _answer(self, request_id: int, body: bytearray) -> bytes:
        try:
            with self._lock:
                result = self._handler(decode_array(body))
            return frame(request_id, ARRAY, encode_array(result))
        except Exception as exc:  # the model's error goes back to the caller, serving goes on
            log.exception("replica handler failed")
            return frame(request_id, ERROR, f"{type(exc).__name__}: {exc}".encode())


def _recv_exact(conn: socket.socket, n: int) -> bytearray:
    """Exactly ``n`` bytes (writable, so that arrays decoded from it are too)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed")
        got += k
    return buf


# -- router side (asyncio) ----------------------------------------------------------------
class ChannelClient:
    """One pipelined connection to a replica, used from an asyncio event loop.

    Example::

        client = await ChannelClient.connect("127.0.0.1", port)
        outputs = await client.call(inputs)
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: dict[int, asyncio.Future[np.ndarray]] = {}
        self._next_id = 0
        self._closed: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, host: str, port: int, timeout_s: float = 10.0) -> ChannelClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        sock: Any = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

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
