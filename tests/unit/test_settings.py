"""Unit tests for worker.settings.Settings: defaults, sources, validation and secrecy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from worker.errors import ConfigurationError
from worker.settings import (
    DEFAULT_BASE_URL,
    MAX_RELAY_BLOCK_MS,
    MAX_SINGLE_DELAY_S,
    REDIS_TIMEOUT_S,
    EndpointOverride,
    Settings,
)

PASSWORD = "hunter2-secret"
SYSTEM_TOKEN = "sys-token-c0ffee-1234"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every setting from the environment, so only what a test sets is seen."""
    for name in [*Settings.model_fields, "verloop_worker_env_file"]:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)


def load_error(**env: str) -> str:
    """The ConfigurationError text that Settings.load raises with these environment values."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        with pytest.raises(ConfigurationError) as info:
            Settings.load()
    return str(info.value)


def test_defaults_are_used_when_nothing_is_set() -> None:
    """Without environment or file, the documented defaults apply."""
    settings = Settings.load()
    assert settings.amqp_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert settings.verloop_base_url == DEFAULT_BASE_URL == "https://partners.verloop.io"
    assert settings.verloop_api_prefix == "/api/v2/whatsapp"
    assert settings.verloop_phone_token_variant == "current"
    assert settings.verloop_endpoints == {}
    assert settings.retry_max_retries == 8
    assert settings.max_job_bytes == 256 * 1024
    assert settings.has_verloop_credentials is False


def test_environment_variables_override_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings are read from the environment when load() is called."""
    monkeypatch.setenv("AMQP_URL", "amqp://app:pw@rabbit:5672/prod")
    monkeypatch.setenv("VERLOOP_BASE_URL", "https://sandbox.example.test/")
    monkeypatch.setenv("RETRY_MAX_RETRIES", "3")
    monkeypatch.setenv("log_level", "DEBUG")
    settings = Settings.load()
    assert settings.amqp_url.get_secret_value() == "amqp://app:pw@rabbit:5672/prod"
    assert settings.verloop_base_url == "https://sandbox.example.test"
    assert settings.retry_max_retries == 3
    assert settings.log_level == "DEBUG"


def test_an_env_file_is_read(tmp_path: Path) -> None:
    """Values in the env file given to load() are used."""
    env_file = tmp_path / "worker.env"
    env_file.write_text(
        "# comment\nREDIS_URL=redis://cache:6379/2\nRETRY_MAX_BACKOFF_S=120\n", encoding="utf-8"
    )
    settings = Settings.load(env_file)
    assert settings.redis_url.get_secret_value() == "redis://cache:6379/2"
    assert settings.retry_max_backoff_s == 120.0


def test_the_environment_wins_over_the_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An environment variable overrides the same name in the env file."""
    env_file = tmp_path / "worker.env"
    env_file.write_text("RETRY_MAX_RETRIES=3\nMETRICS_PORT=9000\n", encoding="utf-8")
    monkeypatch.setenv("RETRY_MAX_RETRIES", "5")
    settings = Settings.load(env_file)
    assert settings.retry_max_retries == 5
    assert settings.metrics_port == 9000


def test_the_env_file_can_be_named_by_an_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VERLOOP_WORKER_ENV_FILE names the env file when load() is given none."""
    env_file = tmp_path / "worker.env"
    env_file.write_text("METRICS_PORT=9300\n", encoding="utf-8")
    monkeypatch.setenv("VERLOOP_WORKER_ENV_FILE", str(env_file))
    assert Settings.load().metrics_port == 9300


def test_a_missing_env_file_is_a_configuration_error(tmp_path: Path) -> None:
    """Naming an env file that does not exist stops the worker with a clear error."""
    missing = tmp_path / "nope.env"
    with pytest.raises(ConfigurationError, match="does not exist"):
        Settings.load(missing)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RETRY_MAX_BACKOFF_S": "99999"}, "RETRY_MAX_BACKOFF_S"),
        ({"VERLOOP_BASE_URL": "ftp://x"}, "VERLOOP_BASE_URL"),
        (
            {"RETRY_MIN_BACKOFF_S": "700", "RETRY_MAX_BACKOFF_S": "600"},
            "RETRY_MIN_BACKOFF_S must not exceed RETRY_MAX_BACKOFF_S",
        ),
        ({"RETRY_MAX_RETRIES": "lots"}, "RETRY_MAX_RETRIES"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"VERLOOP_PHONE_TOKEN_VARIANT": "v3"}, "VERLOOP_PHONE_TOKEN_VARIANT"),
        ({"METRICS_PORT": "70000"}, "METRICS_PORT"),
        ({"MAX_JOB_BYTES": "10"}, "MAX_JOB_BYTES"),
        ({"VERLOOP_ENDPOINTS": '{"send": {"paht": "/x"}}'}, "VERLOOP_ENDPOINTS"),
        ({"TOKEN_REFUSAL_TTL_S": "-1"}, "TOKEN_REFUSAL_TTL_S"),
        ({"SYSTEM_TOKEN_CHECK_INTERVAL_S": "0"}, "SYSTEM_TOKEN_CHECK_INTERVAL_S"),
        ({"TOKEN_LOCAL_MAX_ENTRIES": "0"}, "TOKEN_LOCAL_MAX_ENTRIES"),
        ({"METRICS_MAX_LABEL_VALUES": "0"}, "METRICS_MAX_LABEL_VALUES"),
        ({"METRICS_MAX_LABEL_VALUES": "many"}, "METRICS_MAX_LABEL_VALUES"),
    ],
)
def test_a_bad_value_is_a_configuration_error_naming_the_setting(
    env: dict[str, str], named: str
) -> None:
    """Each invalid value stops the worker with an error that names the setting."""
    text = load_error(**env)
    assert text.startswith("invalid settings:")
    assert named in text


