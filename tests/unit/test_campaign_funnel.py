"""A campaign's delivery funnel: counts, failure codes and rates read from its hash's fields."""

from __future__ import annotations

import json

import pytest

from worker.campaigns.funnel import OTHER_CODE, FailureCode, Funnel
from worker.campaigns.store import CampaignRef, CampaignStatus
from worker.commands.campaign_support import describe, funnel_lines
from worker.verloop.classify import error_name


def status(**fields: str | int) -> CampaignStatus:
    return CampaignStatus(
        CampaignRef("acme", "spring"), "running", {k: str(v) for k, v in fields.items()}, 0.0
    )


#: A campaign 1,000 enqueued, 980 sent, with statuses for most of them.
SPRING = {
    "enqueued": 1000,
    "sent": 980,
    "status:delivered": 950,
    "status:read": 500,
    "status:failed": 20,
    "status:failed:131026": 12,
    "status:failed:131049": 5,
    "status:failed:131048": 2,
    "status:failed:131000": 1,
}


def test_the_funnel_counts_and_rates_of_a_campaign() -> None:
    funnel = status(**SPRING).funnel
    assert (funnel.enqueued, funnel.sent, funnel.delivered, funnel.read, funnel.failed) == (
        1000,
        980,
        950,
        500,
        20,
    )
    assert funnel.awaiting_status == 10
    assert funnel.delivered_of_sent == pytest.approx(950 / 980)
    assert funnel.read_of_sent == pytest.approx(500 / 980)
    assert funnel.read_of_delivered == pytest.approx(500 / 950)
    assert funnel.failed_of_sent == pytest.approx(20 / 980)
    assert funnel.by_code == (
        FailureCode("131026", 12),
        FailureCode("131049", 5),
        FailureCode("131048", 2),
        FailureCode("131000", 1),
    )
    assert [failure.name for failure in funnel.by_code] == [
        "undeliverable",
        "marketing cap",
        "spam rate limit",
        None,
    ]


def test_nothing_sent_has_no_rates_and_nothing_awaits() -> None:
    """Rates over 0 are None (shown as "-"), never a division error or a made-up 0 %."""
    funnel = status(enqueued=5).funnel
    assert (funnel.sent, funnel.delivered, funnel.awaiting_status) == (0, 0, 0)
    rates = [
        funnel.delivered_of_sent,
        funnel.read_of_sent,
        funnel.read_of_delivered,
        funnel.failed_of_sent,
    ]
    assert rates == [None, None, None, None]
    assert funnel.as_dict()["rates"] == dict.fromkeys(
        ("delivered_of_sent", "read_of_sent", "read_of_delivered", "failed_of_sent")
    )
    sent_none_delivered = status(sent=4, **{"status:failed": 1}).funnel
    assert sent_none_delivered.read_of_delivered is None
    assert sent_none_delivered.failed_of_sent == 0.25
    assert sent_none_delivered.awaiting_status == 3


def test_awaiting_never_goes_below_zero() -> None:
    """Statuses can outrun the sent counter (a status recorded before the send's count)."""
    funnel = status(sent=3, **{"status:delivered": 3, "status:failed": 2}).funnel
    assert funnel.awaiting_status == 0


def test_counters_that_are_not_numbers_count_zero_and_odd_codes_count_as_other() -> None:
    """A hash edited by hand or an unexpected code never breaks the report, nor prints the
    field name as it is (a code is shown only when it is a plain number)."""
    funnel = status(
        sent="ten",
        **{
            "status:delivered": "-4",
            "status:failed": 6,
            "status:failed:131026": 2,
            "status:failed:\x1b[2Jboom": 3,
            "status:failed:": 1,
            "status:failed:12345678901234": "x",
            "status:failed:131049": 0,
        },
    ).funnel
    assert (funnel.sent, funnel.delivered, funnel.failed) == (0, 0, 6)
    assert funnel.by_code == (FailureCode(OTHER_CODE, 4), FailureCode("131026", 2))


def test_failure_codes_rank_by_count_then_code_and_the_rest_are_summed() -> None:
    fields = {f"status:failed:{code}": count for code, count in ((1, 3), (3, 3), (2, 5), (4, 1))}
    funnel = status(sent=20, **fields).funnel
    assert [failure.code for failure in funnel.by_code] == ["2", "1", "3", "4"]
    top, rest = funnel.top_codes(2)
    assert [failure.code for failure in top] == ["2", "1"]
    assert rest == 4


def test_the_json_report_carries_the_funnel() -> None:
    info = json.loads(json.dumps(describe(status(**SPRING))))
    funnel = info["funnel"]
    assert {k: funnel[k] for k in ("enqueued", "sent", "delivered", "read", "failed")} == {
        "enqueued": 1000,
        "sent": 980,
        "delivered": 950,
        "read": 500,
        "failed": 20,
    }
    assert funnel["awaiting_status"] == 10
    assert funnel["failed_by_code"][0] == {"code": "131026", "name": "undeliverable", "count": 12}
    assert funnel["failed_by_code"][-1] == {"code": "131000", "name": None, "count": 1}
    assert funnel["rates"] == {
        "delivered_of_sent": 0.9694,
        "read_of_sent": 0.5102,
        "read_of_delivered": 0.5263,
        "failed_of_sent": 0.0204,
    }


def test_the_status_lines_show_rates_and_the_top_codes_by_name() -> None:
    lines = funnel_lines(status(**SPRING).funnel)
    assert lines == [
        "delivered  950 (96.9% of sent)",
        "read       500 (51.0% of sent, 52.6% of delivered)",
        "failed     20 (2.0% of sent) after sending",
        "           131026 undeliverable: 12, 131049 marketing cap: 5, 131048 spam rate limit: 2,"
        " 1 more under 1 other code",
        "awaiting   10 sent, no delivered or failed status yet",
    ]
    empty = funnel_lines(Funnel(enqueued=3, sent=0, delivered=0, read=0, failed=0))
    assert empty == [
        "delivered  0 (- of sent)",
        "read       0 (- of sent, - of delivered)",
        "failed     0 (- of sent) after sending",
        "awaiting   0 sent, no delivered or failed status yet",
    ]


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (131026, "undeliverable"),
        ("131049", "marketing cap"),
        (131048, "spam rate limit"),
        (131047, "re-engagement window"),
        (131056, "pair rate limit"),
        ("130429", "rate limit"),
        (131000, None),
        ("\uff11\uff13\uff11\uff10\uff12\uff16", None),  # full-width digits: not a code
        ("unavailable", None),
    ],
)
def test_well_known_codes_have_short_names(code: int | str, name: str | None) -> None:
    assert error_name(code) == name
