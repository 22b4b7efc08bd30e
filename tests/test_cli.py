"""The ``postroom`` command: keygen, start-up checks, solution administration, the sink."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import smtplib
import subprocess
import sys
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet

from postroom.cli import WSGI_APP, build_parser, gunicorn_argv, main
from postroom.dev.embedded_redis import free_port
from postroom.dev.sink import MailSink
from postroom.shared.crypto import SecretBox, generate_key
from postroom.shared.settings import Settings
from postroom.shared.solutions import SolutionStore

REPO = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment with no POSTROOM_* variable but the ones given."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env


@pytest.fixture
def postroom_env(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> str:
    """The process environment holds only the POSTROOM_* variables a shell admin sets."""
    for name in list(os.environ):
        if name.startswith("POSTROOM_"):
            monkeypatch.delenv(name)
    key = generate_key()
    monkeypatch.setenv("POSTROOM_REDIS_URL", redis_url)
    monkeypatch.setenv("POSTROOM_SECRET_KEY", key)
    return key


def test_keygen_prints_a_valid_fernet_key(capsys: pytest.CaptureFixture[str]) -> None:
    """`postroom keygen` prints one line: a key Fernet accepts."""
    assert 0 == main(["keygen"])
    out = capsys.readouterr().out
    assert 1 == len(out.splitlines())
    token = Fernet(out.strip().encode()).encrypt(b"x")
    assert b"x" == Fernet(out.strip().encode()).decrypt(token)


@pytest.mark.parametrize("command", ["api", "worker"])
def test_production_commands_refuse_to_start_without_admin_token(command: str) -> None:
    """`postroom api|worker` without POSTROOM_ADMIN_TOKEN: exit 2, one line naming it."""
    proc = subprocess.run(
        [sys.executable, "-m", "postroom.cli", command],
        env=clean_env(POSTROOM_SECRET_KEY=generate_key()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert 2 == proc.returncode
    assert "" == proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert 1 == len(lines), proc.stderr
    assert lines[0].startswith("postroom: ")
    assert "POSTROOM_ADMIN_TOKEN" in lines[0]
    assert "Traceback" not in proc.stderr


def test_api_refuses_an_invalid_secret_key() -> None:
    """A secret key that is not a Fernet key is a configuration error naming the variable."""
    proc = subprocess.run(
        [sys.executable, "-m", "postroom.cli", "api"],
        env=clean_env(POSTROOM_ADMIN_TOKEN="admin", POSTROOM_SECRET_KEY="not-a-key"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert 2 == proc.returncode
    assert "POSTROOM_SECRET_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_api_runs_gunicorn_on_the_app_factory_with_extra_options() -> None:
    """`postroom api` runs gunicorn with the factory import string; unknown options pass on."""
    parser = build_parser()
    args, extra = parser.parse_known_args(
        ["api", "--bind", "0.0.0.0:9000", "--workers", "3", "--access-logfile", "-"]
    )
    argv = gunicorn_argv(args, "INFO", extra)
    assert [sys.executable, "-P", "-m", "postroom.api.serve"] == argv[:4]
    assert WSGI_APP == argv[-1] == "postroom.api.wsgi:app_from_env()"
    assert "0.0.0.0:9000" == argv[argv.index("--bind") + 1]
    assert "3" == argv[argv.index("--workers") + 1]
    assert "postroom.api.server.SyncWorker" == argv[argv.index("--worker-class") + 1]
    assert "info" == argv[argv.index("--log-level") + 1]
    assert ["--access-logfile", "-"] == argv[-3:-1]
    assert "--no-control-socket" in argv


def test_api_keeps_a_control_socket_that_is_asked_for() -> None:
    """gunicorn's shared-path control socket is off unless `--control-socket PATH` is given."""
    args, extra = build_parser().parse_known_args(["api", "--control-socket", "/run/p.ctl"])
    argv = gunicorn_argv(args, "INFO", extra)
    assert "--no-control-socket" not in argv
    assert ["--control-socket", "/run/p.ctl", WSGI_APP] == argv[-3:]


def test_unknown_options_are_refused_where_nothing_passes_them_on() -> None:
    """Only `api` and `worker` pass unknown options on; elsewhere they are a usage error."""
    with pytest.raises(SystemExit) as exc:
        main(["keygen", "--bogus"])
    assert 2 == exc.value.code


