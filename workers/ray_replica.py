"""The inference replica actor: loads one pinned model version and serves it over a channel.

It runs on the node the scheduler chose (hard node affinity) and sees only
the GPU it was given: ``CUDA_VISIBLE_DEVICES`` is set before torch is
imported. Torch and MLflow are imported in :meth:`InferenceReplica.start`,
inside the actor process, never in the control plane.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from workers.replica_channel import ChannelServer
from workers.sim_backend import write_usage


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=2)  # type: ignore[call-overload]
class InferenceReplica:
    """One replica; ``start`` returns its address and input schema once it is warm."""

    def __init__(self, request: dict[str, Any]) -> None:
        self._request = request
        threads = str(max(1, int(request["cpus"])))
        os.environ.update(
            # NVML numbers GPUs in PCI bus order; CUDA must use the same order.
            CUDA_DEVICE_ORDER="PCI_BUS_ID",
            CUDA_VISIBLE_DEVICES=",".join(str(i) for i in request["gpu_indices"]),
            OMP_NUM_THREADS=threads,
            MKL_NUM_THREADS=threads,
        )
        self._server: ChannelServer | None = None

    def start(self) -> dict[str, Any]:
        import torch

        from workers.mlflow_models import load

        req = self._request
        torch.set_num_threads(max(1, int(req["cpus"])))
        device = "cuda" if req["gpu_indices"] and torch.cuda.is_available() else "cpu"
        module, schema = load(req["model_uri"], req["tracking_uri"], device)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            module.eval()  # an exported (pt2) program is traced in eval mode and refuses this

        def predict(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = module(torch.from_numpy(batch).to(device))
            return np.asarray(out.detach().cpu().numpy())

        started = time.perf_counter()
        if schema is not None:  # warm up: first calls allocate and pick kernels
            for rows in (1, int(req["max_batch_size"])):
                shape = [rows if d == -1 else d for d in schema.shape]
                predict(np.zeros(shape, dtype=schema.dtype))
        warmup_ms = (time.perf_counter() - started) * 1000
        host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self._server = ChannelServer(predict, host=host)
        self._server.start()
        usage_dir = req.get("simulated_usage_dir")
        if usage_dir and req["gpu_indices"]:
            write_usage(
                Path(usage_dir),
                req["replica_id"],
                os.getpid(),
                list(req["gpu_indices"]),
                int(req["gpu_memory_bytes"]),
            )
        host, port = self._server.address
        return {
            "host": host,
            "port": port,
            "pid": os.getpid(),
            "device": device,
            "warmup_ms": warmup_ms,
            "input_shape": list(schema.shape) if schema else None,
            "input_dtype": schema.dtype if schema else None,
        }

    def ping(self) -> int:
        return os.getpid()