def test_the_backoff_ceiling_stays_below_rabbitmqs_consumer_timeout() -> None:
    """RETRY_MAX_BACKOFF_S may not exceed 25 minutes."""
    assert MAX_SINGLE_DELAY_S == 25 * 60
    assert Settings.load(retry_max_backoff_s=MAX_SINGLE_DELAY_S).retry_max_backoff_s == 1500
    assert "RETRY_MAX_BACKOFF_S" in load_error(RETRY_MAX_BACKOFF_S=str(MAX_SINGLE_DELAY_S + 1))


def test_the_relay_block_stays_within_the_redis_timeout() -> None:
    """A blocking read of the events outbox longer than the Redis client's timeout would fail
    as a timeout every time the outbox is idle: EVENTS_RELAY_BLOCK_MS is refused above 1.5 s."""
    assert MAX_RELAY_BLOCK_MS == 1500
    assert MAX_RELAY_BLOCK_MS < REDIS_TIMEOUT_S * 1000
    assert Settings.load(events_relay_block_ms=1500).events_relay_block_ms == 1500
    assert "EVENTS_RELAY_BLOCK_MS" in load_error(EVENTS_RELAY_BLOCK_MS="3000")


def test_a_configuration_error_never_contains_a_secret_value() -> None:
    """With secrets set and another value wrong, the error text holds none of the secrets."""
    text = load_error(
        VERLOOP_PASSWORD=PASSWORD,
        VERLOOP_SYSTEM_TOKEN=SYSTEM_TOKEN,
        AMQP_URL="amqp://app:rabbit-pw-77@rabbit/",
        RETRY_MAX_BACKOFF_S="99999",
        VERLOOP_BASE_URL="ftp://x",
    )
    assert "RETRY_MAX_BACKOFF_S" in text
    for secret in (PASSWORD, SYSTEM_TOKEN, "rabbit-pw-77", "99999", "ftp://x"):
        assert secret not in text


def test_verloop_endpoints_that_are_not_json_are_a_configuration_error() -> None:
    """A malformed VERLOOP_ENDPOINTS stops the worker with a ConfigurationError naming it."""
    assert "VERLOOP_ENDPOINTS" in load_error(VERLOOP_ENDPOINTS="{send: /x}")


