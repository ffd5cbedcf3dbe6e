"""The OpenAPI document: current on disk, a valid OpenAPI 3.1 document, covering every `/v1`
route the application registers, and describing what the handlers' builders produce."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from openapi_spec_validator import validate

from cannonade.config import Config
from projections.api.app import create_app
from projections.rules.responses import RequestDetail, chat_completion_result, response_object
from schemas import export, openapi
from schemas.api import ErrorEnvelope
from schemas.api_responses import ResponseObject
from schemas.errors import ApiError, not_found

DOCUMENT: dict[str, Any] = msgspec.json.decode(openapi.render())
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_exported_document_is_current() -> None:
    assert export.OPENAPI.read_bytes() == openapi.render(), "run `python -m schemas.export`"


def test_document_is_valid_openapi_3_1() -> None:
    validate(DOCUMENT)
    assert DOCUMENT["openapi"].startswith("3.1")


def test_every_v1_route_is_documented_and_nothing_else() -> None:
    registered = {
        (route.method.lower(), route.resource.canonical)
        for route in create_app(Config()).router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/v1/")
        and route.method != "HEAD"  # aiohttp's automatic twin of each GET
    }
    documented = {(method, path) for path, ops in DOCUMENT["paths"].items() for method in ops}
    assert registered - documented == set(), "add the routes to schemas.openapi.OPERATIONS"
    assert documented - registered == set(), "documented routes the API does not serve"


def test_every_error_is_the_envelope_and_every_call_needs_a_key_but_the_document() -> None:
    for path, ops in DOCUMENT["paths"].items():
        for method, op in ops.items():
            public = op.get("security") == []
            assert public == (path == "/v1/openapi.json"), (method, path)
            statuses = op["responses"]
            assert public or "401" in statuses, (method, path)
            for status, reply in statuses.items():
                if status.startswith("4"):
                    schema = reply["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorEnvelope"}, (path, status)


def test_links_name_real_operations_and_parameters() -> None:
    operations = {
        op["operationId"]: op for ops in DOCUMENT["paths"].values() for op in ops.values()
    }
    for ops in DOCUMENT["paths"].values():
        for op in ops.values():
            for reply in op["responses"].values():
                for link in reply.get("links", {}).values():
                    target = operations[link["operationId"]]
                    names = {p["name"] for p in target.get("parameters", [])}
                    assert set(link.get("parameters", {})) <= names, link
                    assert ("requestBody" in link) <= ("requestBody" in target), link


def test_query_parameters_are_never_null() -> None:
    for ops in DOCUMENT["paths"].values():
        for op in ops.values():
            for param in op.get("parameters", []):
                assert "anyOf" not in param["schema"], param
                assert param["schema"].get("type") != "null", param


def test_errors_raised_anywhere_are_envelopes() -> None:
    for error in (ApiError(400, "bad", param="limit"), not_found("File", "f"), ApiError(503, "x")):
        msgspec.convert(error.envelope(), ErrorEnvelope)
    for state, error_text in (("failed", "boom"), ("canceled", None), ("processing", None)):
        detail = RequestDetail(id="r", state=state, model="m", created_at=NOW, error=error_text)
        msgspec.convert(chat_completion_result(detail)[1], ErrorEnvelope)


def test_stored_responses_are_response_objects() -> None:
    for state in ("pending", "processing", "completed", "failed", "canceled"):
        detail = RequestDetail(
            id="0b8e4f0e-7a1c-4c53-9a0e-2f4f7c2b9d11", state=state, model="m", created_at=NOW,
            body='{"model":"m","input":"hi"}', error="boom", response_body='{"output":[]}',
        )  # fmt: skip
        msgspec.convert(response_object(detail), ResponseObject)
