"""The service's own OpenAPI schema turned into requests (Schemathesis, on Hypothesis) against a live server.

Every operation gets schema-valid requests, and those with a body invalid ones too, from a fixed seed
(`derandomize`): no answer may be a 5xx, every answer must be one the schema documents (status, content type, body,
each event of a stream), and the server must keep serving. Both backends' tests call `fuzz` (tests/test_serve_fuzz.py,
tests/test_serve_vllm.py).
"""

from __future__ import annotations

from collections import Counter

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def fuzz(url: str, model: str, *, examples: int, answering: set[str], headers: dict[str, str] | None = None
         ) -> Counter:
    """Run `examples` valid and `examples` invalid requests per operation; the statuses of the answers by
    (operation, mode, status). Valid bodies name the served `model` (a random name is only ever a 404); the
    operations in `answering` (e.g. "POST /v1/answer") must have answered some with a 200, not only refused them."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: Counter = Counter()

    def served(case: schemathesis.Case) -> schemathesis.Case:
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        return case

    for result in schema.get_all_operations():
        operation = result.ok()
        # a request with no parameters and no body cannot be made invalid
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method == "post" else [])
        for mode in modes:

            @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode).map(served if mode == GenerationMode.POSITIVE else lambda c: c))
            def one(case: schemathesis.Case) -> None:
                response = case.call(base_url=url, headers=headers, timeout=120)
                statuses[(operation.label, mode.value, response.status_code)] += 1
                case.validate_response(response, checks=CHECKS, headers=headers)

            one()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200, f"after {operation.label}"
    answered = {label for (label, mode, status) in statuses if mode == "positive" and status == 200}
    assert answering <= answered, statuses
    return statuses
