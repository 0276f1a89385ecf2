"""Predict bodies: inputs checked against the model's signature, outputs rendered."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scheduler.realtime.payload import parse_inputs, render
from scheduler.realtime.router import Prediction, ReplicaEndpoint
from workers.interface.errors import PredictError

MLP = ((-1, 64), "float32")  # the demo model's signature
TOKENS = ((-1, 8), "int64")
NONE: tuple[None, None] = (None, None)  # a model logged without a signature


def body(inputs: object) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


@pytest.mark.parametrize(
    ("payload", "signature", "shape", "dtype"),
    [
        (body([[0.5] * 64]), MLP, (1, 64), np.float32),
        (body([[1] * 64, [2] * 64]), MLP, (2, 64), np.float32),  # ints for a float model
        (body([[1] * 8] * 3), TOKENS, (3, 8), np.int64),
        (body([[True, False] * 32]), MLP, (1, 64), np.float32),
        (body([[1, 2.5], [3, 4]]), NONE, (2, 2), np.float32),  # no signature: any numbers
        (body([[1, 2, 3]]), NONE, (1, 3), np.float32),
        (body([[0.0] * 64]) + b"\n", MLP, (1, 64), np.float32),
    ],
    ids=[
        "float",
        "ints for float",
        "int64",
        "booleans for float",
        "no signature",
        "no signature, other width",
        "trailing newline",
    ],
)
def test_accepted_inputs(
    payload: bytes,
    signature: tuple[tuple[int, ...] | None, str | None],
    shape: tuple[int, ...],
    dtype: type,
) -> None:
    array = parse_inputs(payload, *signature)
    assert array.shape == shape
    assert array.dtype == dtype
    assert array.flags.c_contiguous
    np.testing.assert_array_equal(array, np.asarray(json.loads(payload)["inputs"], dtype=dtype))


@pytest.mark.parametrize(
    ("payload", "signature", "says"),
    [
        (body([[0.5] * 63]), MLP, ["(N, 64) float32", "got (1, 63)"]),
        (body([[0.5] * 65] * 2), MLP, ["(N, 64) float32", "got (2, 65)"]),
        (body([0.5] * 64), MLP, ["(N, 64) float32", "got (64)"]),
        (body([[[0.5] * 64]]), MLP, ["(N, 64) float32", "got (1, 1, 64)"]),
        (body([[0.5] * 64, [0.5] * 63]), MLP, ["rectangular"]),
        (body([[1, 2], [3]]), NONE, ["rectangular"]),
        (b"inputs=[[1,2]]", MLP, ["not JSON"]),
        (b"\xff\xfe", MLP, ["not JSON"]),
        (b"", MLP, ["not JSON"]),
        (json.dumps({"instances": [[1.0] * 64]}).encode(), MLP, ['"inputs"']),
        (json.dumps([[1.0] * 64]).encode(), MLP, ['"inputs"']),
        (body([]), MLP, ["at least one row", "(N, 64) float32"]),
        (body([[]]), MLP, ["(N, 64) float32"]),
        (body([]), NONE, ["at least one row"]),
        (body([[]]), NONE, ["at least one row"]),
        (body(3.5), MLP, ["at least one row"]),
        (body([["a"] * 64]), MLP, ["numbers", "(N, 64) float32"]),
        (body([[1, "2"]]), NONE, ["numbers"]),
        (body([[1.0, None]]), NONE, ["numbers"]),
        (body([[{"x": 1}] * 64]), MLP, ["numbers"]),
        (body([[0.5] * 8]), TOKENS, ["integers", "(N, 8) int64"]),
        (body([[1] * 7 + [1.0]]), TOKENS, ["integers", "(N, 8) int64"]),
        (body([[2**63] * 8]), TOKENS, ["(N, 8) int64"]),
        (body([[2**40] * 4]), ((-1, 4), "int32"), ["(N, 4) int32"]),
        (body([[-1, 256]]), ((-1, 2), "uint8"), ["(N, 2) uint8"]),
        (b'{"inputs": [[1.0, NaN]]}', NONE, ["finite"]),
        (b'{"inputs": [[Infinity, 1.0]]}', NONE, ["finite"]),
        (b'{"inputs": [[-Infinity, 1.0]]}', NONE, ["finite"]),
        (b'{"inputs": [[1e309, 1.0]]}', NONE, ["finite"]),
        (b'{"inputs": [[0.5, NaN]]}', ((-1, 2), "float32"), ["finite"]),
        (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", NONE, ["nested too deeply"]),
    ],
    ids=[
        "narrow",
        "wide",
        "one row without its list",
        "extra axis",
        "ragged",
        "ragged, no signature",
        "not JSON",
        "not UTF-8",
        "empty body",
        "missing inputs",
        "not an object",
        "no rows",
        "empty row",
        "no rows, no signature",
        "empty row, no signature",
        "a scalar",
        "strings",
        "a string among numbers",
        "null",
        "objects",
        "floats for int64",
        "one float for int64",
        "out of int64 range",
        "out of int32 range",
        "out of uint8 range",
        "NaN",
        "Infinity",
        "-Infinity",
        "1e309",
        "NaN for float32",
        "nested too deeply",
    ],
)
def test_refused_inputs_are_422_saying_why(
    payload: bytes,
    signature: tuple[tuple[int, ...] | None, str | None],
    says: list[str],
) -> None:
    with pytest.raises(PredictError) as info:
        parse_inputs(payload, *signature)
    assert info.value.status == 422
    for text in says:
        assert text in str(info.value)


def _prediction(version: str | None, run_id: str | None) -> Prediction:
    endpoint = ReplicaEndpoint(
        "r1", "127.0.0.1", 1, "mlp", version, run_id, (-1, 64), "float32", b"s" * 32
    )
    return Prediction(np.array([[0.25, -1.0], [2.0, 3.5]], dtype=np.float32), endpoint)


def test_render_gives_outputs_and_the_model_in_body_and_headers() -> None:
    payload, headers = render(_prediction("7", "abc123"))
    assert json.loads(payload) == {
        "outputs": [[0.25, -1.0], [2.0, 3.5]],
        "model": "mlp",
        "version": "7",
        "run_id": "abc123",
    }
    assert headers == {"x-model-name": "mlp", "x-model-version": "7", "x-mlflow-run-id": "abc123"}


def test_render_without_version_or_run() -> None:
    payload, headers = render(_prediction(None, None))
    data = json.loads(payload)
    assert (data["version"], data["run_id"]) == (None, None)
    assert headers["x-model-version"] == headers["x-mlflow-run-id"] == ""


def test_render_of_a_read_only_int_output() -> None:
    """Outputs decoded off the socket are read-only views, of any supported dtype."""
    outputs = np.frombuffer(np.arange(4, dtype=np.int64).tobytes(), dtype=np.int64).reshape(2, 2)
    endpoint = ReplicaEndpoint("r1", "h", 1, "tok", "1", None, None, None, b"s" * 32)
    payload, _ = render(Prediction(outputs, endpoint))
    assert json.loads(payload)["outputs"] == [[0, 1], [2, 3]]


def test_render_writes_non_finite_outputs_as_null() -> None:
    """A bare NaN is not JSON: a non-finite output is null, and the body parses strictly."""
    outputs = np.array([[np.nan, 1.5], [np.inf, -np.inf]], dtype=np.float32)
    endpoint = ReplicaEndpoint("r1", "h", 1, "mlp", "1", None, None, None, b"s" * 32)
    payload, _ = render(Prediction(outputs, endpoint))

    def not_json(constant: str) -> None:
        raise AssertionError(f"{constant} in the body")

    assert json.loads(payload, parse_constant=not_json)["outputs"] == [[None, 1.5], [None, None]]
