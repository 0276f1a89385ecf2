"""The model every server in ``bench/serving.py`` serves, and the wire format they share.

An MLP 64→256→256→10 in float32 built from a fixed seed, so every server holds the same
weights. Requests are JSON ``{"inputs": [[64 floats], …]}``; responses carry
``{"outputs": [[10 floats], …]}``. Torch only (plus numpy for the request rows), so the
Ray Serve replicas and the FastAPI server can import it cheaply.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import numpy as np
import torch

IN_FEATURES = 64
HIDDEN = 256
OUT_FEATURES = 10
SEED = 0


def configure_torch() -> None:
    """One intra-op thread per server process: the bench gives each replica one core."""
    torch.set_num_threads(1)


def build_model(seed: int = SEED) -> torch.nn.Sequential:
    """The bench MLP in eval mode; same ``seed`` → same weights in every process."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, OUT_FEATURES),
    )
    with torch.no_grad():
        for param in model.parameters():
            # Kaiming-uniform-like range, drawn from our generator rather than the global RNG.
            bound = 1.0 / (param.shape[-1] ** 0.5)
            param.copy_(torch.empty_like(param).uniform_(-bound, bound, generator=gen))
    return model.eval()


class SlowModel(torch.nn.Module):
    """The bench MLP plus ``delay_s`` of sleep per batch: a replica whose capacity is known
    (``max_batch_size / delay_s`` rows/s) and easy to exceed (``bench/overload.py``)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.mlp = build_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.mlp(x)


def example_rows(n: int = 1, seed: int = SEED) -> np.ndarray:
    """``n`` fixed input rows, float32, shape ``(n, 64)``."""
    return np.random.default_rng(seed).standard_normal((n, IN_FEATURES), dtype=np.float32)


def request_body(n: int = 1) -> bytes:
    """The JSON request body every server receives: ``{"inputs": [[64 floats]]}``."""
    return json.dumps({"inputs": example_rows(n).tolist()}).encode()


def parse_inputs(payload: dict[str, object]) -> np.ndarray:
    """``payload["inputs"]`` as a float32 array of shape ``(rows, 64)``; ValueError if not."""
    rows = np.asarray(payload["inputs"], dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != IN_FEATURES:
        raise ValueError(f"inputs must be rows of {IN_FEATURES} floats, got shape {rows.shape}")
    return rows


def predict(model: torch.nn.Module, rows: np.ndarray) -> list[list[float]]:
    """Run ``model`` on ``rows`` (shape ``(n, 64)``) and return ``n`` lists of 10 floats."""
    with torch.inference_mode():
        out = model(torch.from_numpy(rows))
    result: list[list[float]] = out.numpy().tolist()
    return result


def predict_many(model: torch.nn.Module, batches: Sequence[np.ndarray]) -> list[list[list[float]]]:
    """One forward pass over several requests' rows; the outputs split back per request."""
    outputs = predict(model, np.concatenate(batches))
    split: list[list[list[float]]] = []
    start = 0
    for rows in batches:
        split.append(outputs[start : start + len(rows)])
        start += len(rows)
    return split
