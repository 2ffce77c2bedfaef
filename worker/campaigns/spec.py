"""What every row of a campaign shares (:class:`CampaignSpec`), checked once with the
worker's own job model, and the template message each row's parameters fill in."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from worker.campaigns.store import CampaignRef
from worker.errors import InvalidJob
from worker.jobs.registry import parse_job

__all__ = [
    "IDENTIFIER",
    "INVALID_PREFIX",
    "MAX_BODY_PARAMS",
    "CampaignInputError",
    "CampaignSpec",
    "template_message",
]

#: The job model allows at most 100 parameters per template component.
MAX_BODY_PARAMS: Final = 100
#: A Verloop identifier (client or phone id), as the job model accepts it.
IDENTIFIER: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
#: What the job model's reasons start with; a rejected row's reason goes without it.
INVALID_PREFIX: Final = "invalid send_message job: "


class CampaignInputError(ValueError):
    """The file or the options cannot make a campaign at all (a usage error, not a bad row)."""


@dataclass(frozen=True)
class CampaignSpec:
    """What every row of a campaign shares."""

    campaign_id: str
    client_id: str
    phone_ids: tuple[str, ...]
    template: str
    language: str = "en_US"
    #: Body parameters every row must have; None: as many as the CSV has ``body_*`` columns.
    body_params: int | None = None

    @property
    def ref(self) -> CampaignRef:
        """The campaign in the store: this client's campaign id."""
        return CampaignRef(self.client_id, self.campaign_id)

    def check(self) -> None:
        """Validate the shared parts once, with the worker's own model.

        Raises:
            CampaignInputError: naming what is wrong.
        """
        if self.body_params is not None and not 0 <= self.body_params <= MAX_BODY_PARAMS:
            raise CampaignInputError(f"--body-params must be between 0 and {MAX_BODY_PARAMS}")
        probe = {
            "client_id": self.client_id,
            "phone_id": self.phone_ids[0] if self.phone_ids else "probe",
            "to": "+14155550123",  # a valid number: only the shared fields are probed
            "campaign_id": self.campaign_id,
            "message": template_message(self.template, self.language, None, []),
        }
        for phone_id in self.phone_ids:
            if not IDENTIFIER.fullmatch(phone_id):
                raise CampaignInputError(f"--phone-id {phone_id!r} is not a Verloop identifier")
        try:
            parse_job("send_message", (), probe)
        except InvalidJob as exc:
            reason = str(exc).removeprefix(INVALID_PREFIX)
            reason = reason.replace("message.template.name", "--template").replace(
                "message.template.language.code", "--language"
            )
            raise CampaignInputError(reason) from None


def template_message(
    name: str, language: str, header: list[str] | None, body: list[str]
) -> dict[str, Any]:
    """A ``template`` message with text parameters (a header only when given)."""
    components: list[dict[str, Any]] = []
    if header:
        components.append(
            {"type": "header", "parameters": [{"type": "text", "text": t} for t in header]}
        )
    components.append({"type": "body", "parameters": [{"type": "text", "text": t} for t in body]})
    return {
        "type": "template",
        "template": {"name": name, "language": {"code": language}, "components": components},
    }
