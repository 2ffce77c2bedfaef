"""The ledger's claim script against a real Redis: every state a delivery can find."""

from __future__ import annotations

import time

import pytest

from tests.integration.conftest import REDIS_URL, OwnRedis, redis_client
from worker.errors import RedisUnavailable
from worker.jobs.models import SendMessageJob
from worker.jobs.registry import parse_job
from worker.runtime.services import open_redis
from worker.send.ledger import Ledger, LedgerKey
from worker.settings import Settings


def ledger(lease_s: float = 5.0) -> Ledger:
    return Ledger(redis_client(REDIS_URL), ttl_s=3600, lease_s=lease_s)


def test_a_fresh_key_is_claimed_and_a_second_delivery_finds_it_busy() -> None:
    first, second = ledger(), ledger()
    assert first.claim(LedgerKey("k1"), "thread-a", take_over_uncertain=False).state == "claimed"
    busy = second.claim(LedgerKey("k1"), "thread-b", take_over_uncertain=False)
    assert busy.state == "busy"
    assert 4.0 < busy.retry_in_s <= 5.0


def test_the_same_owner_renews_its_own_claim() -> None:
    book = ledger()
    book.claim(LedgerKey("k2"), "thread-a", take_over_uncertain=False)
    assert book.claim(LedgerKey("k2"), "thread-a", take_over_uncertain=False).state == "claimed"


def test_a_sent_entry_is_found_with_its_message_id_and_never_forgotten() -> None:
    book = ledger()
    book.claim(LedgerKey("k3"), "thread-a", take_over_uncertain=False)
    book.mark_sent(LedgerKey("k3"), "wamid.3")
    found = book.claim(LedgerKey("k3"), "thread-b", take_over_uncertain=True)
    assert (found.state, found.detail) == ("sent", "wamid.3")
    assert book.lookup(LedgerKey("k3")).state == "sent"
    assert book.forget_pending(LedgerKey("k3")) is False
    assert book.lookup(LedgerKey("k3")).message_id == "wamid.3"


def test_a_released_claim_lets_the_retry_send() -> None:
    book = ledger()
    book.claim(LedgerKey("k4"), "thread-a", take_over_uncertain=False)
    book.release(LedgerKey("k4"), "thread-b")  # not the owner: nothing happens
    assert book.lookup(LedgerKey("k4")).state == "pending"
    book.release(LedgerKey("k4"), "thread-a")
    assert book.lookup(LedgerKey("k4")).state == "absent"
    assert book.claim(LedgerKey("k4"), "thread-b", take_over_uncertain=False).state == "claimed"


def test_a_claim_whose_lease_ran_out_is_uncertain_until_an_owner_takes_it_over() -> None:
    book = ledger(lease_s=0.05)
    book.claim(LedgerKey("k5"), "thread-a", take_over_uncertain=False)
    time.sleep(0.1)
    assert book.claim(LedgerKey("k5"), "thread-b", take_over_uncertain=False).state == "uncertain"
    taken = book.claim(LedgerKey("k5"), "thread-b", take_over_uncertain=True)
    assert (taken.state, taken.after_uncertain) == ("claimed", True)


def test_an_operator_can_forget_an_uncertain_claim() -> None:
    book = ledger(lease_s=0.05)
    book.claim(LedgerKey("k6"), "thread-a", take_over_uncertain=False)
    time.sleep(0.1)
    assert book.forget_pending(LedgerKey("k6")) is True
    assert book.claim(LedgerKey("k6"), "thread-b", take_over_uncertain=False).state == "claimed"


def test_entries_expire_after_the_ledger_ttl() -> None:
    book = ledger()
    book.claim(LedgerKey("k7"), "thread-a", take_over_uncertain=False)
    book.mark_sent(LedgerKey("k7"), "wamid.7")
    ttl = redis_client(REDIS_URL).ttl("verloop:ledger:k7")
    assert 3500 < ttl <= 3600


def _job(**kwargs: str) -> SendMessageJob:
    job = parse_job(
        "send_message",
        [],
        {
            "client_id": "acme",
            "phone_id": "phone-1",
            "to": "+919876543210",
            "message": {"type": "text", "text": {"body": "hi"}},
            **kwargs,
        },
    )
    assert isinstance(job, SendMessageJob)
    return job


