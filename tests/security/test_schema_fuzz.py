"""schemathesis over the API's OpenAPI schema, against a real control plane on loopback.

Every operation gets a bounded, derandomized set of generated requests, valid ones
and invalid ones; every answer must be no server error, a status code the schema
documents, of a documented content type, with a body matching its schema.
(schemathesis' own pytest parametrization does not run under this pytest, so the
operations are walked here, each under its own hypothesis test.)
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import Api

EXAMPLES_PER_OPERATION = 30
POSITIVE = schemathesis.GenerationMode.POSITIVE
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_every_answer_matches_the_schema(api: Api, api_headers: dict[str, str]) -> None:
    base_url = str(api.http.base_url)
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=dict(api_headers))
    operations = [result.ok() for result in schema.get_all_operations()]
    tried: set[tuple[str, schemathesis.GenerationMode]] = set()
    assert len(operations) >= 14, [op.label for op in operations]
    for operation in operations:
        for mode in schemathesis.GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            def answers_match(case: schemathesis.Case) -> None:
                case.call_and_validate(
                    base_url=base_url, headers=api_headers, timeout=30, checks=CHECKS
                )

            try:
                answers_match()
            except Unsatisfiable:
                # No invalid request exists for an operation whose inputs take any value
                # (GET /healthz, a path's free-form id); a valid one always does.
                if mode is POSITIVE:
                    raise
                continue
            tried.add((operation.label, mode))
    assert sum(mode is not POSITIVE for _, mode in tried) >= 5, sorted(tried)
