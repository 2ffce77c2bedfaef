"""The public job contract: what upstream systems put on RabbitMQ, and its validation.

A job is a dramatiq message (README.md, "Wire format") whose ``kwargs`` match one of these
models; a job that does not is dead-lettered with :func:`parse_job`'s reason, never retried.
``config/jobs.schema.json`` is generated from them (``verloop-worker schema``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationError,
)

from worker.connections.redis_keys import join_parts
from worker.jobs.json_limits import MAX_JSON_DEPTH, check_json_limits
from worker.jobs.phones import normalize_e164
from worker.send.ledger import LedgerKey

__all__ = [
    "CAMPAIGN_QUEUE",
    "ID_PATTERN",
    "MANAGE_QUEUE",
    "MAX_JSON_DEPTH",
    "MAX_METADATA_BYTES",
    "SEND_QUEUE",
    "TEXT_MAX_CHARS",
    "Job",
    "ListClientsJob",
    "RefreshPhoneTokenJob",
    "SendMessageJob",
    "check_json_limits",
    "describe_validation_error",
    "lane_of",
]

#: Queue of transactional sends.
SEND_QUEUE = "verloop.send"
#: Queue of campaign sends: same ``send_message`` contract, paced behind transactional sends.
CAMPAIGN_QUEUE = "verloop.campaign"
#: Queue of management jobs (listing clients, refreshing tokens).
MANAGE_QUEUE = "verloop.manage"


def lane_of(queue: str) -> Literal["transactional", "campaign"]:
    """The lane of the jobs on ``queue``: campaign sends are paced behind the rest."""
    return "campaign" if queue == CAMPAIGN_QUEUE else "transactional"


#: WhatsApp's limit on a text message body.
TEXT_MAX_CHARS = 4096
#: WhatsApp's limit on a media caption.
CAPTION_MAX_CHARS = 1024
#: ``metadata`` is echoed in every log line of the job, so it is kept small.
MAX_METADATA_BYTES = 4096

ID_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"
Identifier = Annotated[str, Field(pattern=ID_PATTERN, description="Verloop identifier")]

#: An idempotency key travels as an HTTP header (``Idempotency-Key``): printable ASCII only,
#: no leading or trailing space.
_KEY_PATTERN = r"^[!-~]([ -~]{0,198}[!-~])?$"
_KEY = re.compile(_KEY_PATTERN)


def _header_safe(value: str) -> str:
    if not _KEY.match(value):
        raise ValueError(
            "must be 1-200 printable ASCII characters without leading or trailing spaces "
            "(it is sent to Verloop as an HTTP header)"
        )
    return value


IdempotencyKey = Annotated[
    str,
    AfterValidator(_header_safe),
    Field(
        description="Makes re-sends of this job harmless; sent as the Idempotency-Key header",
        json_schema_extra={"pattern": _KEY_PATTERN, "minLength": 1, "maxLength": 200},
    ),
]
E164 = Annotated[
    str,
    AfterValidator(normalize_e164),
    Field(description="Recipient in E.164 form, e.g. +919876543210", examples=["+919876543210"]),
]


class _Strict(BaseModel):
    # Unknown fields are errors: a misspelt ``idempotncy_key`` must not be silently dropped.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


# --- message content, shaped like the WhatsApp Cloud API message object ----------------------
class Text(_Strict):
    body: str = Field(min_length=1, max_length=TEXT_MAX_CHARS)
    preview_url: bool = False


class Media(_Strict):
    link: HttpUrl
    caption: str | None = Field(default=None, max_length=CAPTION_MAX_CHARS)


class Document(Media):
    filename: str | None = Field(default=None, max_length=240)


class Audio(_Strict):
    link: HttpUrl


class TemplateLanguage(_Strict):
    code: str = Field(min_length=2, max_length=15, examples=["en", "en_US", "pt_BR"])
    policy: Literal["deterministic"] = "deterministic"


class TemplateParameter(BaseModel):
    """One parameter; its content key depends on ``type`` (``text``, ``currency``...)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: Literal[
        "text",
        "currency",
        "date_time",
        "image",
        "document",
        "video",
        "location",
        "payload",
        "coupon_code",
        "action",
    ]


class TemplateComponent(_Strict):
    type: Literal["header", "body", "footer", "button", "carousel"]
    sub_type: str | None = Field(default=None, max_length=32)
    index: int | str | None = None
    parameters: list[TemplateParameter] = Field(default_factory=list, max_length=100)


class Template(_Strict):
    name: str = Field(min_length=1, max_length=512, pattern=r"^[a-z0-9_]+$")
    language: TemplateLanguage
    components: list[TemplateComponent] = Field(default_factory=list, max_length=20)


class InteractiveBody(_Strict):
    text: str = Field(min_length=1, max_length=1024)


