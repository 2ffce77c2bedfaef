"""The webhook signature (X-Hub-Signature-256) and the verification token."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from worker.webhooks.signature import sign, signature_ok, token_ok

SECRET = b"app-secret-1234"
BODY = b'{"object":"whatsapp_business_account","entry":[]}'


def test_sign_is_metas_header_value() -> None:
    digest = hmac.new(SECRET, BODY, hashlib.sha256).hexdigest()
    assert sign(BODY, SECRET) == "sha256=" + digest


def test_the_right_signature_is_accepted_in_either_case() -> None:
    good = sign(BODY, SECRET)
    assert signature_ok(good, BODY, SECRET)
    assert signature_ok(good.upper().replace("SHA256=", "sha256="), BODY, SECRET)
    assert signature_ok("SHA256=" + good.removeprefix("sha256="), BODY, SECRET)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "sha256=",
        "sha256=" + "0" * 64,
        "sha1=" + hmac.new(SECRET, BODY, hashlib.sha1).hexdigest(),
        hmac.new(SECRET, BODY, hashlib.sha256).hexdigest(),  # no prefix
        sign(BODY, SECRET)[:-1],  # one digit short
        sign(BODY, SECRET) + "0",
        sign(BODY, b"another-secret"),
        sign(BODY + b" ", SECRET),  # the body changed
        "sha256=" + "é" * 64,  # not ASCII
    ],
)
def test_a_wrong_missing_or_malformed_signature_is_refused(header: str | None) -> None:
    assert not signature_ok(header, BODY, SECRET)


def test_the_verify_token_must_match_exactly() -> None:
    assert token_ok("verify-me", b"verify-me")
    for given in ("verify-m", "verify-me ", "VERIFY-ME", "", None, "\udcff"):
        assert not token_ok(given, b"verify-me")


def test_no_configured_token_refuses_every_token() -> None:
    assert not token_ok("anything", None)
    assert not token_ok("", b"")
