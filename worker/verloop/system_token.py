"""The system user token, which ``get_phone_token`` needs: configured, or obtained by logging in.

It is checked with ``list_clients`` after a refusal (at most once per interval per token), so
that a refusal of a client or number is not taken for a refusal of the token itself; the rule
is :mod:`worker.verloop.tokens`'s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog
from pydantic import SecretStr

from worker.errors import FailureDetails, PermanentFailure, TokenInvalid
from worker.observability.logging import register_secret
from worker.verloop.client import VerloopClient

__all__ = ["SystemToken"]

_log = structlog.get_logger()


class SystemToken:
    """The system user token: given in settings, or obtained from a username and password.

    When it is dropped (:meth:`is_refused`) is the rule of :mod:`worker.verloop.tokens`.
    """

    def __init__(
        self,
        client: VerloopClient,
        *,
        token: SecretStr | None,
        username: str | None,
        password: SecretStr | None,
        check_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._configured = token.get_secret_value() if token else None
        self._username = username
        self._password = password
        self._interval_s = check_interval_s
        self._clock = clock
        self._obtained: str | None = None
        #: A configured token Verloop refused, without credentials to log in: unused until then.
        self._configured_refused_until = float("-inf")
        #: A refused login: not tried again until then, with this reason.
        self._login_refused: tuple[FailureDetails, float] | None = None
        #: The last token Verloop accepted (or issued) and when; the last one it refused.
        self._accepted: tuple[str, float] | None = None
        self._refused: tuple[str, float] | None = None
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        register_secret(self._configured)
        register_secret(password.get_secret_value() if password else None)

    @property
    def can_renew(self) -> bool:
        """True when a rejected token can be replaced by logging in again."""
        return self._username is not None and self._password is not None

    def get(self) -> str:
        """The current system user token, logging in first if needed."""
        configured = self._configured
        if configured is not None and self._obtained is None:
            if self._clock() < self._configured_refused_until:
                raise PermanentFailure(
                    "Verloop refused VERLOOP_SYSTEM_TOKEN (list_clients refused it too); it is "
                    f"tried again {self._interval_s:g} s (SYSTEM_TOKEN_CHECK_INTERVAL_S) after "
                    "the refusal. Set a valid token, or VERLOOP_USERNAME and VERLOOP_PASSWORD"
                )
            return configured
        with self._lock:
            if self._obtained is None:
                self._obtained = self._log_in()
            return self._obtained

    def is_refused(self, token: str) -> bool:
        """Whether Verloop refuses ``token`` itself, after it refused a call made with it.

        Asks ``list_clients`` at most once per interval per token; a refused token is dropped,
        so the next :meth:`get` logs in again (or, without credentials, fails for a while).

        Raises:
            TransientFailure: ``list_clients`` could not be reached; nothing was decided.
        """
        with self._check_lock:
            now = self._clock()
            for known, refused in ((self._accepted, False), (self._refused, True)):
                if known is not None and known[0] == token and now - known[1] < self._interval_s:
                    return refused
            try:
                self._client.list_clients(token)
            except TokenInvalid as exc:
                self._refused = (token, now)
                self._drop(token, now)
                _log.warning(
                    "Verloop refused the system user token (get_phone_token and list_clients)",
                    http_status=exc.details.http_status,
                    code=exc.details.code,
                    renew="log in again" if self.can_renew else "none: no username/password",
                )
                return True
            except PermanentFailure as exc:
                # Not a refusal of the token (a path or shape problem): the token stays.
                _log.warning("system user token check inconclusive", reason=exc.details.reason)
            self._accepted = (token, now)
            return False

    def _drop(self, token: str, now: float) -> None:
        with self._lock:
            if self._obtained == token:
                self._obtained = None
            if self._configured == token:
                if self.can_renew:
                    self._configured = None  # logging in replaces it from now on
                else:
                    self._configured_refused_until = now + self._interval_s

    def _log_in(self) -> str:
        if not self.can_renew:
            raise PermanentFailure(
                "no Verloop system user token: set VERLOOP_SYSTEM_TOKEN, or "
                "VERLOOP_USERNAME and VERLOOP_PASSWORD"
            )
        now = self._clock()
        if self._login_refused is not None and now < self._login_refused[1]:
            details = self._login_refused[0]
            raise PermanentFailure(
                details.reason, http_status=details.http_status, code=details.code
            )
        try:
            token = self._client.authenticate(str(self._username), _reveal(self._password))
        except TokenInvalid as exc:
            failure = PermanentFailure(
                "Verloop refused VERLOOP_USERNAME/VERLOOP_PASSWORD; the login is tried again "
                f"{self._interval_s:g} s (SYSTEM_TOKEN_CHECK_INTERVAL_S) after the refusal",
                http_status=exc.details.http_status,
                code=exc.details.code,
            )
            self._login_refused = (failure.details, now + self._interval_s)
            raise failure from None
        register_secret(token)
        self._login_refused = None
        return token


def _reveal(secret: SecretStr | None) -> str:
    return secret.get_secret_value() if secret is not None else ""