def test_ids_with_colons_never_share_a_ledger_entry() -> None:
    """Client a:b with key c and client a with key b:c were one entry (a:b:c): the second
    job was suppressed as a duplicate of the first. The same for campaigns."""
    book = ledger()
    first = _job(client_id="a:b", idempotency_key="c").ledger_key("m1")
    second = _job(client_id="a", idempotency_key="b:c").ledger_key("m2")
    assert first.name != second.name
    assert book.claim(first, "t1", take_over_uncertain=False).state == "claimed"
    book.mark_sent(first, "wamid.1")
    assert book.claim(second, "t2", take_over_uncertain=False).state == "claimed"
    spring = _job(client_id="a:b", campaign_id="c").ledger_key("m3")
    other = _job(client_id="a", campaign_id="b:c").ledger_key("m4")
    assert spring.name != other.name


def test_campaign_recipients_are_kept_apart_per_client() -> None:
    """Two clients that pick the same campaign id no longer suppress each other's recipients."""
    book = ledger()
    acme = _job(client_id="acme", campaign_id="spring").ledger_key("m1")
    globex = _job(client_id="globex", campaign_id="spring").ledger_key("m2")
    book.claim(acme, "t1", take_over_uncertain=False)
    book.mark_sent(acme, "wamid.acme")
    assert book.claim(globex, "t2", take_over_uncertain=False).state == "claimed"


def test_entries_written_under_the_earlier_key_form_are_still_honoured() -> None:
    """Entries live 30 days: a send recorded before the key format changed is still found
    (suppressed, not sent again), and an earlier worker's claim still makes a delivery wait."""
    cache = redis_client(REDIS_URL)
    cache.set("verloop:ledger:key:acme:otp-old", "s:wamid.before-upgrade")
    book = ledger()
    sent = _job(idempotency_key="otp-old").ledger_key("m1")
    assert sent.legacy == "key:acme:otp-old"
    found = book.claim(sent, "t1", take_over_uncertain=True)
    assert (found.state, found.detail) == ("sent", "wamid.before-upgrade")
    assert book.lookup(sent).message_id == "wamid.before-upgrade"
    live_ms = int((time.time() + 5) * 1000)
    cache.set("verloop:ledger:campaign:spring:+919876543210", f"p:{live_ms}:old-host:1:2:m")
    claimed = _job(campaign_id="spring").ledger_key("m2")
    assert book.claim(claimed, "t2", take_over_uncertain=True).state == "busy"


def test_forgetting_a_claim_never_drops_a_live_claim_or_a_sent_record() -> None:
    """forget_pending used to read, then delete: it could delete a live claim, or a record
    written in between. It drops only a claim whose lease has ended, atomically."""
    book = ledger(lease_s=5.0)
    live = LedgerKey("k8")
    book.claim(live, "thread-a", take_over_uncertain=False)
    assert book.forget_pending(live) is False
    assert book.lookup(live).state == "pending"
    book.mark_sent(live, "wamid.8")
    assert book.forget_pending(live) is False
    assert book.lookup(live).state == "sent"
    gone = LedgerKey("k9", legacy="k9-old")
    redis_client(REDIS_URL).set("verloop:ledger:k9-old", "p:1000:old-host:1:2:m")
    assert book.forget_pending(gone) is True
    assert book.lookup(gone).state == "absent"


def test_a_send_redis_did_not_record_is_recorded_once_it_answers_again(own_redis: OwnRedis) -> None:
    """Verloop accepted a message while Redis was down: the record is kept in the process and
    written with the next claim that reaches Redis, instead of the job looking uncertain (its
    claim's lease run out) for 30 days. Found by the soak benchmark's Redis restart."""
    cache = open_redis(Settings(redis_url=own_redis.url))
    book = Ledger(cache, ttl_s=3600, lease_s=10)
    try:
        sent = LedgerKey("key:4:acme:5:otp-1")
        assert book.claim(sent, "t1", take_over_uncertain=False).state == "claimed"
        own_redis.kill()
        with pytest.raises(RedisUnavailable):
            book.mark_sent(sent, "wamid.late")
        assert book.unrecorded == 1
        own_redis.start()
        next_job = LedgerKey("key:4:acme:5:otp-2")
        assert book.claim(next_job, "t1", take_over_uncertain=False).state == "claimed"
        assert book.unrecorded == 0
        assert book.lookup(sent).message_id == "wamid.late"
        assert book.claim(sent, "t2", take_over_uncertain=True).state == "sent"
    finally:
        book.close()
        cache.close()
