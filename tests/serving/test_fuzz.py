"""Schemathesis fuzzes every operation of the served OpenAPI schema: no input gives a 5xx.

Bodies are drawn from the schema in both modes (positive: valid by the schema; negative:
violating it), with Hypothesis derandomised so a failure replays. A path's session_id is
replaced by a live session's for the reading and posting operations, so row validation is
fuzzed past the 404 too. Responses are also checked against the documented status codes and
response schemas. (Schemathesis' pytest plugin does not load under this pytest; its case
strategies are driven by Hypothesis directly.)
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from tests.serving.server import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}
PAST = 6
EXAMPLES = 20  # per operation and mode: 11 operations x 2 modes x 20 ~ 440 requests
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live_session(server, runs):
    with server.client() as client:
        created = client.post("/v1/sessions", json={"line_id": "LINE-fuzz",
                                                    "past": runs[0][:PAST]})  # fmt: skip
        assert created.status_code == 201, created.text
        yield created.json()["session_id"]
        client.delete(f"/v1/sessions/{created.json()['session_id']}")


def _operations(server) -> list:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)
    return [result.ok() for result in schema.get_all_operations()]


def test_the_schema_lists_every_operation(server):
    labels = {op.label for op in _operations(server)}
    assert "POST /v1/sessions/{session_id}/observations" in labels and len(labels) == 11


def _fuzzer(operation, mode, server, session_id: str, seen: dict):
    """A Hypothesis test of one operation: draw a case, call the server, check the answer."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def fuzz(case):
        if "session_id" in (case.path_parameters or {}) and case.method != "DELETE":
            case.path_parameters["session_id"] = session_id
        response = case.call(base_url=server.url, headers=AUTH)
        seen.setdefault(operation.label, set()).add(response.status_code)
        case.validate_response(response, checks=CHECKS)

    return fuzz


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_makes_the_service_fail(server, live_session, mode):
    seen: dict[str, set[int]] = {}
    for operation in _operations(server):
        try:
            _fuzzer(operation, mode, server, live_session, seen)()
        except Unsatisfiable:  # nothing to violate (no body, no parameter): GET /healthz ...
            assert mode == GenerationMode.NEGATIVE and operation.method == "get", operation.label
    assert all(code < 500 for codes in seen.values() for code in codes), seen
    print(mode, seen)
