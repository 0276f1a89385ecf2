"""Hostile predict requests against a real deployment: too many rows is refused once
(413, no ``Retry-After``), non-finite inputs get 422, and a non-finite output comes
back as JSON ``null``, never as a bare ``NaN``."""

from __future__ import annotations

import json

import torch

from tests.integration.conftest import Api
from tests.integration.serving_helpers import (
    DIM,
    deploy,
    deploy_yaml,
    log_model,
    rows,
    wait_deployment,
)
from workers.interface.channel import MAX_ROWS_FACTOR

MAX_BATCH = 2


def test_predict_refuses_oversize_and_non_finite_inputs_and_writes_json(api: Api) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 2))
    with torch.no_grad():  # every output is the sum of the inputs: large inputs overflow
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    log_model(api.tracking_uri, "sum", model)
    deploy(api, deploy_yaml("sum", "models:/sum/1", batching=f"{{max_batch_size: {MAX_BATCH}}}"))
    wait_deployment(api, "sum")
    url = "/v1/models/sum/predict"

    limit = MAX_BATCH * MAX_ROWS_FACTOR
    assert api.http.post(url, json={"inputs": rows(limit)}).status_code == 200
    for _ in range(2):  # the same answer at every try: nothing to wait for
        too_many = api.http.post(url, json={"inputs": rows(limit + 1)})
        assert too_many.status_code == 413
        assert "retry-after" not in too_many.headers
        assert f"{limit + 1} rows" in too_many.json()["detail"]
        assert f"at most {limit} per request" in too_many.json()["detail"]

    row = ", ".join(["0.5"] * (DIM - 1))
    for bad in ("NaN", "Infinity", "-Infinity", "1e309"):
        body = f'{{"inputs": [[{row}, {bad}]]}}'
        response = api.http.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422, (bad, response.text)
        assert "finite" in response.json()["detail"]

    finite_but_overflowing = [[3e38] * DIM, [1.0] * DIM]
    answer = api.http.post(url, json={"inputs": finite_but_overflowing})
    assert answer.status_code == 200
    outputs = json.loads(answer.text, parse_constant=_not_json)["outputs"]
    assert outputs == [[None, None], [float(DIM), float(DIM)]]


def _not_json(constant: str) -> None:
    raise AssertionError(f"the body holds {constant}, which is not JSON")