def test_secrets_are_not_shown_by_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    """Printing the settings shows neither the password, the token nor URL passwords."""
    monkeypatch.setenv("VERLOOP_USERNAME", "partner")
    monkeypatch.setenv("VERLOOP_PASSWORD", PASSWORD)
    monkeypatch.setenv("VERLOOP_SYSTEM_TOKEN", SYSTEM_TOKEN)
    monkeypatch.setenv("REDIS_URL", "redis://:redis-pw-99@cache:6379/0")
    settings = Settings.load()
    for text in (repr(settings), str(settings), repr(settings.model_dump())):
        assert PASSWORD not in text
        assert SYSTEM_TOKEN not in text
        assert "redis-pw-99" not in text
    assert settings.verloop_password is not None
    assert settings.verloop_password.get_secret_value() == PASSWORD


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"VERLOOP_SYSTEM_TOKEN": SYSTEM_TOKEN}, True),
        ({"VERLOOP_USERNAME": "partner", "VERLOOP_PASSWORD": PASSWORD}, True),
        ({"VERLOOP_USERNAME": "partner"}, False),
        ({"VERLOOP_PASSWORD": PASSWORD}, False),
    ],
)
def test_has_verloop_credentials_needs_a_token_or_a_username_and_password(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: bool
) -> None:
    """Credentials are a system token, or both a username and a password."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings.load().has_verloop_credentials is expected


def test_settings_are_frozen() -> None:
    """Assigning to a setting after load raises."""
    settings = Settings.load()
    with pytest.raises(ValidationError, match="frozen"):
        settings.retry_max_retries = 1  # type: ignore[misc]
    assert settings.retry_max_retries == 8


def test_verloop_endpoints_json_parses_into_endpoint_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """VERLOOP_ENDPOINTS is a JSON object of EndpointOverride entries."""
    monkeypatch.setenv(
        "VERLOOP_ENDPOINTS",
        json.dumps({"send": {"path": "/v3/send", "response_keys": ["data.id"]}, "auth": {}}),
    )
    endpoints = Settings.load().verloop_endpoints
    assert endpoints == {
        "send": EndpointOverride(path="/v3/send", response_keys=("data.id",)),
        "auth": EndpointOverride(),
    }


# --- phone tokens file -------------------------------------------------------------------------


def settings_with_tokens_file(path: Path) -> Settings:
    """Settings whose VERLOOP_PHONE_TOKENS_FILE is ``path``."""
    return Settings.load(verloop_phone_tokens_file=path)


def test_no_phone_tokens_file_means_no_configured_tokens() -> None:
    """Without VERLOOP_PHONE_TOKENS_FILE there are no hand-made tokens."""
    assert Settings.load().load_phone_tokens() == {}


def test_the_phone_tokens_file_is_read_into_pairs(tmp_path: Path) -> None:
    """The tokens file maps (client_id, phone_id) to a secret token."""
    path = tmp_path / "tokens.json"
    path.write_text(
        json.dumps({"acme": {"p1": "tok-acme-p1", "p2": "tok-acme-p2"}, "globex": {}}),
        encoding="utf-8",
    )
    tokens = settings_with_tokens_file(path).load_phone_tokens()
    assert set(tokens) == {("acme", "p1"), ("acme", "p2")}
    assert all(isinstance(token, SecretStr) for token in tokens.values())
    assert tokens[("acme", "p2")].get_secret_value() == "tok-acme-p2"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"acme": {"p1": "tok-acme-secret-1"', "cannot read JSON"),
        ('["tok-acme-secret-1"]', "expected a JSON object"),
        ('{"acme": "tok-acme-secret-1"}', "must map phone ids"),
        ('{"acme": {"p1": "tok-acme-secret-1", "p2": ""}}', "acme/p2"),
        ('{"acme": {"p1": "tok-acme-secret-1", "p2": 123456789}}', "must be a non-empty string"),
    ],
)
def test_a_malformed_phone_tokens_file_is_a_configuration_error_without_tokens(
    tmp_path: Path, content: str, says: str
) -> None:
    """A malformed tokens file stops the worker; the error names the file, not the tokens."""
    path = tmp_path / "tokens.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigurationError) as info:
        settings_with_tokens_file(path).load_phone_tokens()
    text = str(info.value)
    assert "VERLOOP_PHONE_TOKENS_FILE" in text
    assert says in text
    assert "tok-acme-secret-1" not in text
    assert "123456789" not in text


def test_a_missing_phone_tokens_file_is_a_configuration_error(tmp_path: Path) -> None:
    """A tokens file that does not exist is reported when the tokens are loaded."""
    settings = settings_with_tokens_file(tmp_path / "absent.json")
    with pytest.raises(ConfigurationError, match="cannot read JSON"):
        settings.load_phone_tokens()


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8765", "http://localhost:8765", "http://[::1]:8765", "https://verloop.test"],
)
def test_https_or_a_loopback_http_url_is_accepted(url: str) -> None:
    assert Settings(verloop_base_url=url).verloop_base_url == url


@pytest.mark.parametrize("url", ["http://partners.verloop.io", "http://10.0.0.5:8765"])
def test_plain_http_to_another_machine_is_refused_unless_allowed(url: str) -> None:
    """Tokens travel in the Authorization header: over plain http they would be in clear."""
    with pytest.raises(ConfigurationError, match="VERLOOP_ALLOW_PLAIN_HTTP"):
        Settings.load(verloop_base_url=url)
    allowed = Settings.load(verloop_base_url=url, verloop_allow_plain_http=True)
    assert allowed.verloop_base_url == url


def test_producers_use_the_default_exchange_unless_told_to_use_the_jobs_exchange() -> None:
    """Existing producers keep publishing to the default exchange; the switch names the jobs
    exchange, under whatever name JOBS_EXCHANGE gives it."""
    assert Settings().producer_exchange == ""
    assert Settings(publish_to_jobs_exchange=True).producer_exchange == "verloop.jobs"
    told = Settings(publish_to_jobs_exchange=True, jobs_exchange="verloop.jobs-eu")
    assert told.producer_exchange == "verloop.jobs-eu"


def test_a_jobs_exchange_named_like_rabbitmqs_own_is_refused() -> None:
    """RabbitMQ refuses to declare amq.* exchanges: say so at start, naming the setting."""
    assert "JOBS_EXCHANGE: Value error, names starting with amq." in load_error(
        JOBS_EXCHANGE="amq.direct"
    )


def test_config_example_env_documents_every_setting() -> None:
    """config/example.env is where operators look a setting up: each one is there (set, or
    commented out with its example value)."""
    text = (Path(__file__).parents[2] / "config" / "example.env").read_text(encoding="utf-8")
    missing = [
        name.upper()
        for name in Settings.model_fields
        if not re.search(rf"^#?\s*{name.upper()}=", text, re.MULTILINE)
    ]
    assert missing == []
