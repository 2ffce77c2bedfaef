"""Status webhooks of the simulator: where they go, how they are signed, and what they report.

After each accepted send the simulator posts WhatsApp statuses (``sent``, then ``delivered``,
``read`` or ``failed``) in Meta's Cloud API webhook shape to ``url``, signed with the app secret
as Meta signs them, so ``make run`` closes the loop and tests rehearse it. Validated on
construction like :class:`~worker.sandbox.faults.Faults`; the app secret is never in ``repr``,
``to_json`` or an error message.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final
from urllib.parse import urlsplit

from worker.sandbox.validation import (
    FaultConfigError,
    integer,
    json_object,
    number,
    probability,
    reject_unknown,
)

__all__ = ["PhoneNumber", "StatusCallbacks"]

#: JSON keys of :meth:`StatusCallbacks.to_json` that are reports, not settings.
_REPORT_KEYS: Final = frozenset({"app_secret_set"})
_MAX_FAILURE_CODE: Final = 10**9


@dataclass(frozen=True, slots=True)
class PhoneNumber:
    """How Meta names one sending number in a webhook's ``metadata``."""

    phone_number_id: str
    display_phone_number: str


def _text(name: str, value: object, *, limit: int = 256) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise FaultConfigError(f"{name} must be a non-empty string of at most {limit} characters")
    return value


def _url(value: object) -> str | None:
    if value is None:
        return None
    url = _text("url", value, limit=2048)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FaultConfigError(f"url must be an http(s) URL with a host, got {url!r}")
    if parts.username is not None or parts.password is not None:
        # Credentials in the URL would be shown by GET /admin/statuses.
        raise FaultConfigError("url must not carry credentials (user:password@)")
    return url


def _failure_codes(value: object) -> dict[int, float]:
    codes: dict[int, float] = {}
    for key, share in json_object("failure_codes", value).items():
        code = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(code, bool) or not isinstance(code, int) or code > _MAX_FAILURE_CODE:
            raise FaultConfigError(f"failure_codes keys must be error codes, got {key!r}")
        codes[integer("failure_codes key", code, minimum=0)] = number(
            f"failure_codes[{code}]", share
        )
    if not codes or not any(codes.values()):
        raise FaultConfigError("failure_codes needs at least one code with a share above 0")
    return codes


def _numbers(value: object) -> dict[str, PhoneNumber]:
    numbers: dict[str, PhoneNumber] = {}
    for phone_id, entry in json_object("numbers", value).items():
        name = f"numbers[{phone_id}]"
        if isinstance(entry, PhoneNumber):
            entry = {
                "phone_number_id": entry.phone_number_id,
                "display_phone_number": entry.display_phone_number,
            }
        data = json_object(name, entry)
        reject_unknown(name, data, ("phone_number_id", "display_phone_number"))
        numbers[_text("numbers key", phone_id)] = PhoneNumber(
            _text(f"{name}.phone_number_id", data.get("phone_number_id"), limit=64),
            _text(f"{name}.display_phone_number", data.get("display_phone_number"), limit=32),
        )
    return numbers


