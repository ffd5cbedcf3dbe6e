"""HTTP API objects of requests without a batch that the API runs or proxies:
`/v1/chat/completions`, `/v1/embeddings` and `/v1/responses`; see :mod:`schemas.api`.

Their bodies are OpenAI's, passed to the model's upstream and back: the structs declare what
Cannonade reads or guarantees, and leave every other field open.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Model = Annotated[str, msgspec.Meta(description="A model the caller may use on this endpoint")]
Tier = Annotated[
    str,
    msgspec.Meta(description="`flex` runs the request on the engine; anything else in realtime"),
]


class ChatCompletionCreate(msgspec.Struct):
    """An OpenAI chat completion request, sent to the model's upstream as it is."""

    model: Model
    messages: list[Any] = []
    service_tier: Tier | None = None
    stream: Annotated[bool, msgspec.Meta(description="Server-sent events, in realtime")] = False


class EmbeddingCreate(msgspec.Struct):
    """An OpenAI embeddings request, sent to the model's upstream as it is (also when flex)."""

    model: Model
    input: str | list[Any] = ""
    service_tier: Tier | None = None


class ResponseCreate(msgspec.Struct):
    """An OpenAI Responses request, translated into one upstream chat completion; with tools,
    a multi-step chain."""

    model: Model
    input: Annotated[str | list[Any], msgspec.Meta(description="Text or input items")] = ""
    service_tier: Tier | None = None
    background: Annotated[
        bool, msgspec.Meta(description="Answer 202 at once; poll GET /v1/responses/{id}")
    ] = False
    stream: Annotated[bool, msgspec.Meta(description="Server-sent events, in realtime")] = False


class ChatCompletion(msgspec.Struct):
    """The upstream's chat completion, its id the `resp_<uuid>` the request is known by."""

    id: str
    object: str
    choices: list[Any]


class EmbeddingList(msgspec.Struct):
    """The upstream's answer, as it is."""

    object: str
    data: list[Any]


class ResponseObject(msgspec.Struct):
    """An OpenAI Responses object."""

    id: Annotated[str, msgspec.Meta(pattern="^resp_")]
    object: Literal["response"]
    created_at: int
    status: Annotated[
        str,
        msgspec.Meta(description="queued, in_progress, completed, incomplete, failed, cancelled"),
    ]
    model: str
    output: list[Any]
    background: bool
    tools: list[Any]
    tool_choice: Any
    parallel_tool_calls: bool


class StreamEvent(msgspec.Struct):
    """One server-sent event of a streamed answer (`stream: true`)."""

    data: Annotated[
        str,
        msgspec.Meta(
            description="A chat completion chunk, or a Responses event, as JSON; `[DONE]` ends a chat stream"
        ),  # fmt: skip
    ]
    event: str = "message"
    id: str | None = None


class ChainFailure(msgspec.Struct):
    """A multi-step response that failed: the failing step's payload."""

    error: Any
