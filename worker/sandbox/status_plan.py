"""What the simulator reports about one accepted send, and the webhook bodies that carry it.

Pure Python and seeded (:class:`random.Random`), so a test replays the same statuses. The shapes
are Meta's Cloud API status webhook (docs/verloop-api.md says what is modeled): a status has
``id`` (the wamid the send returned), ``status``, ``timestamp`` (Unix seconds, a string),
``recipient_id`` (digits); ``sent`` and ``delivered`` carry ``conversation`` and ``pricing``, a
``failed`` one ``errors``.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Final

from worker.sandbox.statuses import PhoneNumber, StatusCallbacks

__all__ = ["ERRORS", "StatusPlan", "error_object", "plan_statuses", "sign", "webhook_body"]

_HREF: Final = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"
#: code -> (title, details) of the failures a status webhook reports, as Meta words them.
ERRORS: Final[Mapping[int, tuple[str, str]]] = {
    130429: ("Rate limit hit", "Cloud API message throughput has been reached."),
    130472: (
        "User's number is part of an experiment",
        "Failed to send message because this user's phone number is part of an experiment.",
    ),
    131000: ("Something went wrong", "Message failed to send because of an unknown error."),
    131026: (
        "Message undeliverable",
        "Unable to deliver message. Reasons can include: the recipient phone number is not a "
        "WhatsApp phone number; the recipient has not accepted the new Terms of Service.",
    ),
    131047: (
        "Re-engagement message",
        "Message failed to send because more than 24 hours have passed since the customer "
        "last replied to this number.",
    ),
    131048: (
        "Spam rate limit hit",
        "Message failed to send because there are restrictions on how many messages can be "
        "sent from this phone number.",
    ),
    131049: (
        "This message was not delivered to maintain healthy ecosystem engagement.",
        "In order to maintain a healthy ecosystem engagement, the message failed to be delivered.",
    ),
    131050: (
        "Unable to deliver the message. This recipient has chosen to stop receiving marketing "
        "messages on WhatsApp from your business.",
        "The recipient has stopped marketing messages from this business.",
    ),
    131056: (
        "(Business Account, Consumer Account) pair rate limit hit",
        "Too many messages sent from the sender phone number to the same recipient phone "
        "number in a short period of time.",
    ),
}


def error_object(code: int) -> dict[str, Any]:
    """One entry of a failed status's ``errors`` for ``code`` (a generic text if unknown)."""
    title, details = ERRORS.get(code, ("Message failed", f"Simulated failure {code}."))
    return {
        "code": code,
        "title": title,
        "message": title,
        "error_data": {"details": details},
        "href": _HREF,
    }


@dataclass(frozen=True, slots=True)
class StatusPlan:
    """The statuses of one send, in the order they will be posted.

    ``posts`` holds ``(delay_s, status)``: the delay after the previous post (the first: after
    the send). ``best`` is what the message came to: ``read``, ``delivered``, ``failed`` (never
    delivered) or ``sent``.
    """

    best: str
    posts: tuple[tuple[float, dict[str, Any]], ...]


def _outcome(config: StatusCallbacks, rng: random.Random) -> tuple[list[str], int | None]:
    """The statuses in the order they happen, and the failure code if one failed."""
    happened = ["sent"]
    code: int | None = None
    if rng.random() < config.failed:
        codes, weights = zip(*config.failure_codes.items(), strict=True)
        code = rng.choices(codes, weights)[0]
        happened.append("failed")
        delivered = rng.random() < config.multi_device
    else:
        delivered = rng.random() < config.delivered
    if delivered:
        happened.append("delivered")
        if rng.random() < config.read:
            happened.append("read")
    return happened, code


def _status(
    name: str,
    *,
    wamid: str,
    recipient_id: str,
    timestamp: int,
    category: str,
    conversation_id: str,
    code: int | None,
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "id": wamid,
        "status": name,
        "timestamp": str(timestamp),
        "recipient_id": recipient_id,
    }
    if name in ("sent", "delivered"):
        conversation: dict[str, Any] = {"id": conversation_id, "origin": {"type": category}}
        if name == "sent":
            conversation["expiration_timestamp"] = str(timestamp + 86_400)
        status["conversation"] = conversation
        status["pricing"] = {
            "billable": True,
            "pricing_model": "PMP",
            "type": "regular",
            "category": category,
        }
    elif name == "failed" and code is not None:
        status["errors"] = [error_object(code)]
    return status


def plan_statuses(
    config: StatusCallbacks,
    rng: random.Random,
    *,
    wamid: str,
    recipient_id: str,
    message_type: str,
    now: float,
) -> StatusPlan:
    """Draw what happens to one send accepted at ``now`` (Unix seconds).

    Timestamps follow what happened (sent <= failed/delivered <= read); with ``reorder`` the
    posting order differs from it (reversed if a shuffle happened to keep it), and a
    ``duplicate`` is posted once more right after its original.
    """
    happened, code = _outcome(config, rng)
    order = list(range(len(happened)))
    if len(order) > 1 and rng.random() < config.reorder:
        rng.shuffle(order)
        if order == sorted(order):
            order.reverse()
    posted: list[int] = []  # indices into what happened, in posting order
    for index in order:
        posted.append(index)
        if rng.random() < config.duplicate:
            posted.append(index)
    delays = [rng.uniform(config.delay_min_s, config.delay_max_s) for _ in posted]
    category = config.template_category if message_type == "template" else "service"
    conversation_id = f"{rng.getrandbits(128):032x}"
    # The k-th thing that happened is stamped with the k-th post's time.
    statuses = [
        _status(
            name,
            wamid=wamid,
            recipient_id=recipient_id,
            timestamp=int(now + offset),
            category=category,
            conversation_id=conversation_id,
            code=code,
        )
        for name, offset in zip(happened, accumulate(delays), strict=False)
    ]
    if "read" in happened:
        best = "read"
    elif "delivered" in happened:
        best = "delivered"
    else:
        best = happened[-1]
    return StatusPlan(best, tuple((d, statuses[i]) for d, i in zip(delays, posted, strict=True)))


def webhook_body(
    waba_id: str, batches: Iterable[tuple[PhoneNumber, Sequence[Mapping[str, Any]]]]
) -> dict[str, Any]:
    """A webhook body: one ``changes`` entry per sending number with its statuses."""
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": waba_id,
                "changes": [
                    {
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": number.display_phone_number,
                                "phone_number_id": number.phone_number_id,
                            },
                            "statuses": list(statuses),
                        },
                        "field": "messages",
                    }
                    for number, statuses in batches
                ],
            }
        ],
    }


def sign(app_secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
