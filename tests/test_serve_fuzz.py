"""schemathesis against the server's request schemas (issue 30): bodies generated from the
pydantic models the routes validate with (valid ones and, schemathesis's negative mode, invalid
ones) must never get a 5xx. Bounded: a few dozen cases per route on the shipped model, about a
minute in all; the attack of issue 30 ran 13,682 such cases once, by hand.

The app serves no OpenAPI document (``openapi_url=None``: its POST routes read the body
themselves to bound it), so the test builds one from the same schemas."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402  (schemathesis brings hypothesis)
from serve_util import running_server  # noqa: E402


def openapi_document() -> dict:
    """OpenAPI 3.1 for the routes: request bodies from the server's own pydantic models."""
    from asarm.serve.schemas import ScoreRequest, generation_schemas

    completion, infill = generation_schemas()
    components: dict = {}

    def body(model) -> dict:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        return {"required": True, "content": {"application/json": {"schema": schema}}}

    answered = {"200": {"description": "the answer"}, "default": {"description": "an error"}}
    paths = {route: {"post": {"requestBody": body(model), "responses": answered}}
             for route, model in (("/v1/completions", completion), ("/v1/infill", infill), ("/v1/score", ScoreRequest))}
    paths.update({route: {"get": {"responses": answered}} for route in ("/health", "/v1/models", "/metrics")})
    return {"openapi": "3.1.0", "info": {"title": "asarm", "version": "1"}, "paths": paths,
            "components": {"schemas": components}}


schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def base_url():
    with running_server(max_batch=8, max_queue=64, request_timeout=60) as (url, _):
        yield url


@schema.parametrize()
@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
def test_generated_requests_never_get_a_5xx(case, base_url):
    response = case.call(base_url=base_url, timeout=120)
    assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:300])