@dataclass(frozen=True, slots=True)
class StatusCallbacks:
    """Where status webhooks go and what they report; the default instance sends none.

    Per accepted send: ``sent``; then ``failed`` (share ``failed``, a code drawn by
    ``failure_codes`` weights) or else ``delivered`` (share ``delivered``) or nothing more; a
    delivered message is ``read`` with share ``read``. Each post follows the previous one (the
    first, the send) after a delay drawn from ``[delay_min_s, delay_max_s]``.
    """

    url: str | None = None
    """Where to POST the webhooks; None = off."""
    app_secret: str = field(default="", repr=False)
    """Signs each body (``X-Hub-Signature-256: sha256=<hex HMAC-SHA256>``); required with url."""
    delay_min_s: float = 0.05
    delay_max_s: float = 0.5
    delivered: float = 0.9
    """Share of the sends that did not fail that are delivered (the rest stay ``sent``)."""
    read: float = 0.5
    """Share of delivered messages that are also read."""
    failed: float = 0.05
    """Share of accepted sends that fail (a failed status with one error)."""
    failure_codes: Mapping[int, float] = field(default_factory=lambda: {131026: 1.0})
    """Error code -> weight among failures (weights need not sum to 1)."""
    multi_device: float = 0.0
    """Share of failed messages delivered (and maybe read) afterwards, as on multi-device."""
    duplicate: float = 0.0
    """Share of statuses posted twice (Meta delivers at least once)."""
    reorder: float = 0.0
    """Share of messages whose statuses are posted out of order (timestamps keep the truth)."""
    waba_id: str = "100000000000001"
    """``entry[].id``: the WhatsApp Business Account."""
    numbers: Mapping[str, PhoneNumber] = field(default_factory=dict)
    """Verloop phone_id -> Meta's metadata; others: phone_number_id = the phone_id and a
    made-up display number."""
    template_category: str = "marketing"
    """``pricing.category`` of template sends (other types are ``service``)."""
    seed: int | None = None
    """Seed for every draw; None = nondeterministic."""
    batch: int = 1
    """Most statuses per POST (Meta usually sends one); due ones are gathered, never waited for."""
    max_attempts: int = 5
    """POSTs per status before it is dropped (non-2xx, refused connection or timeout)."""
    retry_backoff_s: float = 0.5
    """Wait before the second attempt; doubled for each further one (capped at 60 s)."""
    timeout_s: float = 5.0
    """Per POST: a slower answer counts as a failure, as Meta treats it."""
    queue_limit: int = 100_000
    """Most statuses waiting; beyond it a send's statuses are dropped and counted."""
    concurrency: int = 8
    """POSTs in flight at once (read when the server starts)."""
    signature_header: str = "X-Hub-Signature-256"

    def __post_init__(self) -> None:
        """Validate every field and take private copies of the mappings."""
        url = _url(self.url)
        if not isinstance(self.app_secret, str):
            raise FaultConfigError("app_secret must be a string")  # the value is never echoed
        if url is not None and not self.app_secret:
            raise FaultConfigError("app_secret is required when url is set")
        floats = {
            "delay_min_s": number("delay_min_s", self.delay_min_s),
            "delay_max_s": number("delay_max_s", self.delay_max_s),
            "retry_backoff_s": number("retry_backoff_s", self.retry_backoff_s),
            "timeout_s": number("timeout_s", self.timeout_s, strict=True),
        }
        if floats["delay_max_s"] < floats["delay_min_s"]:
            raise FaultConfigError("delay_max_s must be >= delay_min_s")
        for name in ("delivered", "read", "failed", "multi_device", "duplicate", "reorder"):
            floats[name] = probability(name, getattr(self, name))
        _text("waba_id", self.waba_id, limit=64)
        _text("template_category", self.template_category, limit=64)
        _text("signature_header", self.signature_header, limit=64)
        if self.seed is not None:
            integer("seed", self.seed, minimum=-(2**63))
        integer("batch", self.batch, minimum=1)
        integer("max_attempts", self.max_attempts, minimum=1)
        integer("queue_limit", self.queue_limit, minimum=1)
        integer("concurrency", self.concurrency, minimum=1)
        codes = _failure_codes(self.failure_codes)
        numbers = _numbers(self.numbers)
        for name, value in floats.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "url", url)
        # Private copies: a frozen config must not change when the caller's dict does.
        object.__setattr__(self, "failure_codes", codes)
        object.__setattr__(self, "numbers", numbers)

    @classmethod
    def from_json(cls, data: object, *, base: StatusCallbacks | None = None) -> StatusCallbacks:
        """Build from a JSON object (``PUT``/``PATCH /admin/statuses``): keys missing take
        ``base``'s values (the class defaults without one); ``app_secret_set`` is ignored."""
        obj = dict(json_object("statuses", data))
        for key in _REPORT_KEYS:
            obj.pop(key, None)
        reject_unknown("statuses", obj, cls.__dataclass_fields__)
        if base is not None:
            obj = {f.name: getattr(base, f.name) for f in fields(cls)} | obj
        try:
            return cls(**obj)  # type: ignore[arg-type]  # values are validated in __post_init__
        except TypeError as exc:  # a wrong type where a comparison or call needed another
            raise FaultConfigError(f"statuses: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        """The JSON form (``GET /admin/statuses``): every setting but the app secret, which is
        only said to be set or not."""
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "app_secret":
                data["app_secret_set"] = bool(value)
            elif f.name == "failure_codes":
                data[f.name] = {str(code): share for code, share in value.items()}
            elif f.name == "numbers":
                data[f.name] = {
                    phone: {
                        "phone_number_id": n.phone_number_id,
                        "display_phone_number": n.display_phone_number,
                    }
                    for phone, n in value.items()
                }
            else:
                data[f.name] = value
        return data

    def number_for(self, phone_id: str) -> PhoneNumber:
        """The metadata of ``phone_id``'s webhooks (configured, or made up from its name)."""
        number = self.numbers.get(phone_id)
        if number is not None:
            return number
        # A stable fake display number (555: fictional), so a demo's numbers look real.
        return PhoneNumber(phone_id, f"1555{zlib.crc32(phone_id.encode()) % 10**7:07d}")
