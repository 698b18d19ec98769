"""Six `postkeep` commands run for real against the stack, as an operator runs them.

`dkim retire`, `dkim missing-key`, `reports unmatched`, `reports raw`,
`retention lifecycle apply` and `dict sweep`: each through the installed
console script (its own process, exit status, stdout and stderr), its output
and its effect on PostgreSQL, MinIO or the milter, and one refusal: exit 1
and one `postkeep: ...` line naming what was wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import psycopg
import pytest
from conftest import TestOrg
from minio.commonconfig import ENABLED, Filter
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule
from support import smtp
from support.reports import block, dsn
from support.sidecar import deliver
from support.stack import Stack

from postkeep.envelope import return_path
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.lifecycle import rules
from postkeep.storage.metadata import dkim_keys

pytestmark = pytest.mark.stack

Run = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture
def postkeep(stack: Stack) -> Run:
    """postkeep(*args, config=stack's): the console script in its own process."""

    def run(*args: str, config: str | None = None) -> subprocess.CompletedProcess[bytes]:
        exe = Path(stack.env["POSTKEEP_STACK_VENV"]) / "bin" / "postkeep"
        return subprocess.run(
            [str(exe), "--config", config or stack.env["POSTKEEP_CONFIG"], *args],
            capture_output=True, cwd="/", timeout=120)

    return run


def _refused(result: subprocess.CompletedProcess[bytes]) -> str:
    """The one line a refused command printed (it must have printed nothing else)."""
    assert result.returncode == 1, result
    assert result.stdout == b"", result.stdout
    err = result.stderr.decode()
    assert err.startswith("postkeep: ") and err.count("\n") == 1, err
    return err.removesuffix("\n")


def _ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def _config_with(stack: Stack, tmp_path: Path, old: str, new: str) -> str:
    """A copy of the stack's postkeep.toml with OLD replaced by NEW."""
    text = Path(stack.env["POSTKEEP_CONFIG"]).read_text()
    assert text.count(old) == 1, old
    path = tmp_path / "postkeep.toml"
    path.write_text(text.replace(old, new))
    path.chmod(0o600)
    return str(path)


# ------------------------------------------------------------------- dkim


def test_dkim_retire_stops_signing_and_publishing(stack: Stack, postkeep: Run) -> None:
    _, domain = stack.new_org("basic")  # key s1, active now; no key: tempfail

    refused = _refused(postkeep("dkim", "retire", domain, "s9"))
    assert refused == f"postkeep: no key with selector 's9' for domain '{domain}'"

    out = _ok(postkeep("dkim", "retire", "--yes", domain, "S1"))
    assert out.startswith(f"{domain} s1 (rsa-sha256): retired from ")
    retired_at = datetime.fromisoformat(out.strip().rsplit(" ", 1)[1])
    with stack.connect() as conn:
        key = dkim_keys.get_key(conn, domain, "s1")
    assert key is not None and key.retire_after == retired_at
    assert dkim_keys.key_states([key], datetime.now(UTC)) == [(key, "retired")]
    assert _refused(postkeep("dkim", "dns", domain)).startswith(
        f"postkeep: no key to publish for {domain}")
    # The milter stops signing with it once it reloads its keys (a few seconds).
    deadline = time.monotonic() + 30
    while True:
        data = f"From: a@{domain}\r\nSubject: retired\r\n\r\nx\r\n".encode()
        try:
            smtp.send(*stack.smtp, f"a@{domain}", ["r@sink.test"], data)
        except smtp.SMTPError as exc:
            assert exc.reply.code == 451 and exc.reply.enhanced == "4.7.5", exc.reply
            assert f"no active DKIM key for {domain}" in exc.reply.text
            break
        assert time.monotonic() < deadline, "the milter still signs with the retired key"
        time.sleep(0.5)


def test_dkim_missing_key_sets_the_organisations_policy(stack: Stack, postkeep: Run) -> None:
    org, _ = stack.new_org("basic", dkim=False, missing_key="tempfail")
    with stack.connect() as conn:
        name = conn.execute("SELECT name FROM organisations WHERE id = %s", (org,)).fetchone()
    assert name is not None

    out = _ok(postkeep("dkim", "missing-key", name[0], "unsigned"))
    assert out == f"{name[0]}: mail without an active DKIM key is unsigned\n"
    with stack.connect() as conn:
        assert dkim_keys.missing_key_policy(conn, org) == "unsigned"
    out = _ok(postkeep("dkim", "missing-key", str(org), "tempfail"))  # by id too
    with stack.connect() as conn:
        assert dkim_keys.missing_key_policy(conn, org) == "tempfail"

    ghost = f"nobody-{uuid.uuid4().hex[:8]}"
    assert _refused(postkeep("dkim", "missing-key", ghost, "unsigned")) == \
        f"postkeep: no organisation '{ghost}' (see `postkeep org list`)"


# ---------------------------------------------------------------- reports


@pytest.fixture
def unmatched(stack: Stack) -> tuple[bytes, uuid.UUID]:
    """A report about a message postkeep never captured, kept by the sidecar
    as unmatched: (its bytes, the unknown message id)."""
    ghost = uuid.uuid4()
    path = return_path(ghost, datetime.now(UTC) + timedelta(days=30),
                       stack.env["POSTKEEP_BOUNCE_DOMAIN"], stack.config.return_path.key_bytes())
    date = format_datetime(datetime.now(UTC))
    report = dsn(ghost, [block(f"x-{ghost.hex[:8]}@remote.example", "failed", "5.1.1")],
                 date=date)
    reply = deliver(stack, path, report)
    assert reply.code == 250 and reply.text.endswith(" kept as unmatched"), reply
    return report, ghost


def test_reports_unmatched_lists_what_the_sidecar_kept(
        postkeep: Run, unmatched: tuple[bytes, uuid.UUID]) -> None:
    report, ghost = unmatched
    digest = hashlib.sha256(report).hexdigest()

    listed = json.loads(_ok(postkeep("reports", "unmatched", "--since", "10m", "--json")))
    mine = [u for u in listed if u["sha256"] == digest]
    assert len(mine) == 1, listed[:3]
    assert mine[0]["kind"] == "dsn" and mine[0]["size"] == len(report)
    assert mine[0]["reason"] == f"message {ghost} not found (expired, or not captured here)"
    assert mine[0]["object_key"] == f"reports/{digest[:2]}/{digest}.eml.zst"
    table = _ok(postkeep("reports", "unmatched", "--limit", "1000")).splitlines()
    assert table[0].split() == ["RECEIVED", "(UTC)", "REPORT", "KIND", "SIZE", "REASON"]
    assert any(line.split()[2:5] == [digest[:16], "dsn", str(len(report))] for line in table)

    assert _refused(postkeep("reports", "unmatched", "--since", "yesterday")) == (
        "postkeep: --since 'yesterday': expected ISO 8601 (2026-03-01T12:00:00Z) or an age"
        " like 30m, 1h, 2d, 1w")


def test_reports_raw_writes_the_kept_bytes(
        postkeep: Run, objects: S3ObjectStore, unmatched: tuple[bytes, uuid.UUID]) -> None:
    report, _ = unmatched
    digest = hashlib.sha256(report).hexdigest()

    raw = postkeep("reports", "raw", digest[:12].upper())
    assert raw.returncode == 0 and raw.stderr == b"", raw.stderr
    assert raw.stdout == report

    assert _refused(postkeep("reports", "raw", "0123456789abcdef0123")) == \
        "postkeep: 0 unmatched reports match '0123456789abcdef0123'"
    objects.delete(f"reports/{digest[:2]}/{digest}.eml.zst")  # the object lost
    assert _refused(postkeep("reports", "raw", digest)) == \
        f"postkeep: s3: get reports/{digest[:2]}/{digest}.eml.zst: NoSuchKey"


# -------------------------------------------------------------- retention


@pytest.fixture
def bucket_rules(objects: S3ObjectStore) -> Iterator[None]:
    """The bucket's lifecycle configuration as it was, put back after the test."""
    before = objects.client.get_bucket_lifecycle(objects.bucket)
    try:
        yield
    finally:
        if before is None:
            objects.client.delete_bucket_lifecycle(objects.bucket)
        else:
            objects.client.set_bucket_lifecycle(objects.bucket, before)


def test_retention_lifecycle_apply_installs_the_rules_and_keeps_others(
        stack: Stack, postkeep: Run, objects: S3ObjectStore, db: psycopg.Connection,
        bucket_rules: None, tmp_path: Path) -> None:
    theirs = Rule(ENABLED, rule_filter=Filter(prefix="not-postkeep/"), rule_id="site-own-rule",
                  expiration=Expiration(days=3))
    objects.client.set_bucket_lifecycle(objects.bucket, LifecycleConfig([theirs]))
    planned = rules.planned_rules()
    started = datetime.now(UTC)

    out = _ok(postkeep("retention", "lifecycle", "apply"))
    assert out == f"installed {len(planned)} postkeep rules; the bucket has {len(planned) + 1}" \
                  " rules\n"
    installed = objects.client.get_bucket_lifecycle(objects.bucket).rules
    assert {(r.rule_id, r.rule_filter.prefix, r.expiration.days) for r in installed} == \
        {(p.rule_id, p.prefix, p.days) for p in planned} | {("site-own-rule", "not-postkeep/", 3)}
    row = db.execute("SELECT count, detail FROM retention_audit WHERE action ="
                     " 'lifecycle_applied' AND at >= %s", (started,)).fetchone()
    assert row == (len(planned), {"bucket_rules": len(planned) + 1})

    missing = f"postkeep-missing-{uuid.uuid4().hex[:8]}"
    config = _config_with(stack, tmp_path, 'bucket = "postkeep"', f'bucket = "{missing}"')
    assert _refused(postkeep("retention", "lifecycle", "apply", config=config)) == \
        "postkeep: s3: set lifecycle: NoSuchBucket: The specified bucket does not exist"


# ------------------------------------------------------------ dictionaries


def test_dict_sweep_deletes_only_versions_no_message_needs(
        stack: Stack, postkeep: Run, objects: S3ObjectStore, db: psycopg.Connection,
        make_org: Callable[..., TestOrg], tmp_path: Path) -> None:
    org = make_org("pro")
    now = datetime.now(UTC)
    keys = {v: f"dictionaries/{org.id}/{v}.zdict" for v in (1, 2, 3)}
    for key in keys.values():
        objects.put(key, io.BytesIO(b"dictionary"), 10)
    # 1: retired days ago, needed by no stored message any more; 2: retired,
    # but a message compressed with it is kept until tomorrow; 3: current.
    for version, state, retired, needed in (
            (1, "retired", now - timedelta(days=3), now - timedelta(hours=1)),
            (2, "retired", now - timedelta(days=2), now + timedelta(days=1)),
            (3, "current", None, now + timedelta(days=30))):
        db.execute("INSERT INTO zstd_dictionaries (org_id, version, dict_id, object_key, size,"
                   " samples, sample_bytes, state, needed_until, created_at, retired_at)"
                   " VALUES (%s, %s, %s, %s, 10, 20, 2000, %s, %s, %s, %s)",
                   (org.id, version, 1000 + version, keys[version], state, needed,
                    now - timedelta(days=10 - version), retired))

    def states() -> dict[int, str]:
        return dict(db.execute("SELECT version, state FROM zstd_dictionaries WHERE org_id = %s",
                               (org.id,)).fetchall())

    # S3 refusing the delete (wrong credentials): exit 1 naming the object; the
    # version stays marked and its object stays, for the next sweep to finish.
    secret = stack.env["POSTKEEP_S3_SECRET_KEY"]
    config = _config_with(stack, tmp_path, f'secret_key = "{secret}"', 'secret_key = "wrong"')
    refused = _refused(postkeep("dict", "sweep", "--yes", config=config))
    assert refused.startswith("postkeep: s3: delete dictionaries/"), refused
    assert "SignatureDoesNotMatch" in refused, refused
    assert states() == {1: "deleting", 2: "retired", 3: "current"}
    assert stack.stored(keys[1]) == b"dictionary"

    out = _ok(postkeep("dict", "sweep", "--yes"))
    assert out.endswith(" dictionary versions deleted\n") and int(out.split()[0]) >= 1, out
    assert states() == {2: "retired", 3: "current"}
    assert [o.object_name for o in objects.client.list_objects(
        objects.bucket, prefix=f"dictionaries/{org.id}/", recursive=True)] == \
        [keys[2], keys[3]]
