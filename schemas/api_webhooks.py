"""HTTP API objects of webhook endpoints and their deliveries (`/v1/webhooks`); see
:mod:`schemas.api`."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import msgspec

from schemas.api import Cursor, PageLimit

BatchEventType = Literal["batch.completed", "batch.failed", "batch.cancelled", "batch.expired"]
#: The batch events an endpoint may subscribe to (OpenAI's names); all of them by default.
BATCH_EVENTS: tuple[str, ...] = get_args(BatchEventType)


class WebhookRegistration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new endpoint; its signing secret is generated unless one is given."""

    url: Annotated[str, msgspec.Meta(description="An absolute http(s) URL")]
    name: str | None = None
    # Checked by hand (projections.webhooks.check_registration), each with its own message.
    event_types: (
        Annotated[
            list[str],
            msgspec.Meta(
                description="Default: every batch event",
                extra_json_schema={"items": {"enum": list(BATCH_EVENTS)}, "minItems": 1},
            ),
        ]
        | None
    ) = None
    signing_secret: Annotated[str, msgspec.Meta(description="A `whsec_…` secret to use")] | None = (
        None
    )


class WebhookEndpointObject(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["webhook_endpoint"]
    url: str
    name: str
    event_types: list[str]
    created_at: int
    signing_secret_hint: str


class CreatedWebhookEndpoint(WebhookEndpointObject):
    """The endpoint with its signing secret, which is shown this once."""

    signing_secret: str


class WebhookEndpointList(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A page; `first_id` and `last_id` are absent when it is empty."""

    object: Literal["list"]
    data: list[WebhookEndpointObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class DeletedWebhookEndpoint(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["webhook_endpoint.deleted"]
    deleted: bool


class WebhookAttempt(msgspec.Struct, forbid_unknown_fields=True):
    attempt: int
    attempted_at: int
    status_code: int | None
    error: str | None
    duration_ms: int | None
    outcome: str


class WebhookDelivery(msgspec.Struct, forbid_unknown_fields=True):
    """One notification sent to an endpoint, with every attempt."""

    id: str
    object: Literal["webhook_endpoint.delivery"]
    event_id: str
    event_type: str
    batch_id: str
    created_at: int
    status: Literal["pending", "delivered", "failed"]
    next_attempt_at: int | None
    attempts: list[WebhookAttempt]


class WebhookDeliveryList(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A page; `first_id` and `last_id` are absent when it is empty."""

    object: Literal["list"]
    data: list[WebhookDelivery]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class DeliveryListQuery(msgspec.Struct, forbid_unknown_fields=True):
    after: Cursor | None = None
    limit: PageLimit = 20
