"""The predict request and response bodies, checked against the model's signature.

Request: ``{"inputs": [[...], ...]}`` (rows along the first axis). The shape
and dtype are checked before the request reaches a replica, so that a bad
input gets a 422 naming the expected shape instead of an error from inside
the model; so are non-finite numbers (``NaN``, ``Infinity``, ``1e309``), which
no model is trained on. Response: ``{"outputs": ..., "model": ..., "version":
..., "run_id": ...}``, the last three also as ``x-model-*`` headers. A
non-finite output is written as ``null``: the body is always valid JSON (a
bare ``NaN`` is not), and the client sees which values the model could not give.
"""

from __future__ import annotations

import json

import numpy as np

from scheduler.realtime.router import Prediction
from workers.interface.errors import PredictError


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join("N" if d == -1 else str(d) for d in shape) + ")"


def parse_inputs(body: bytes, shape: tuple[int, ...] | None, dtype: str | None) -> np.ndarray:
    """The request's inputs as an array of the model's dtype, or a 422 naming what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PredictError(422, f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise PredictError(422, "the body is nested too deeply") from None
    if not isinstance(data, dict) or "inputs" not in data:
        raise PredictError(422, 'the body must be a JSON object with an "inputs" array')
    try:
        array = np.asarray(data["inputs"])
    except ValueError as exc:
        raise PredictError(422, f"inputs: not a rectangular array ({exc})") from None
    want = f"{_shape_text(shape)} {dtype}" if shape is not None else "a signature"
    if array.ndim == 0 or array.size == 0:  # size: [[]] is a row of nothing
        raise PredictError(422, f"inputs: expected at least one row of shape {want}")
    if array.dtype.kind not in "biuf":
        raise PredictError(422, f"inputs: expected numbers of shape {want}, got {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise PredictError(422, "inputs: expected finite numbers, got NaN or infinity")
    if shape is None or dtype is None:
        return np.ascontiguousarray(array, dtype=np.float32)
    expected = np.dtype(dtype)
    if expected.kind in "iu" and array.dtype.kind == "f":
        raise PredictError(422, f"inputs: expected integers ({dtype}) of shape {want}")
    if expected.kind in "iu" and array.dtype.kind in "iu":
        low, high = np.iinfo(expected).min, np.iinfo(expected).max
        if int(array.min()) < low or int(array.max()) > high:  # the cast would wrap around
            raise PredictError(
                422, f"inputs: expected integers in [{low}, {high}] ({dtype}) of shape {want}"
            )
    fits = len(shape) == array.ndim and all(
        d in (-1, got) for d, got in zip(shape, array.shape, strict=True)
    )
    if not fits:
        raise PredictError(
            422,
            f"inputs: expected shape {_shape_text(shape)} {dtype}, got "
            f"{_shape_text(tuple(array.shape))}",
        )
    return np.ascontiguousarray(array, dtype=expected)


def render(prediction: Prediction) -> tuple[bytes, dict[str, str]]:
    """The response body and headers of a prediction."""
    ep = prediction.endpoint
    outputs = prediction.outputs
    if outputs.dtype.kind == "f" and not np.isfinite(outputs).all():
        outputs = outputs.astype(object)
        outputs[~np.isfinite(prediction.outputs)] = None
    body = {
        "outputs": outputs.tolist(),
        "model": ep.model_name,
        "version": ep.model_version,
        "run_id": ep.run_id,
    }
    headers = {
        "x-model-name": ep.model_name,
        "x-model-version": ep.model_version or "",
        "x-mlflow-run-id": ep.run_id or "",
    }
    return json.dumps(body, allow_nan=False).encode(), headers