def test_solution_lifecycle_from_the_shell(
    postroom_env: str,
    real_redis: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """create prints the token once; show prints JSON; rotate-token replaces it; delete."""
    store = SolutionStore(real_redis, SecretBox(postroom_env), Settings().hlimit_default)

    assert 0 == main(
        ["solution", "create", "acme", "--hlimit", "5", "--policy", "defer", "--token", "tok-1"]
    )
    assert "tok-1\n" == capsys.readouterr().out
    assert "acme" == store.by_token("tok-1")

    assert 0 == main(["solution", "show", "acme"])
    shown = json.loads(capsys.readouterr().out)
    assert "acme" == shown["solution_id"]
    assert 5 == shown["config"]["hLimit"]
    assert "defer" == shown["config"]["hLimit_policy"]
    assert shown["config"]["connection_password_set"] is False
    assert "connection_password" not in shown["config"]

    assert 0 == main(["solution", "list"])
    assert "acme\n" == capsys.readouterr().out

    assert 0 == main(["solution", "rotate-token", "acme"])
    new_token = capsys.readouterr().out.strip()
    assert new_token and new_token != "tok-1"
    assert "acme" == store.by_token(new_token)
    assert store.by_token("tok-1") is None

    assert 0 == main(["solution", "delete", "acme"])
    assert 1 == main(["solution", "show", "acme"])
    err = capsys.readouterr().err
    assert err.startswith("postroom: ") and "not found" in err


def test_solution_create_twice_is_a_conflict(
    postroom_env: str, real_redis: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """Creating an existing solution fails with exit 1 and leaves its token alone."""
    assert 0 == main(["solution", "create", "acme"])
    first = capsys.readouterr().out.strip()
    assert first.startswith("pr_")
    assert 1 == main(["solution", "create", "acme"])
    captured = capsys.readouterr()
    assert "" == captured.out
    assert "postroom: solution 'acme' already exists\n" == captured.err


def test_solution_commands_need_the_secret_key(
    postroom_env: str,
    real_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without POSTROOM_SECRET_KEY nothing is written and the message names the variable."""
    monkeypatch.delenv("POSTROOM_SECRET_KEY")
    assert 2 == main(["solution", "create", "acme"])
    assert "POSTROOM_SECRET_KEY" in capsys.readouterr().err
    assert [] == real_redis.keys("*")


def test_solution_create_rejects_an_invalid_id(
    postroom_env: str, real_redis: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """A solution id with braces or spaces would break the Redis keys: refused."""
    assert 2 == main(["solution", "create", "a}b"])
    assert "invalid solution id" in capsys.readouterr().err
    assert [] == real_redis.keys("*")


def test_unreachable_redis_is_a_one_line_error(
    postroom_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Redis that does not answer is reported as `postroom: Redis: ...`, exit 1."""
    monkeypatch.setenv("POSTROOM_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert 1 == main(["solution", "show", "acme"])
    err = capsys.readouterr().err
    assert err.startswith("postroom: Redis: ")
    assert 1 == len(err.strip().splitlines())


def test_sink_keeps_each_message_as_a_parseable_eml(tmp_path: Path) -> None:
    """The sink accepts a message, writes it as .eml with its envelope, and lists it."""
    mail_dir = tmp_path / "mail"
    seen: list[str] = []
    with MailSink(mail_dir, port=free_port(), on_message=lambda m: seen.append(m.subject)) as sink:
        message = EmailMessage()
        message["From"] = "no-reply@postroom.localhost"
        message["To"] = "someone@example.com"
        message["Subject"] = "Hello from the sink test"
        message.set_content("Body line\n.leading dot\n")
        with smtplib.SMTP(sink.host, sink.port, local_hostname="test.localhost") as client:
            client.send_message(message, to_addrs=["someone@example.com", "hidden@example.com"])
            client.send_message(message, to_addrs=["someone@example.com"])
        captured = sink.messages

    assert ["Hello from the sink test"] * 2 == seen
    assert 2 == len(captured)
    first = captured[0]
    assert "no-reply@postroom.localhost" == first.mail_from
    assert ("someone@example.com", "hidden@example.com") == first.rcpt_tos
    assert mail_dir == first.path.parent
    assert first.path.name.endswith(".eml")
    assert first.path != captured[1].path
    assert sorted(p.name for p in mail_dir.iterdir()) == sorted(m.path.name for m in captured)

    parsed = BytesParser(policy=default_policy).parsebytes(first.path.read_bytes())
    assert "Hello from the sink test" == parsed["subject"]
    assert "someone@example.com" == parsed["to"]
    assert "<no-reply@postroom.localhost>" == parsed["return-path"]
    assert "someone@example.com, hidden@example.com" == parsed["x-envelope-to"]
    # the file keeps the bytes as received (CRLF), dot-stuffing undone
    assert "Body line\r\n.leading dot\r\n" == parsed.get_content()


def test_env_example_names_every_setting_and_loads() -> None:
    """deploy/postroom.env.example lists every setting; its active lines are valid values."""
    text = (REPO / "deploy" / "postroom.env.example").read_text()
    named = set(re.findall(r"^(?:# )?POSTROOM_([A-Z0-9_]+)=", text, re.MULTILINE))
    assert {f.name.upper() for f in dataclasses.fields(Settings)} == named

    active = dict(line.split("=", 1) for line in text.splitlines() if line.startswith("POSTROOM_"))
    active.update(POSTROOM_ADMIN_TOKEN="admin", POSTROOM_SECRET_KEY=generate_key())
    Settings.from_env(active)


def test_cli_imports_neither_api_nor_worker() -> None:
    """The command starts the API and the worker by import string only."""
    code = (
        "import sys, postroom.cli, postroom.dev.stack, postroom.dev.sink; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('api', 'worker')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert 0 == proc.returncode, proc.stderr
    assert "[]" == proc.stdout.strip()


def test_dev_demo_solution_answers_to_demo_token(real_redis: redis.Redis, redis_url: str) -> None:
    """`postroom dev` makes sure solution demo exists with token demo-token, every time."""
    from postroom.dev.stack import ensure_demo

    key = generate_key()
    settings = Settings(redis_url=redis_url, secret_key=key)
    store = SolutionStore(real_redis, SecretBox(key), Settings().hlimit_default)
    store.create("demo", {}, "another-token")

    ensure_demo(settings)
    assert "demo" == store.by_token("demo-token")
    assert store.by_token("another-token") is None
    created_at = store.get("demo").created_at

    ensure_demo(settings)  # already right: left as it is
    assert created_at == store.get("demo").created_at
    assert "demo" == store.by_token("demo-token")


def test_a_new_solution_takes_the_configured_default_hlimit(
    postroom_env: str,
    real_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --hlimit, a solution gets POSTROOM_HLIMIT_DEFAULT, not a fixed 10."""
    monkeypatch.setenv("POSTROOM_HLIMIT_DEFAULT", "25")
    assert 0 == main(["solution", "create", "acme", "--token", "tok-2"])
    capsys.readouterr()
    assert 0 == main(["solution", "show", "acme"])
    assert 25 == json.loads(capsys.readouterr().out)["config"]["hLimit"]
