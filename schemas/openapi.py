"""The OpenAPI 3.1 document of everything under ``/v1``, generated from the msgspec structs the
handlers encode and decode (``schemas.api*``) and the route table below.

Served at ``GET /v1/openapi.json`` and exported to ``schemas/openapi.json`` by
``python -m schemas.export``. A unit test checks that every ``/v1`` route the application
registers is in :data:`OPERATIONS`, so a new route cannot be left undocumented.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import msgspec

from schemas import api, api_dashboard, api_keys, api_requests, api_responses, api_webhooks

VERSION = "0.1.0"
_REF = "#/components/schemas/{name}"


@dataclass(frozen=True)
class Link:
    """An OpenAPI link: where the id (or body) of a response leads."""

    operation_id: str
    parameters: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class Reply:
    """A successful answer: a JSON struct, JSON Lines of a struct, or nothing."""

    status: int
    description: str
    body: type | None = None
    schema: dict[str, Any] | None = None  # a JSON body no struct describes
    lines: tuple[type, ...] = ()  # JSON Lines, each line one of these
    events: bool = False  # server-sent events too (`stream: true`)
    links: dict[str, Link] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    replies: tuple[Reply, ...]
    errors: tuple[int | str, ...]  # statuses (or `4XX` ranges) answered with ErrorEnvelope
    query: type | None = None  # a struct whose fields are the query parameters
    body: type | None = None  # a JSON struct
    form: type | None = None  # a multipart/form-data struct
    path_id: str | None = None  # what `{id}` names
    headers: dict[str, str] = field(default_factory=dict)  # optional header: description
    public: bool = False  # no API key needed
    errors_with: dict[int, type] = field(default_factory=dict)  # statuses with another body


_ERRORS: dict[int | str, str] = {
    400: "The request is invalid (a parameter, the body or an id's format)",
    401: "The API key is missing, unknown or revoked",
    403: "The caller may not use this model, or see this view",
    404: "Not found: missing, or another user's",
    409: "The object is not in a state that allows this",
    413: "The body is too large",
    429: "Too many downloads in progress for this user",
    499: "The flex request was cancelled before it ended",
    501: "Webhooks are not enabled on this server",
    502: "The upstream answered something unusable, or a multi-step response failed",
    503: "The database or broker is unavailable, or the projection is not advancing; retry",
    504: "The request did not end within the server's wait",
    "4XX": "The upstream's own error, with its status",
    "5XX": "The upstream's own error, with its status",
}
_LINE_HEADERS = {
    "X-Incomplete": {
        "description": "`true` while more lines exist or may still come",
        "schema": {"type": "string", "enum": ["true", "false"]},
    },
    "X-Last-Line": {
        "description": "With `limit`: the number of the last line of this page (`skip` + lines)",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
}

FILE = "The file's id"
BATCH = "The batch's id"
REQUEST = "The request's id (its uuid, or the `resp_…` id it answered with)"
RESPONSE = "The response's id (`resp_…`)"
WEBHOOK = "The endpoint's id"
KEY = "The API key's id"

_BATCH_LINKS = {
    "retrieve": Link("retrieveBatch", {"id": "$response.body#/id"}),
    "cancel": Link("cancelBatch", {"id": "$response.body#/id"}),
    "results": Link("listBatchResults", {"id": "$response.body#/id"}),
    "retry": Link("retryBatch", {"id": "$response.body#/id"}),
    "delete": Link("deleteBatch", {"id": "$response.body#/id"}),
}
_REQUEST_LINKS = {
    "request": Link("retrieveRequest", {"id": "$response.body#/id"}),
    "cancel": Link("cancelRequest", {"id": "$response.body#/id"}),
    "delete": Link("deleteRequest", {"id": "$response.body#/id"}),
}
# What every authenticated operation may answer besides its own errors.
_COMMON = (401, 503)
_PROXIED = (400, 403, 413, "4XX", "5XX")

OPERATIONS: tuple[Operation, ...] = (
    # -- files
    Operation(
        "post", "/v1/files", "uploadFile", "Upload a JSONL file of requests", "Files",
        (
            Reply(
                201, "The file", api.FileObject,
                links={
                    "retrieve": Link("retrieveFile", {"id": "$response.body#/id"}),
                    "content": Link("downloadFileContent", {"id": "$response.body#/id"}),
                    "delete": Link("deleteFile", {"id": "$response.body#/id"}),
                    "batch": Link(
                        "createBatch",
                        body={
                            "input_file_id": "$response.body#/id",
                            "endpoint": "/v1/chat/completions",
                            "completion_window": "24h",
                        },
                    ),
                },
            ),
        ),
        (400, 409, 413), form=api.FileUpload,
        headers={"Idempotency-Key": "A retried upload with the same key answers the file the first attempt created (409 once it is deleted or expired)"},
    ),
    Operation(
        "get", "/v1/files", "listFiles", "List the caller's files", "Files",
        (Reply(200, "A page of files", api.FileList),), (400,), query=api.FileListQuery,
    ),
    Operation(
        "get", "/v1/files/{id}", "retrieveFile", "A file", "Files",
        (Reply(200, "The file", api.FileObject),), (400, 404), path_id=FILE,
    ),
    Operation(
        "delete", "/v1/files/{id}", "deleteFile", "Delete a file", "Files",
        (Reply(200, "Deleted", api.DeletedFile),), (400, 404), path_id=FILE,
    ),
    Operation(
        "get", "/v1/files/{id}/content", "downloadFileContent",
        "A file's lines: input lines, or a batch's output or error lines", "Files",
        (Reply(200, "JSON Lines", lines=(api.InputLine, api.OutputLine)),),
        (400, 404, 429), query=api.LinesQuery, path_id=FILE,
    ),
    # -- batches
    Operation(
        "post", "/v1/batches", "createBatch", "Create a batch from an uploaded file", "Batches",
        (Reply(201, "The batch", api.BatchObject, links=_BATCH_LINKS),),
        (400, 404, 413), body=api.BatchCreate,
    ),
    Operation(
        "get", "/v1/batches", "listBatches", "List the caller's batches, newest first", "Batches",
        (Reply(200, "A page of batches", api.BatchList),), (400,), query=api.BatchListQuery,
    ),
    Operation(
        "get", "/v1/batches/{id}", "retrieveBatch", "A batch", "Batches",
        (Reply(200, "The batch", api.BatchObject),), (400, 404), path_id=BATCH,
    ),
    Operation(
        "delete", "/v1/batches/{id}", "deleteBatch",
        "Delete a batch (cancelling what runs) with its output and error files", "Batches",
        (Reply(204, "Deleted: none of its requests can run any more"),), (400, 404),
        path_id=BATCH,
    ),
    Operation(
        "post", "/v1/batches/{id}/cancel", "cancelBatch", "Cancel a batch", "Batches",
        (Reply(200, "The batch, cancelling or cancelled", api.BatchObject),), (400, 404, 409),
        path_id=BATCH,
    ),
    Operation(
        "post", "/v1/batches/{id}/retry", "retryBatch",
        "Run a batch's failed and cancelled requests again", "Batches",
        (Reply(200, "The batch, in progress again", api.BatchObject),), (400, 404, 409),
        path_id=BATCH,
    ),
    Operation(
        "post", "/v1/batches/{id}/retry-requests", "retryBatchRequests",
        "Run chosen failed requests of a batch again", "Batches",
        (Reply(200, "The batch, in progress again", api.BatchObject),), (400, 404, 409, 413),
        body=api.RetryRequestsBody, path_id=BATCH,
    ),
    Operation(
        "get", "/v1/batches/{id}/results", "listBatchResults",
        "Every row of a batch in line order, while it runs and after", "Batches",
        (Reply(200, "JSON Lines", lines=(api.BatchResultLine,)),), (400, 404, 429),
        query=api.ResultsQuery, path_id=BATCH,
    ),
    # -- requests without a batch
    Operation(
        "get", "/v1/requests", "listRequests", "List the caller's requests without a batch",
        "Requests", (Reply(200, "A page of requests", api_requests.RequestList),), (400,),
        query=api_requests.RequestListQuery,
    ),
    Operation(
        "get", "/v1/requests/{id}", "retrieveRequest", "A request with its bodies", "Requests",
        (Reply(200, "The request", api_requests.RequestDetails),), (400, 404), path_id=REQUEST,
    ),
    Operation(
        "post", "/v1/requests/{id}/cancel", "cancelRequest", "Cancel a flex request", "Requests",
        (Reply(200, "The request, ended", api_requests.RequestDetails),), (400, 404, 409),
        path_id=REQUEST,
    ),
    Operation(
        "post", "/v1/requests/{id}/retry", "retryRequest", "Run a failed flex request again",
        "Requests", (Reply(200, "The request, pending again", api_requests.RequestDetails),),
        (400, 404), path_id=REQUEST,
    ),
    Operation(
        "delete", "/v1/requests/{id}", "deleteRequest", "Erase a request and its bodies",
        "Requests", (Reply(204, "Erased"),), (400, 404, 409), path_id=REQUEST,
    ),
    # -- requests the API runs or proxies
    Operation(
        "post", "/v1/chat/completions", "createChatCompletion",
        "A chat completion: in realtime from the model's upstream, or flex on the engine",
        "Requests",
        (
            Reply(
                200, "The upstream's completion", api_responses.ChatCompletion, events=True,
                links={"request": _REQUEST_LINKS["request"]},
            ),
        ),
        (*_PROXIED, 499, 504), body=api_responses.ChatCompletionCreate,
    ),
    Operation(
        "post", "/v1/embeddings", "createEmbedding", "Embeddings from the model's upstream",
        "Requests", (Reply(200, "The upstream's embeddings", api_responses.EmbeddingList),),
        _PROXIED, body=api_responses.EmbeddingCreate,
    ),
    Operation(
        "post", "/v1/responses", "createResponse",
        "A response: realtime, background, flex, or a multi-step chain with tools", "Responses",
        (
            Reply(
                200, "The response", api_responses.ResponseObject, events=True,
                links={
                    "retrieve": Link("retrieveResponse", {"id": "$response.body#/id"}),
                    **_REQUEST_LINKS,
                },
            ),
            Reply(
                202, "Accepted (background): poll it", api_responses.ResponseObject,
                links={"retrieve": Link("retrieveResponse", {"id": "$response.body#/id"})},
            ),
        ),
        (*_PROXIED, 504), body=api_responses.ResponseCreate,
        errors_with={502: api_responses.ChainFailure},
    ),
    Operation(
        "get", "/v1/responses/{id}", "retrieveResponse", "A response", "Responses",
        (Reply(200, "The response", api_responses.ResponseObject),), (404,), path_id=RESPONSE,
    ),
    # -- webhooks
    Operation(
        "post", "/v1/webhooks", "createWebhook", "Register a webhook endpoint", "Webhooks",
        (
            Reply(
                201, "The endpoint with its signing secret (shown once)",
                api_webhooks.CreatedWebhookEndpoint,
                links={
                    "retrieve": Link("retrieveWebhook", {"id": "$response.body#/id"}),
                    "deliveries": Link("listWebhookDeliveries", {"id": "$response.body#/id"}),
                    "delete": Link("deleteWebhook", {"id": "$response.body#/id"}),
                },
            ),
        ),
        (400, 413, 501), body=api_webhooks.WebhookRegistration,
    ),
    Operation(
        "get", "/v1/webhooks", "listWebhooks", "The caller's webhook endpoints", "Webhooks",
        (Reply(200, "Every endpoint", api_webhooks.WebhookEndpointList),), (),
    ),
    Operation(
        "get", "/v1/webhooks/{id}", "retrieveWebhook", "A webhook endpoint", "Webhooks",
        (Reply(200, "The endpoint", api_webhooks.WebhookEndpointObject),), (404,),
        path_id=WEBHOOK,
    ),
    Operation(
        "delete", "/v1/webhooks/{id}", "deleteWebhook", "Delete a webhook endpoint", "Webhooks",
        (Reply(200, "Deleted", api_webhooks.DeletedWebhookEndpoint),), (404,), path_id=WEBHOOK,
    ),
    Operation(
        "get", "/v1/webhooks/{id}/deliveries", "listWebhookDeliveries",
        "An endpoint's deliveries, newest first, with every attempt", "Webhooks",
        (Reply(200, "A page of deliveries", api_webhooks.WebhookDeliveryList),), (400, 404),
        query=api_webhooks.DeliveryListQuery, path_id=WEBHOOK,
    ),
    # -- the caller's API keys
    Operation(
        "get", "/v1/keys", "listKeys", "The caller's API keys (ids and times, never secrets)",
        "Keys", (Reply(200, "Every key of the caller", api_keys.ApiKeyList),), (),
    ),
    Operation(
        "delete", "/v1/keys/{id}", "revokeKey", "Revoke one of the caller's keys", "Keys",
        (Reply(200, "The key, revoked", api_keys.ApiKeyObject),), (400, 404), path_id=KEY,
    ),
    # -- the dashboard's views
    Operation(
        "get", "/v1/dashboard/me", "dashboardUser", "Who the key belongs to", "Dashboard",
        (Reply(200, "The caller", api_dashboard.DashboardUser),), (),
    ),
    Operation(
        "get", "/v1/dashboard/queues", "dashboardQueues",
        "The caller's unfinished requests per model", "Dashboard",
        (Reply(200, "Queue depths", api_dashboard.QueueDepths),), (),
    ),
    Operation(
        "get", "/v1/dashboard/throughput", "dashboardThroughput",
        "The engine's throughput and latency over the last hour (operators)", "Dashboard",
        (Reply(200, "One point per minute", api_dashboard.Throughput),), (403,),
    ),
    # -- this document
    Operation(
        "get", "/v1/openapi.json", "getOpenAPI", "This document", "Meta",
        (Reply(200, "The OpenAPI document", schema={"type": "object"}),), (), public=True,
    ),
)  # fmt: skip


def document() -> dict[str, Any]:
    """The whole OpenAPI document (deterministic: the exported file is compared byte for
    byte)."""
    structs = _structs()
    _, components = msgspec.json.schema_components(structs, ref_template=_REF)
    for schema in components.values():
        _tidy(schema)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Cannonade",
            "version": VERSION,
            "summary": "OpenAI-compatible files, batches and requests, run by an "
            "event-sourced engine",
            "description": "Every call needs `Authorization: Bearer <API key>` (except this "
            "document). Every error is the OpenAI envelope "
            '`{"error": {"message", "type", "param", "code"}}`. Another user\'s object '
            "answers 404 exactly like a missing one.",
        },
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}],
        "tags": [{"name": t} for t in dict.fromkeys(op.tag for op in OPERATIONS)],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (`cannonade admin keys create --user NAME`)",
                }
            },
        },
    }


def render() -> bytes:
    encoded = msgspec.json.encode(document(), order="deterministic")
    return msgspec.json.format(encoded, indent=2) + b"\n"


def _structs() -> list[Any]:
    """Every struct the paths refer to, in a stable order (forms and queries are inlined)."""
    found: dict[Any, None] = {api.ErrorEnvelope: None}
    for op in OPERATIONS:
        for reply in op.replies:
            found.update(dict.fromkeys(reply.lines))
            if reply.body is not None:
                found[reply.body] = None
        if op.body is not None:
            found[op.body] = None
        found.update(dict.fromkeys(op.errors_with.values()))
        if any(reply.events for reply in op.replies):
            found[api_responses.StreamEvent] = None
    return list(found)


def _tidy(schema: Any) -> None:
    """Docstrings as descriptions without their indentation."""
    if isinstance(schema, dict):
        if isinstance(schema.get("description"), str):
            schema["description"] = inspect.cleandoc(schema["description"])
        for value in schema.values():
            _tidy(value)
    elif isinstance(schema, list):
        for value in schema:
            _tidy(value)


def _ref(tp: type) -> dict[str, str]:
    return {"$ref": _REF.format(name=tp.__name__)}


def _inline(tp: type) -> dict[str, Any]:
    """A struct's own schema (an object), for forms and query parameters."""
    _, components = msgspec.json.schema_components([tp], ref_template=_REF)
    schema = components[tp.__name__]
    _tidy(schema)
    return schema  # type: ignore[no-any-return]


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter or form field is absent rather than null."""
    branches = schema.get("anyOf")
    if branches is None:
        return schema
    kept = [b for b in branches if b != {"type": "null"}]
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    if schema.get("default") is not None:
        rest["default"] = schema["default"]
    return {**kept[0], **rest} if len(kept) == 1 else {"anyOf": kept, **rest}


def _parameters(op: Operation) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if op.path_id is not None:
        out.append(
            {
                "name": "id",
                "in": "path",
                "required": True,
                "description": op.path_id,
                "schema": {"type": "string"},
            }
        )
    for name, description in op.headers.items():
        out.append(
            {
                "name": name,
                "in": "header",
                "required": False,
                "description": description,
                "schema": {"type": "string", "minLength": 1, "maxLength": 256},
            }
        )
    if op.query is not None:
        schema = _inline(op.query)
        required = set(schema.get("required", ()))
        for name, prop in schema["properties"].items():
            prop = _without_null(prop)
            param: dict[str, Any] = {"name": name, "in": "query", "required": name in required}
            if "description" in prop:
                param["description"] = prop.pop("description")
            if prop.get("type") == "array":
                param |= {"style": "form", "explode": True}
            out.append(param | {"schema": prop})
    return out


def _form(tp: type) -> dict[str, Any]:
    schema = _inline(tp)
    schema["properties"] = {k: _without_null(v) for k, v in schema["properties"].items()}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": schema,
                "encoding": {"file": {"contentType": "application/octet-stream"}},
            }
        },
    }


def _error(status: int | str, body: type = api.ErrorEnvelope) -> dict[str, Any]:
    return {
        "description": _ERRORS[status],
        "content": {"application/json": {"schema": _ref(body)}},
    }


def _reply(reply: Reply) -> dict[str, Any]:
    out: dict[str, Any] = {"description": reply.description}
    content: dict[str, Any] = {}
    if reply.body is not None:
        content["application/json"] = {"schema": _ref(reply.body)}
    elif reply.schema is not None:
        content["application/json"] = {"schema": reply.schema}
    if reply.lines:
        names = " or ".join(f"`{tp.__name__}`" for tp in reply.lines)
        items = [_ref(tp) for tp in reply.lines]
        content["application/x-ndjson"] = {
            "schema": {"type": "string", "description": f"One {names} per line"},
            "x-item-schema": items[0] if len(items) == 1 else {"anyOf": items},
        }
        out["headers"] = _LINE_HEADERS
    if reply.events:
        content["text/event-stream"] = {"schema": _ref(api_responses.StreamEvent)}
    if content:
        out["content"] = content
    if reply.links:
        out["links"] = {name: _link(link) for name, link in reply.links.items()}
    return out


def _link(link: Link) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": link.operation_id}
    if link.parameters:
        out["parameters"] = link.parameters
    if link.body is not None:
        out["requestBody"] = link.body
    return out


def _operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag]}
    parameters = _parameters(op)
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(op.body)}},
        }
    elif op.form is not None:
        out["requestBody"] = _form(op.form)
    responses = {str(r.status): _reply(r) for r in op.replies}
    errors = op.errors if op.public else (*op.errors, *_COMMON)
    for status in sorted(set(errors), key=str):
        responses[str(status)] = _error(status)
    for status, body in op.errors_with.items():
        responses[str(status)] = _error(status, body)
    out["responses"] = dict(sorted(responses.items()))
    if op.public:
        out["security"] = []
    return out