class InteractiveFooter(_Strict):
    text: str = Field(min_length=1, max_length=60)


class Interactive(_Strict):
    type: Literal[
        "button",
        "list",
        "cta_url",
        "flow",
        "product",
        "product_list",
        "location_request_message",
    ]
    header: dict[str, Any] | None = None
    body: InteractiveBody | None = None
    footer: InteractiveFooter | None = None
    action: dict[str, Any]


class TextMessage(_Strict):
    type: Literal["text"]
    text: Text


class ImageMessage(_Strict):
    type: Literal["image"]
    image: Media


class VideoMessage(_Strict):
    type: Literal["video"]
    video: Media


class DocumentMessage(_Strict):
    type: Literal["document"]
    document: Document


class AudioMessage(_Strict):
    type: Literal["audio"]
    audio: Audio


class TemplateMessage(_Strict):
    type: Literal["template"]
    template: Template


class InteractiveMessage(_Strict):
    type: Literal["interactive"]
    interactive: Interactive


Message = Annotated[
    TextMessage
    | ImageMessage
    | VideoMessage
    | DocumentMessage
    | AudioMessage
    | TemplateMessage
    | InteractiveMessage,
    Field(discriminator="type"),
]


def _small_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    # Measured with the encoder the log line and the event use (parse_job has made sure it can).
    if value is not None and len(orjson.dumps(value)) > MAX_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return value


Metadata = Annotated[
    dict[str, Any] | None,
    AfterValidator(_small_metadata),
    Field(description="Opaque to the worker; echoed in its log lines"),
]


# --- jobs ------------------------------------------------------------------------------------
class SendMessageJob(_Strict):
    """kwargs of ``send_message``: send one WhatsApp message from a Verloop phone number."""

    client_id: Identifier
    phone_id: Identifier
    to: E164
    message: Message
    idempotency_key: IdempotencyKey | None = None
    #: Set on campaign sends: the campaign's pause/cancel/window apply, its progress counts the
    #: job, and (without an idempotency_key) each recipient is messaged once per campaign.
    campaign_id: Identifier | None = None
    metadata: Metadata = None

    def ledger_key(self, message_id: str) -> LedgerKey:
        """The idempotency ledger entry of this job: the producer's key (per client), else one
        derived from the campaign and recipient (per client), else the dramatiq message id (a
        redelivery keeps it). Ids are length-prefixed (:mod:`worker.connections.redis_keys`); the
        colon-joined key of earlier versions is kept as the legacy key, honoured until its
        entries expire."""
        if self.idempotency_key is not None:
            return LedgerKey(
                "key:" + join_parts(self.client_id, self.idempotency_key),
                f"key:{self.client_id}:{self.idempotency_key}",
            )
        if self.campaign_id is not None:
            return LedgerKey(
                "campaign:" + join_parts(self.client_id, self.campaign_id, self.to),
                f"campaign:{self.campaign_id}:{self.to}",
            )
        return LedgerKey(f"message:{message_id}")

    def request_body(self) -> dict[str, Any]:
        """The body of the (modeled) send call: the Cloud API message object."""
        # What model_dump(mode="json", exclude_none=True) returns, without its Python wrapper.
        message = self.message
        content: dict[str, Any] = message.__pydantic_serializer__.to_python(
            message, mode="json", exclude_none=True
        )
        envelope = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": self.to}
        return envelope | content


class ListClientsJob(_Strict):
    """kwargs of ``list_clients``: list the partner's clients (logged; events come later)."""

    metadata: Metadata = None


class RefreshPhoneTokenJob(_Strict):
    """kwargs of ``refresh_phone_token``: forget a cached phone token and fetch it again."""

    client_id: Identifier
    phone_id: Identifier
    metadata: Metadata = None


class RefreshClientTokensJob(_Strict):
    """kwargs of ``refresh_client_tokens``: refresh the token of every number of one client
    (its numbers are found with ``list_clients``)."""

    client_id: Identifier
    metadata: Metadata = None


Job = SendMessageJob | ListClientsJob | RefreshPhoneTokenJob | RefreshClientTokensJob


def describe_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """``to: must be in E.164 form...; message.text.body: String should have at most...``.

    Input values are left out: they can be large, and the reason is stored with the job anyway.
    """
    parts = []
    for err in exc.errors(include_input=False)[:limit]:
        # A tagged union repeats the tag in the path (message.text.text.body): drop the echo.
        # Field names are the producer's (an unknown field is named): each is cut short.
        path = [str(p)[:60] for i, p in enumerate(err["loc"]) if i == 0 or p != err["loc"][i - 1]]
        where = ".".join(path) or "job"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling)"
        parts.append(f"{where}: {msg}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
