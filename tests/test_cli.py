"""`postkeep` admin commands against the stack's PostgreSQL and MinIO.

Most tests drive the click tree in-process (CliRunner keeps stdout, stderr
and exit status apart); the content round trip also runs the installed
`postkeep` console script, because binary stdout through a real process is
what an operator piping `messages raw` into a file gets.  `messages raw` is
run on objects the real milter stored (mail sent through Postfix), and its
output is held to the copy the sink received (tests/support/captured.py).
"""

from __future__ import annotations

import io
import json
import os
import smtplib
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import psycopg
import pytest
import zstandard
from click.testing import CliRunner, Result
from conftest import Invoke, StackEnv, StoreMessage, TestOrg, unique_name
from support.captured import Captured, awkward_message, send_captured
from support.stack import Stack

from postkeep.cli.common import check_domain, parse_since
from postkeep.storage.content import container
from postkeep.storage.content.objects import S3ObjectStore, read_all
from postkeep.storage.metadata import directory


def _ok(result: Result) -> Result:
    """RESULT, after asserting it exited 0 (showing stderr when not)."""
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.stderr}{result.exception!r}"
    return result


# --- unit: parsing helpers and --help ---------------------------------------


def _walk(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path under GROUP, the group itself first."""
    yield path
    for name, sub in group.commands.items():
        if isinstance(sub, click.Group):
            yield from _walk(sub, (*path, name))
        else:
            yield (*path, name)


@pytest.mark.unit
def test_help_works_on_every_command(root: click.Group) -> None:
    paths = list(_walk(root))
    for expected in (("db", "migrate"), ("org", "add"), ("messages", "raw"), ("submitter", "add")):
        assert expected in paths
    for path in paths:
        result = CliRunner().invoke(root, [*path, "--help"])
        assert result.exit_code == 0, path
        assert "Usage:" in result.stdout and "Show this message and exit." in result.stdout


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h", datetime(2026, 3, 1, 11, 0, tzinfo=UTC)),
        ("2d", datetime(2026, 2, 27, 12, 0, tzinfo=UTC)),
        ("30m", datetime(2026, 3, 1, 11, 30, tzinfo=UTC)),
        ("1w", datetime(2026, 2, 22, 12, 0, tzinfo=UTC)),
        ("2026-02-01T08:00:00Z", datetime(2026, 2, 1, 8, 0, tzinfo=UTC)),
        ("2026-02-01T08:00:00+02:00", datetime(2026, 2, 1, 6, 0, tzinfo=UTC)),
        ("2026-02-01", datetime(2026, 2, 1, tzinfo=UTC)),
    ],
)
def test_parse_since(text: str, expected: datetime) -> None:
    assert parse_since(text, datetime(2026, 3, 1, 12, 0, tzinfo=UTC)) == expected


@pytest.mark.unit
def test_parse_since_refusal_names_value() -> None:
    with pytest.raises(ValueError, match=r"--since 'yesterday': expected ISO 8601"):
        parse_since("yesterday", datetime.now(UTC))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("localhost", "at least two labels"),
        ("bad_domain.com", "label 'bad_domain'"),
        ("-x.example.com", "label '-x'"),
        ("a..example.com", "label ''"),
        ("example.123", "top-level label cannot be numeric"),
        ("x" * 64 + ".com", "1-63"),
        ("", "empty"),
    ],
)
def test_check_domain_refuses_with_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"domain {text!r}: .*"):
        check_domain(text)
    with pytest.raises(ValueError) as info:
        check_domain(text)
    assert reason in str(info.value)


@pytest.mark.unit
def test_check_domain_normalises() -> None:
    assert check_domain("Mail.Example.COM.") == "mail.example.com"
    assert check_domain("xn--bcher-kva.example") == "xn--bcher-kva.example"


@pytest.mark.unit
def test_unreachable_postgres_is_one_line_exit_3(root: click.Group, tmp_path: Path) -> None:
    conf = tmp_path / "postkeep.toml"
    conf.write_text('[postgres]\nhost = "127.0.0.1"\nport = 1\nconnect_timeout_seconds = 1\n')
    result = CliRunner().invoke(root, ["--config", str(conf), "org", "list"])
    assert result.exit_code == 3  # backend unavailable (README, "The postkeep command")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("postkeep: postgres: ")


# --- stack: db, org, domain, submitter --------------------------------------


@pytest.mark.stack
def test_db_migrate_is_idempotent(run: Invoke, db: psycopg.Connection) -> None:
    _ok(run("db", "migrate"))
    second = _ok(run("db", "migrate"))
    assert second.stdout.splitlines() == ["schema up to date", "created 0 partition(s)"]


@pytest.mark.stack
def test_org_add_then_list_and_json(run: Invoke, db: psycopg.Connection) -> None:
    name = unique_name("cli")
    added = _ok(run("org", "add", name, "--tier", "pro", "--content-days", "100"))
    oid = uuid.UUID(added.stdout.strip())
    listed = json.loads(_ok(run("org", "list", "--json")).stdout)
    mine = [o for o in listed if o["name"] == name]
    assert mine == [
        {"id": str(oid), "name": name, "tier": "pro", "content_days": 100, "metadata_days": 365}
    ]
    table = _ok(run("org", "list")).stdout
    assert any(line.startswith(str(oid)) and name in line for line in table.splitlines())
    again = run("org", "add", name, "--tier", "pro")
    assert again.exit_code == 1 and f"organisation {name!r} already exists" in again.stderr


@pytest.mark.stack
def test_org_add_unknown_tier_names_allowed_tiers(run: Invoke, db: psycopg.Connection) -> None:
    name = unique_name("cli")
    result = run("org", "add", name, "--tier", "platinum")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "postkeep: --tier 'platinum': unknown tier; allowed: free, basic, pro, enterprise"
    )
    assert directory.find_by_name(db, name) is None


@pytest.mark.stack
def test_org_add_refuses_content_outliving_metadata(run: Invoke, db: psycopg.Connection) -> None:
    name = unique_name("cli")
    result = run("org", "add", name, "--tier", "free", "--content-days", "60")
    assert result.exit_code == 1
    assert "content retention 60 days exceeds metadata retention 30 days" in result.stderr
    assert directory.find_by_name(db, name) is None
    _ok(run("org", "add", name, "--tier", "free", "--content-days", "60", "--metadata-days", "60"))
    org = directory.find_by_name(db, name)
    assert org is not None and (org.content_days, org.metadata_days) == (60, 60)
    _ok(run("org", "add", unique_name("cli"), "--tier", "enterprise", "--content-days", "3650"))


@pytest.mark.stack
def test_domain_add_validates_and_records(
    run: Invoke, db: psycopg.Connection, make_org: Callable[..., TestOrg]
) -> None:
    org = make_org()
    bad = run("domain", "add", org.name, "bad_domain.example")
    assert bad.exit_code == 1 and "label 'bad_domain'" in bad.stderr
    good = f"Mail.{org.name}.Example.TEST"
    _ok(run("domain", "add", str(org.id), good))
    found = directory.find_by_domain(db, good.lower())
    assert found is not None and found.id == org.id
    taken = run("domain", "add", org.name, good)
    assert taken.exit_code == 1 and f"already belongs to {org.name}" in taken.stderr
    nobody = run("domain", "add", unique_name("missing"), "ok.example.test")
    assert nobody.exit_code == 1 and "no organisation" in nobody.stderr


@pytest.mark.stack
def test_submitter_add(
    run: Invoke, db: psycopg.Connection, make_org: Callable[..., TestOrg]
) -> None:
    org = make_org()
    user = unique_name("sasl")
    _ok(run("submitter", "add", org.name, user))
    found = directory.find_by_submitter(db, user)
    assert found is not None and found.id == org.id


# --- stack: messages --------------------------------------------------------


@pytest.mark.stack
def test_messages_list_filters(
    run: Invoke, make_org: Callable[..., TestOrg], store_message: StoreMessage
) -> None:
    org, other = make_org(), make_org()
    now = datetime.now(UTC)
    recent = store_message(org, recipients=("Alice@Example.net",), created=now)
    older = store_message(
        org, recipients=("bob@example.net",), created=now - timedelta(hours=3),
        envelope_from=f"news@{org.domain}",
    )
    oldest = store_message(org, recipients=("carol@example.net",), created=now - timedelta(days=2))
    store_message(other, recipients=("alice@example.net",), created=now)

    def ids(*args: str) -> list[str]:
        """The ids `messages list --json ARGS` prints."""
        page = json.loads(_ok(run("messages", "list", "--json", *args)).stdout)
        return [m["id"] for m in page["messages"]]

    assert ids("--org", org.name) == [str(recent.id), str(older.id), str(oldest.id)]
    assert ids("--org", str(org.id), "--limit", "2") == [str(recent.id), str(older.id)]
    assert ids("--org", org.name, "--sender", f"NEWS@{org.domain}") == [str(older.id)]
    assert ids("--org", org.name, "--recipient", "alice@example.net") == [str(recent.id)]
    assert ids("--org", org.name, "--since", "1h") == [str(recent.id)]
    assert ids("--org", org.name, "--since", (now - timedelta(days=1)).isoformat()) == [
        str(recent.id), str(older.id),
    ]
    assert ids("--sender", recent.envelope_from, "--since", "1h") == [str(recent.id)]
    text = _ok(run("messages", "list", "--org", org.name)).stdout.splitlines()
    assert text[0].startswith("ID") and text[1].startswith(str(recent.id)) and len(text) == 4
    bad = run("messages", "list", "--since", "yesterday")
    assert bad.exit_code == 1 and "--since 'yesterday'" in bad.stderr
    unknown = run("messages", "list", "--org", unique_name("missing"))
    assert unknown.exit_code == 1 and "no organisation" in unknown.stderr


@pytest.mark.stack
def test_messages_show_recipients_and_delivery_status(
    run: Invoke, db: psycopg.Connection, make_org: Callable[..., TestOrg],
    store_message: StoreMessage,
) -> None:
    from datetime import UTC, datetime

    from support.reports import block, dsn

    from postkeep.envelope import return_path
    from postkeep.storage.reports.dsn import parse_report
    from postkeep.storage.reports.outcomes import record_batch

    m = store_message(make_org(), recipients=("a@example.net", "b@example.net"))
    report = dsn(m.id, [block("b@example.net", "failed", "5.1.1", "550 5.1.1 no such user")])
    key = b"cli test return-path key 32 byte"
    to = return_path(m.id, m.metadata_expires_at, "bounces.example", key)
    record_batch(db, [parse_report(report, "", [to], datetime.now(UTC), key)])
    shown = json.loads(_ok(run("messages", "show", str(m.id), "--json")).stdout)
    assert shown["id"] == str(m.id) and shown["sha256"] == m.sha256.hex()
    assert shown["content_available"] is True and "content_note" not in shown
    rcpts = {r["recipient"]: r for r in shown["recipients"]}
    assert rcpts["a@example.net"]["status"] == "queued"
    assert rcpts["b@example.net"] | {"updated_at": None, "history": None} == {
        "recipient": "b@example.net", "status": "bounced", "dsn_status": "5.1.1",
        "remote_mta": "mx.remote.example", "diagnostic": "550 5.1.1 no such user",
        "updated_at": None, "history": None,
    }
    assert [(e["status"], e["dsn_status"], e["report"], e["applied"])
            for e in rcpts["b@example.net"]["history"]] == [("bounced", "5.1.1", "dsn", True)]
    assert rcpts["a@example.net"]["history"] == []
    text = _ok(run("messages", "show", str(m.id))).stdout
    assert "b@example.net  bounced" in text and "dsn_status: 5.1.1" in text
    assert "bounced  5.1.1  550 5.1.1 no such user  [dsn]" in text
    assert "content expired" not in text


@pytest.mark.stack
def test_messages_show_expired_content(
    run: Invoke, make_org: Callable[..., TestOrg], store_message: StoreMessage
) -> None:
    m = store_message(
        make_org(), created=datetime.now(UTC) - timedelta(days=8), content_days=7,
        metadata_days=30,
    )
    shown = json.loads(_ok(run("messages", "show", str(m.id), "--json")).stdout)
    assert shown["content_available"] is False
    assert shown["content_note"] == "content expired per retention policy"
    assert "content expired per retention policy" in _ok(run("messages", "show", str(m.id))).stdout
    raw = run("messages", "raw", str(m.id))
    assert raw.exit_code == 1 and raw.stdout_bytes == b""
    assert "content expired per retention policy" in raw.stderr


@pytest.mark.stack
def test_messages_show_unknown_id(run: Invoke, db: psycopg.Connection) -> None:
    missing = str(uuid.uuid4())
    result = run("messages", "show", missing)
    assert result.exit_code == 1 and f"no message with id {missing}" in result.stderr
    garbage = run("messages", "raw", "not-an-id")  # neither a postkeep nor a queue id
    assert garbage.exit_code == 1
    assert "no message with id or Postfix queue id 'not-an-id'" in garbage.stderr


@pytest.fixture
def captured(stack: Stack, make_org: Callable[..., TestOrg]) -> Captured:
    """A message the real milter stored, its attachment in a part object of its own
    (a container object): `messages raw` is tested on what the capture path
    wrote, never on an object the test wrote with its own writer."""
    org = make_org()
    token = uuid.uuid4().hex
    sender = f"app@{org.domain}"
    data = awkward_message(sender, token, os.urandom(300_000))
    c = send_captured(stack, sender, data, token)
    assert stack.stored(c.object_key)[:len(container.MAGIC)] == container.MAGIC
    return c


@pytest.mark.stack
def test_messages_raw_restores_exact_bytes(run: Invoke, captured: Captured) -> None:
    result = _ok(run("messages", "raw", str(captured.id)))
    assert result.stdout_bytes == captured.delivered


@pytest.mark.stack
def test_messages_raw_through_the_console_script(
    stack_env: StackEnv, captured: Captured
) -> None:
    script = Path(sys.executable).with_name("postkeep")
    proc = subprocess.run(
        [str(script), "--config", stack_env.config_path, "messages", "raw", str(captured.id)],
        capture_output=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == captured.delivered


@pytest.mark.stack
def test_messages_raw_detects_a_truncated_object(
    run: Invoke, stack: Stack, objects: S3ObjectStore, make_org: Callable[..., TestOrg]
) -> None:
    org = make_org()
    token = uuid.uuid4().hex
    sender = f"app@{org.domain}"
    m = send_captured(stack, sender, (
        f"From: {sender}\r\nSubject: frames\r\nX-Test-Token: {token}\r\n\r\n".encode()
        + b"body line\r\n" * 2000), token)
    if stack.config.storage.master_key_bytes() is not None:
        # Sealed (storage/content/sealing.py): AES-GCM authenticates the whole
        # entry, so an object cut short is refused before a byte is written.
        whole = read_all(objects, m.object_key)
        cut = whole[:-64]
        objects.put(m.object_key, io.BytesIO(cut), len(cut))
        result = run("messages", "raw", str(m.id))
        assert result.exit_code == 1 and result.stdout_bytes == b"", result.stderr
        assert "does not authenticate" in result.stderr and m.object_key in result.stderr, (
            result.stderr)
        return
    stored = stack.stored(m.object_key)
    # The milter's object ends its first zstd frame with the header block: drop
    # the frames after it, as an upload cut short at a frame boundary would.
    rest = zstandard.ZstdDecompressor().decompressobj()
    head = rest.decompress(stored)
    assert rest.unused_data and head == m.delivered[:len(head)]
    truncated = stored[:len(stored) - len(rest.unused_data)]
    objects.put(m.object_key, io.BytesIO(truncated), len(truncated))
    result = run("messages", "raw", str(m.id))
    assert result.exit_code == 1 and result.stdout_bytes == head
    assert "do not match the recorded" in result.stderr and m.object_key in result.stderr


@pytest.mark.stack
def test_mail_through_postfix_is_listed_shown_and_restored(
    run: Invoke, stack_env: StackEnv, make_org: Callable[..., TestOrg]
) -> None:
    org = make_org("pro")
    token = uuid.uuid4().hex
    sender = f"app@{org.domain}"
    # 200 kB in lines of legal length (the milter breaks longer ones, as Postfix will).
    body = f"token {token}\r\n".encode() + (b"x" * 998 + b"\r\n") * 200
    data = f"From: {sender}\r\nTo: r@sink.test\r\nSubject: cli {token}\r\n\r\n".encode() + body
    with smtplib.SMTP(stack_env.smtp_host, stack_env.smtp_port, timeout=30) as smtp:
        smtp.sendmail(sender, ["r@sink.test"], data)  # accepted only once stored
    listed = json.loads(_ok(run("messages", "list", "--org", org.name, "--json")).stdout)[
        "messages"]
    assert len(listed) == 1
    assert (listed[0]["envelope_from"], listed[0]["subject"]) == (sender, f"cli {token}")
    mid = listed[0]["id"]
    shown = json.loads(_ok(run("messages", "show", mid, "--json")).stdout)
    assert [r["recipient"] for r in shown["recipients"]] == ["r@sink.test"]
    assert shown["content_available"] is True
    raw = _ok(run("messages", "raw", mid)).stdout_bytes  # size and sha256 verified
    assert raw.endswith(body)
    assert f"Subject: cli {token}\r\n".encode() in raw
