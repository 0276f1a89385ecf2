"""An inference replica's serving process: loads the model, warms it up, serves the channel.

The replica actor (``workers/ray_replicas.py``) starts this module as a plain child
process (``python -m workers.replica_process``), so that the channel server does not
share a GIL with Ray's threads. The actor writes one JSON line to the child's stdin:
the :class:`~workers.interface.replicas.ReplicaRequest`, the channel secret (hex),
the TCP host to listen on and, for a router on the same machine, the Unix socket path
(see :func:`launch_config`). The secret never appears in argv or the environment.

The child answers one JSON line on stdout: what the actor returns from ``start``
(:func:`ready_info`), or ``{"error": …}`` when it cannot serve. Then it serves until
its stdin reaches end of file: the actor holds the write end, so when the actor
exits, is killed or crashes, the child follows it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np

from workers.interface.channel import MAX_ROWS_FACTOR, ChannelServer, InputLimits
from workers.interface.replicas import ReplicaRequest

log = logging.getLogger(__name__)


def launch_config(
    request: ReplicaRequest, secret: bytes, host: str, unix_path: str | None
) -> bytes:
    """The line the actor writes to the child's stdin."""
    fields = dataclasses.asdict(request)
    line = {"request": fields, "secret": secret.hex(), "host": host, "unix_path": unix_path}
    return json.dumps(line).encode() + b"\n"


def _read_config(line: str) -> tuple[ReplicaRequest, bytes, str, str | None]:
    raw = json.loads(line)
    fields = raw["request"]
    fields["gpu_indices"] = tuple(fields["gpu_indices"])
    fields["python_path"] = tuple(fields["python_path"])
    return ReplicaRequest(**fields), bytes.fromhex(raw["secret"]), raw["host"], raw["unix_path"]


def serve(request: ReplicaRequest, secret: bytes, host: str, unix_path: str | None) -> None:
    """Load and warm the model, start the channel, report ready on stdout, serve until
    stdin closes."""
    import torch

    from workers.gpu_caps import limit_gpu_memory
    from workers.mlflow_models import load

    torch.set_num_threads(max(1, int(request.cpus)))
    limit_gpu_memory(request.gpu_memory_bytes if request.gpu_indices else None)
    device = "cuda" if request.gpu_indices and torch.cuda.is_available() else "cpu"
    module, schema = load(
        request.model_uri, request.tracking_uri, device, request.allow_pickled_model
    )
    with contextlib.suppress(NotImplementedError, RuntimeError):
        module.eval()  # an exported (pt2) program is traced in eval mode and refuses this

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(batch).to(device))
        return np.asarray(out.detach().cpu().numpy())

    started = time.perf_counter()
    if schema is not None:  # warm up: first calls allocate and pick kernels
        for rows in (1, request.max_batch_size):
            shape = [rows if d == -1 else d for d in schema.shape]
            predict(np.zeros(shape, dtype=schema.dtype))
    warmup_ms = (time.perf_counter() - started) * 1000
    server = ChannelServer(
        predict,
        secret=secret,
        limits=InputLimits(schema, request.max_batch_size * MAX_ROWS_FACTOR),
        host=host,
        unix_path=unix_path,
    )
    server.start()
    tcp_host, port = server.address
    _say(
        {
            "host": tcp_host,
            "port": port,
            "unix_path": server.unix_path,
            "pid": os.getpid(),
            "device": device,
            "warmup_ms": warmup_ms,
            "input_shape": list(schema.shape) if schema else None,
            "input_dtype": schema.dtype if schema else None,
        }
    )
    try:
        while sys.stdin.buffer.read(4096):  # nothing more is sent: this waits for EOF
            pass
    finally:
        server.close()  # unlinks the socket
        if unix_path is not None:  # and its directory, which the actor made for it alone
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(unix_path))


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    request, secret, host, unix_path = _read_config(sys.stdin.buffer.readline().decode())
    try:
        serve(request, secret, host, unix_path)
    except Exception as exc:  # reported to the actor, which fails start() with it
        log.exception("replica %s cannot serve", request.replica_id)
        _say({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
