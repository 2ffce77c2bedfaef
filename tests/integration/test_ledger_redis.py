"""The ledger's claim script against a real Redis: every state a delivery can find."""

from __future__ import annotations

import time

from worker.ledger import Ledger

from .conftest import REDIS_URL, redis_client


def ledger(lease_s: float = 5.0) -> Ledger:
    return Ledger(redis_client(REDIS_URL), ttl_s=3600, lease_s=lease_s)


def test_a_fresh_key_is_claimed_and_a_second_delivery_finds_it_busy() -> None:
    first, second = ledger(), ledger()
    assert first.claim("k1", "thread-a", take_over_uncertain=False).state == "claimed"
    busy = second.claim("k1", "thread-b", take_over_uncertain=False)
    assert busy.state == "busy"
    assert 4.0 < busy.retry_in_s <= 5.0


def test_the_same_owner_renews_its_own_claim() -> None:
    book = ledger()
    book.claim("k2", "thread-a", take_over_uncertain=False)
    assert book.claim("k2", "thread-a", take_over_uncertain=False).state == "claimed"


def test_a_sent_entry_is_found_with_its_message_id_and_never_forgotten() -> None:
    book = ledger()
    book.claim("k3", "thread-a", take_over_uncertain=False)
    book.mark_sent("k3", "wamid.3")
    found = book.claim("k3", "thread-b", take_over_uncertain=True)
    assert (found.state, found.detail) == ("sent", "wamid.3")
    assert book.lookup("k3").state == "sent"
    assert book.forget_pending("k3") is False
    assert book.lookup("k3").message_id == "wamid.3"


def test_a_released_claim_lets_the_retry_send() -> None:
    book = ledger()
    book.claim("k4", "thread-a", take_over_uncertain=False)
    book.release("k4", "thread-b")  # not the owner: nothing happens
    assert book.lookup("k4").state == "pending"
    book.release("k4", "thread-a")
    assert book.lookup("k4").state == "absent"
    assert book.claim("k4", "thread-b", take_over_uncertain=False).state == "claimed"


def test_a_claim_whose_lease_ran_out_is_uncertain_until_an_owner_takes_it_over() -> None:
    book = ledger(lease_s=0.05)
    book.claim("k5", "thread-a", take_over_uncertain=False)
    time.sleep(0.1)
    assert book.claim("k5", "thread-b", take_over_uncertain=False).state == "uncertain"
    taken = book.claim("k5", "thread-b", take_over_uncertain=True)
    assert (taken.state, taken.after_uncertain) == ("claimed", True)


def test_an_operator_can_forget_an_uncertain_claim() -> None:
    book = ledger(lease_s=0.05)
    book.claim("k6", "thread-a", take_over_uncertain=False)
    time.sleep(0.1)
    assert book.forget_pending("k6") is True
    assert book.claim("k6", "thread-b", take_over_uncertain=False).state == "claimed"


def test_entries_expire_after_the_ledger_ttl() -> None:
    book = ledger()
    book.claim("k7", "thread-a", take_over_uncertain=False)
    book.mark_sent("k7", "wamid.7")
    ttl = redis_client(REDIS_URL).ttl("verloop:ledger:k7")
    assert 3500 < ttl <= 3600
