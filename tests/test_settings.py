"""Settings come from ``POSTROOM_*`` variables only, and fail early with clear messages."""

from __future__ import annotations

import io
import json
import logging

import pytest

from postroom.shared.crypto import generate_key
from postroom.shared.errors import ConfigError
from postroom.shared.logs import JsonFormatter
from postroom.shared.settings import Settings


def test_defaults_follow_the_redis_url() -> None:
    """Broker and result backend default to the Redis URL."""
    s = Settings.from_env({"POSTROOM_REDIS_URL": "redis://h:1/2"}, require_secrets=False)
    assert (s.broker_url, s.result_backend) == ("redis://h:1/2", "redis://h:1/2")


def test_values_are_typed() -> None:
    """Integers, floats, lists and ports are parsed from their text."""
    s = Settings.from_env(
        {
            "POSTROOM_HLIMIT_PERIOD_S": "60",
            "POSTROOM_SMTP_TIMEOUT_S": "2.5",
            "POSTROOM_SMTP_ALLOW_HOSTS": "127.0.0.1, relay.internal ,10.0.0.0/8",
            "POSTROOM_SMTP_ALLOW_PORTS": "25,2525",
            "POSTROOM_CHECK_DNS": "true",
        },
        require_secrets=False,
    )
    assert s.hlimit_period_s == 60
    assert s.smtp_timeout_s == 2.5
    assert s.smtp_allow_hosts == ("127.0.0.1", "relay.internal", "10.0.0.0/8")
    assert s.smtp_allow_ports == (25, 2525)
    assert s.check_dns is True


def test_missing_secrets_name_the_variables() -> None:
    """Production processes refuse to start without the admin token and the secret key."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({})
    assert "POSTROOM_ADMIN_TOKEN and POSTROOM_SECRET_KEY must be set" in str(info.value)


def test_a_bad_secret_key_is_refused() -> None:
    """The secret key must be a Fernet key; the message says how to make one."""
    with pytest.raises(ConfigError, match="postroom keygen"):
        Settings.from_env({"POSTROOM_ADMIN_TOKEN": "a", "POSTROOM_SECRET_KEY": "short"})


def test_valid_secrets_pass() -> None:
    """With both secrets set, the settings load."""
    s = Settings.from_env({"POSTROOM_ADMIN_TOKEN": "a", "POSTROOM_SECRET_KEY": generate_key()})
    assert s.admin_token == "a"


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("POSTROOM_HLIMIT_PERIOD_S", "an hour", "must be an integer"),
        ("POSTROOM_RESULT_TTL", "-1", "must be >= 0"),
        ("POSTROOM_SMTP_TIMEOUT_S", "soon", "must be a number"),
        ("POSTROOM_CHECK_DNS", "maybe", "must be true or false"),
        ("POSTROOM_LOG_FORMAT", "xml", "must be json or text"),
        ("POSTROOM_WORKER_BATCH", "0", "POSTROOM_WORKER_BATCH must be >= 1"),
        ("POSTROOM_REDIS_ULR", "redis://x", "unknown setting POSTROOM_REDIS_ULR"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, message: str) -> None:
    """A bad value or a misspelt name stops start-up with a message naming it."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value}, require_secrets=False)
    assert message in str(info.value)
    assert name in str(info.value) or name == "POSTROOM_LOG_FORMAT"


def test_secrets_do_not_show_in_repr() -> None:
    """Printing the settings never prints the secrets."""
    s = Settings(admin_token="adm-secret", secret_key=generate_key(),
                 default_smtp_url="smtp://u:relay-pw@h:587")
    assert "adm-secret" not in repr(s) and "relay-pw" not in repr(s)


def test_json_logs_carry_the_bound_ids() -> None:
    """A JSON log line holds the event and the task and solution ids passed with it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("postroom.test-json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.info("sent", extra={"task_id": "t1", "solution_id": "acme"})
    line = json.loads(stream.getvalue())
    assert (line["event"], line["task_id"], line["solution_id"]) == ("sent", "t1", "acme")
    assert line["level"] == "info"
