"""The operator's `postkeep` surface against the stack's PostgreSQL and MinIO.

What used to need SQL (an organisation's tier, overrides and forward_failures,
tier definitions, removing or renaming organisations, domains and
submitters), paging through more than 10,000 messages, `messages show` by
Postfix queue id, --json on read commands, and destructive commands that ask
first and change nothing under --dry-run.  Every test reads the rows back
from PostgreSQL (and objects from MinIO) rather than trusting the output.
"""

from __future__ import annotations

import hashlib
import json
import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from click.testing import Result
from conftest import Invoke, StoreMessage, TestOrg, unique_name
from support.stack import Stack

from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.metadata import limits, messages

pytestmark = pytest.mark.stack



def _ok(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.stderr}{result.exception!r}"
    return result.stdout


def _refused(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.strip().splitlines()[-1].startswith("postkeep: "), result.stderr
    return result.stderr


def _org_row(db: psycopg.Connection, org_id: uuid.UUID) -> tuple[object, ...] | None:
    return db.execute(
        "SELECT name, tier, content_days, metadata_days, messages_per_hour,"
        " recipients_per_day, bytes_per_day, forward_failures FROM organisations"
        " WHERE id = %s", (org_id,)).fetchone()


# --- organisations ------------------------------------------------------------


def test_org_set_changes_tier_overrides_and_forward_failures(
        run: Invoke, db: psycopg.Connection, make_org: Callable[..., TestOrg]) -> None:
    org, legacy = make_org("free"), make_org("free")
    # another organisation already in conflict (written by SQL before these
    # commands existed) must not block changes to this one
    db.execute("UPDATE organisations SET content_days = 100, metadata_days = 10 WHERE id = %s",
               (legacy.id,))
    try:
        _org_set_checks(run, db, org)
    finally:  # other tests may list organisations
        db.execute("UPDATE organisations SET content_days = NULL, metadata_days = NULL"
                   " WHERE id = %s", (legacy.id,))


def _org_set_checks(run: Invoke, db: psycopg.Connection, org: TestOrg) -> None:
    _ok(run("org", "set", org.name, "--tier", "basic", "--content-days", "20",
            "--messages-per-hour", "55", "--bytes-per-day", "1000000",
            "--forward-failures", "on"))
    assert _org_row(db, org.id) == (org.name, "basic", 20, None, 55, None, 1000000, True)
    shown = json.loads(_ok(run("org", "show", org.name, "--json")))
    assert shown["overrides"]["messages_per_hour"] == 55
    assert shown["effective"]["recipients_per_day"] == 10000  # basic's
    assert shown["effective"]["metadata_days"] == 90 and shown["forward_failures"] is True
    lim = limits.find_by_name(db, org.name)
    assert lim is not None and lim.messages_per_hour == 55  # what policyd reads

    _ok(run("org", "set", org.name, "--messages-per-hour", "tier", "--forward-failures", "off"))
    assert _org_row(db, org.id) == (org.name, "basic", 20, None, None, None, 1000000, False)

    # content outliving metadata: refused, and nothing of the request applied
    err = _refused(run("org", "set", org.name, "--content-days", "200", "--tier", "free"))
    assert "metadata must outlive content" in err and "nothing changed" in err
    assert _org_row(db, org.id) == (org.name, "basic", 20, None, None, None, 1000000, False)
    assert "unknown tier" in _refused(run("org", "set", org.name, "--tier", "gold"))
    assert "no organisation" in _refused(run("org", "set", unique_name("x"), "--tier", "free"))


def test_org_rename(run: Invoke, db: psycopg.Connection,
                    make_org: Callable[..., TestOrg]) -> None:
    org, other = make_org(), make_org()
    new = unique_name("renamed")
    _ok(run("org", "rename", org.name, new))
    assert _org_row(db, org.id)[0] == new  # type: ignore[index]
    assert "already exists" in _refused(run("org", "rename", new, other.name))
    assert _org_row(db, org.id)[0] == new  # type: ignore[index]


def _count(db: psycopg.Connection, table: str, org_id: uuid.UUID) -> int:
    row = db.execute(f"SELECT count(*) FROM {table} WHERE org_id = %s", (org_id,)).fetchone()
    return int(row[0]) if row else 0


def test_org_remove_refuses_with_mail_unless_forced_and_deletes_its_objects(
        run: Invoke, db: psycopg.Connection, make_org: Callable[..., TestOrg],
        store_message: StoreMessage, objects: S3ObjectStore) -> None:
    org = make_org("free")
    stored = [store_message(org) for _ in range(3)]
    db.execute("INSERT INTO submitters (username, org_id) VALUES (%s, %s)",
               (unique_name("sasl"), org.id))

    def intact() -> None:
        assert _org_row(db, org.id) is not None
        assert _count(db, "messages", org.id) == 3 and _count(db, "domains", org.id) == 1
        for m in stored:
            objects.client.stat_object(objects.bucket, m.object_key)  # still there

    dry = _ok(run("org", "remove", org.name, "--dry-run"))
    assert "would remove organisation" in dry and "3 messages" in dry and "3 S3 objects" in dry
    assert "refused anyway without --force" in dry
    intact()
    err = _refused(run("org", "remove", "--yes", org.name))
    assert "has stored mail (3 messages" in err and "--force" in err
    intact()
    # forced, but not confirmed (no answer on stdin): nothing happens
    err = _refused(run("org", "remove", "--force", org.name))
    assert "not confirmed, nothing changed" in err
    intact()
    out = _ok(run("org", "remove", "--force", org.name, input="y\n"))
    assert "3 objects deleted" in out
    assert _org_row(db, org.id) is None
    for table in ("messages", "message_recipients", "domains", "submitters"):
        assert _count(db, table, org.id) == 0, table
    for m in stored:
        with pytest.raises(Exception, match="NoSuchKey"):
            objects.client.stat_object(objects.bucket, m.object_key)
    audit = db.execute("SELECT count, detail FROM retention_audit WHERE action = 'org_removed'"
                       " AND org_id = %s", (org.id,)).fetchone()
    assert audit is not None and audit[1]["objects_deleted"] == 3


def test_org_remove_without_mail_and_under_a_legal_hold(
        run: Invoke, db: psycopg.Connection, make_org: Callable[..., TestOrg]) -> None:
    empty, held = make_org(), make_org()
    _ok(run("hold", "add", "--org", held.name, "--reason", "case 9"))
    assert "active legal hold" in _refused(run("org", "remove", "--yes", "--force", held.name))
    assert _org_row(db, held.id) is not None
    out = _ok(run("org", "remove", "--yes", empty.name))
    assert "removed organisation" in out and "1 domains" in out
    assert _org_row(db, empty.id) is None and _count(db, "domains", empty.id) == 0


# --- tiers ----------------------------------------------------------------------


def _tier_row(db: psycopg.Connection, name: str) -> tuple[object, ...] | None:
    return db.execute("SELECT content_days, metadata_days, messages_per_hour,"
                      " recipients_per_day, bytes_per_day FROM tiers WHERE name = %s",
                      (name,)).fetchone()


@pytest.fixture
def tier_name(db: psycopg.Connection) -> Iterator[str]:
    """A fresh tier name; the tier is gone afterwards even if the test failed
    (other tests list the tiers), its organisations moved to 'free'."""
    name = unique_name("tier")
    yield name
    with db.transaction():
        db.execute("UPDATE organisations SET tier = 'free' WHERE tier LIKE 'tier-%'")
        db.execute("DELETE FROM tiers WHERE name LIKE 'tier-%'")


def test_tier_add_set_list_remove(run: Invoke, db: psycopg.Connection, tier_name: str,
                                  make_org: Callable[..., TestOrg]) -> None:
    name = tier_name
    _ok(run("tier", "add", name, "--content-days", "10", "--metadata-days", "40",
            "--messages-per-hour", "7"))
    assert _tier_row(db, name) == (10, 40, 7, None, None)
    assert "already exists" in _refused(run("tier", "add", name, "--content-days", "10"))
    org = make_org(name, content_days=20)  # its own override, within the tier's 40
    _ok(run("tier", "set", name, "--messages-per-hour", "unlimited", "--recipients-per-day",
            "70"))
    assert _tier_row(db, name) == (10, 40, None, 70, None)
    lim = limits.find_by_name(db, org.name)
    assert lim is not None and (lim.messages_per_hour, lim.recipients_per_day) == (None, 70)
    # an organisation on it would keep content longer than metadata: refused whole
    err = _refused(run("tier", "set", name, "--metadata-days", "15", "--content-days", "4"))
    assert org.name in err and "metadata must outlive content" in err
    assert _tier_row(db, name) == (10, 40, None, 70, None)
    listed = {t["name"]: t for t in json.loads(_ok(run("tier", "list", "--json")))}
    assert listed[name]["organisations"] == 1 and listed[name]["recipients_per_day"] == 70
    assert "used by 1 organisation" in _refused(run("tier", "remove", "--yes", name))
    _ok(run("org", "set", org.name, "--tier", "free"))
    assert "would remove tier" in _ok(run("tier", "remove", "--dry-run", name))
    assert _tier_row(db, name) is not None
    _ok(run("tier", "remove", "--yes", name))
    assert _tier_row(db, name) is None


# --- domains and submitters -------------------------------------------------------


def test_domain_and_submitter_remove_and_rename(
        stack: Stack, run: Invoke, db: psycopg.Connection,
        make_org: Callable[..., TestOrg]) -> None:
    org = make_org()
    new_domain = f"{unique_name('d')}.example.test"
    _ok(run("domain", "rename", org.domain, new_domain))
    assert db.execute("SELECT org_id FROM domains WHERE domain = %s",
                      (new_domain,)).fetchone() == (org.id,)
    assert db.execute("SELECT 1 FROM domains WHERE domain = %s", (org.domain,)).fetchone() is None
    listed = json.loads(_ok(run("domain", "list", "--org", org.name, "--json")))
    assert [d["domain"] for d in listed] == [new_domain]

    # a domain with DKIM keys is not renamed (its records are under the old name)
    _, signed = stack.new_org("free")
    assert "DKIM key(s)" in _refused(run("domain", "rename", signed, new_domain + "x"))
    dry = _ok(run("domain", "remove", "--dry-run", signed))
    assert "would remove domain" in dry and "1 DKIM key(s)" in dry
    assert db.execute("SELECT count(*) FROM dkim_keys WHERE domain = %s",
                      (signed,)).fetchone() == (1,)
    _ok(run("domain", "remove", "--yes", signed))
    assert db.execute("SELECT count(*) FROM domains d FULL JOIN dkim_keys k USING (domain)"
                      " WHERE domain = %s", (signed,)).fetchone() == (0,)
    assert "no domain" in _refused(run("domain", "remove", "--yes", signed))

    user, renamed = unique_name("sasl"), unique_name("sasl")
    _ok(run("submitter", "add", org.name, user))
    _ok(run("submitter", "rename", user, renamed))
    assert db.execute("SELECT org_id FROM submitters WHERE username = %s",
                      (renamed,)).fetchone() == (org.id,)
    assert "would remove submitter" in _ok(run("submitter", "remove", "--dry-run", renamed))
    assert "not confirmed" in _refused(run("submitter", "remove", renamed, input="n\n"))
    assert db.execute("SELECT 1 FROM submitters WHERE username = %s", (renamed,)).fetchone()
    _ok(run("submitter", "remove", "-y", renamed))
    assert db.execute("SELECT 1 FROM submitters WHERE username = %s",
                      (renamed,)).fetchone() is None


# --- messages: paging past 10,000, show by queue id --------------------------------


def _bulk(db: psycopg.Connection, org: TestOrg, n: int, newest: datetime,
          queue_id: str | None = None) -> list[uuid.UUID]:
    """N message rows (no content), one per millisecond back from NEWEST; the
    first ten share NEWEST exactly, so paging must break ties by id."""
    batch = []
    for i in range(n):
        created = newest - timedelta(milliseconds=max(0, i - 9))
        content_at, metadata_at = messages.expiry_dates(created, 7, 30)
        mid = uuid.uuid4()
        batch.append(messages.CapturedMessage(
            id=mid, org_id=org.id, domain=org.domain,
            queue_id=queue_id or uuid.uuid4().hex[:11].upper(),
            envelope_from=f"bulk@{org.domain}", recipients=("r@example.net",), size=10,
            sha256=hashlib.sha256(mid.bytes).digest(), object_key=f"none/{mid}",
            compressed_size=10, created_at=created, content_expires_at=content_at,
            metadata_expires_at=metadata_at))
    messages.record_captures(db, batch)
    return [m.id for m in batch]


def test_messages_list_pages_past_10000_with_a_cursor(
        run: Invoke, db: psycopg.Connection, make_org: Callable[..., TestOrg]) -> None:
    org = make_org("free")
    now = datetime.now(UTC).replace(microsecond=0)
    ids = _bulk(db, org, 10_005, now)
    first = json.loads(_ok(run("messages", "list", "--org", org.name, "--limit", "10000",
                               "--json")))
    assert len(first["messages"]) == 10_000 and first["next_cursor"]
    second = json.loads(_ok(run("messages", "list", "--org", org.name, "--limit", "10000",
                                "--json", "--cursor", first["next_cursor"])))
    assert second["next_cursor"] is None
    seen = [m["id"] for m in first["messages"] + second["messages"]]
    assert len(seen) == len(set(seen)) == 10_005 and set(seen) == {str(i) for i in ids}

    # small pages over the ten rows with the same created_at: none lost, none twice
    got: list[str] = []
    cursor: list[str] = []
    for _ in range(10):  # bounded: 25 rows, 4 per page
        page = run("messages", "list", "--org", org.name, "--limit", "4",
                   "--until", (now + timedelta(seconds=1)).isoformat(), *cursor)
        rows = [line.split()[0] for line in _ok(page).splitlines()[1:]]
        got += rows
        more = [ln for ln in page.stderr.splitlines() if ln.startswith("more: --cursor ")]
        if not more or len(got) >= 25:
            break
        cursor = ["--cursor", more[0].split()[-1]]
    top25 = [str(r[0]) for r in db.execute(
        "SELECT id FROM messages WHERE org_id = %s ORDER BY created_at DESC, id DESC LIMIT 25",
        (org.id,))]
    assert got[:25] == top25

    # --until: strictly before
    until = now - timedelta(milliseconds=100)
    page = json.loads(_ok(run("messages", "list", "--org", org.name, "--until",
                              until.isoformat(), "--limit", "10000", "--json")))
    assert all(datetime.fromisoformat(m["created_at"]) < until for m in page["messages"])
    assert len(page["messages"]) == 10_005 - 10 - 100
    assert "not a cursor" in _refused(run("messages", "list", "--cursor", "bogus"))
    assert "--until 'then'" in _refused(run("messages", "list", "--until", "then"))


def test_messages_show_by_postfix_queue_id(
        run: Invoke, db: psycopg.Connection, make_org: Callable[..., TestOrg],
        store_message: StoreMessage) -> None:
    org = make_org()
    m = store_message(org)
    shown = json.loads(_ok(run("messages", "show", m.queue_id, "--json")))
    assert shown["id"] == str(m.id) and shown["queue_id"] == m.queue_id
    assert json.loads(_ok(run("messages", "show", m.id.hex, "--json")))["id"] == str(m.id)
    reused = unique_name("Q").replace("-", "").upper()
    twice = _bulk(db, org, 2, datetime.now(UTC), queue_id=reused)
    err = _refused(run("messages", "show", reused))
    assert "names 2 messages" in err and all(str(i) in err for i in twice)
    assert "no message with id or Postfix queue id" in _refused(
        run("messages", "show", "NOSUCHQUEUEID"))


# --- --json on read commands --------------------------------------------------------


def test_read_commands_print_json(stack: Stack, run: Invoke, db: psycopg.Connection,
                                  make_org: Callable[..., TestOrg]) -> None:
    org = make_org("basic")
    shown = json.loads(_ok(run("limits", "show", org.name, "--json")))
    assert shown["name"] == org.name and shown["tier"] == "basic"
    assert {w["kind"]: w["limit"] for w in shown["windows"]} == {
        "messages": 1000, "recipients": 10000, "bytes": None}
    assert json.loads(_ok(run("dict", "list", "--org", org.name, "--json"))) == []
    _, domain = stack.new_org("free")
    records = json.loads(_ok(run("dkim", "dns", domain, "--json")))
    assert [(r["name"], r["type"]) for r in records] == [(f"s1._domainkey.{domain}.", "TXT")]
    assert records[0]["value"].startswith("v=DKIM1;")
    lifecycle = json.loads(_ok(run("retention", "lifecycle", "show", "--json")))
    assert set(lifecycle) == {"lifecycle_supported", "rules"}
    drain = json.loads(_ok(run("spool", "drain", "--dry-run", "--json")))
    assert drain["dry_run"] is True and isinstance(drain["entries"], int)


def test_write_commands_print_json(run: Invoke, db: psycopg.Connection) -> None:
    # Every command takes --json: what it changed as one JSON object, errors
    # as one JSON object on stderr with the exit status.
    name = f"json-{uuid.uuid4().hex[:8]}"
    added = json.loads(_ok(run("org", "add", name, "--tier", "basic", "--json")))
    org_id = uuid.UUID(added["id"])
    assert added["name"] == name and _org_row(db, org_id) is not None
    domain = f"{name}.example.test"
    assert json.loads(_ok(run("domain", "add", name, domain, "--json")))["domain"] == domain
    changed = json.loads(_ok(run("org", "set", name, "--messages-per-hour", "7", "--json")))
    assert changed["changes"] == {"messages_per_hour": 7} and changed["org_id"] == str(org_id)
    rcpt = f"gone-{uuid.uuid4().hex[:6]}@example.net"
    sup = json.loads(_ok(run("suppression", "add", name, rcpt, "--reason", "manual", "--json")))
    assert [e["address"] for e in sup["added"]] == [rcpt]
    dry = json.loads(_ok(run("suppression", "remove", name, rcpt, "--dry-run", "--json")))
    assert dry["dry_run"] is True and dry["addresses"] == [rcpt]
    erased = json.loads(_ok(run("erase", "--org", name, "--address", rcpt, "--yes", "--json")))
    assert erased["messages"] == 0 and erased["suppressions_kept"] == 1
    refused = run("domain", "add", name, domain, "--json")
    assert refused.exit_code == 1 and refused.stdout == ""
    assert "already belongs" in json.loads(refused.stderr)["error"]
    removed = json.loads(_ok(run("org", "remove", name, "--yes", "--json")))
    assert removed["org_id"] == str(org_id) and _org_row(db, org_id) is None


# --- destructive commands: confirmation and --dry-run -------------------------------


def test_destructive_commands_ask_and_dry_run_changes_nothing(
        stack: Stack, run: Invoke, db: psycopg.Connection, make_org: Callable[..., TestOrg],
        store_message: StoreMessage, objects: S3ObjectStore) -> None:
    org = make_org()
    db.execute("INSERT INTO rate_counters (org_id, kind, window_start, used)"
               " VALUES (%s, 'messages', date_trunc('hour', now()), 5)", (org.id,))

    def counters() -> int:
        return _count(db, "rate_counters", org.id)

    assert "would reset" in _ok(run("limits", "reset", "--dry-run", org.name))
    assert "not confirmed" in _refused(run("limits", "reset", org.name))
    assert counters() == 1
    _ok(run("limits", "reset", org.name, input="y\n"))
    assert counters() == 0

    m = store_message(org, recipients=("erin@example.net",))
    out = _ok(run("erase", "--dry-run", "--org", org.name, "--address", "erin@example.net"))
    assert "would erase the content of 1 messages" in out
    assert db.execute("SELECT content_erased_at FROM messages WHERE id = %s",
                      (m.id,)).fetchone() == (None,)
    objects.client.stat_object(objects.bucket, m.object_key)

    hold = _ok(run("hold", "add", "--org", org.name, "--reason", "dry"))
    hold_id = int(hold.split()[1])
    assert "would release hold" in _ok(run("hold", "remove", "--dry-run", str(hold_id)))
    assert db.execute("SELECT released_at FROM legal_holds WHERE id = %s",
                      (hold_id,)).fetchone() == (None,)

    _, domain = stack.new_org("free")
    assert "would retire" in _ok(run("dkim", "retire", "--dry-run", domain, "s1"))
    assert db.execute("SELECT retire_after FROM dkim_keys WHERE domain = %s",
                      (domain,)).fetchone() == (None,)
    assert "dictionary versions would be deleted" in _ok(run("dict", "sweep", "--dry-run"))


# --- exit statuses: not found (1) vs backend unavailable (3) -----------------------


def test_not_found_is_1_and_unreachable_s3_is_3(
        stack: Stack, run: Invoke, tmp_path: Path) -> None:
    missing = unique_name("nobody")
    for args in (("org", "show", missing), ("limits", "show", missing),
                 ("messages", "show", str(uuid.uuid4())), ("tier", "remove", "--yes", missing),
                 ("submitter", "remove", "--yes", missing)):
        assert _refused(run(*args)).count("\n") == 1, args
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = Path(stack.env["POSTKEEP_CONFIG"]).read_text()
    endpoint = stack.env["POSTKEEP_S3_ENDPOINT"].removeprefix("http://")
    assert text.count(endpoint) == 1, endpoint
    conf = tmp_path / "postkeep.toml"
    conf.write_text(text.replace(endpoint, f"127.0.0.1:{port}"))
    conf.chmod(0o600)
    err = _refused(run("retention", "lifecycle", "show", config=str(conf)), code=3)
    assert err.startswith("postkeep: s3: ") and err.count("\n") == 1, err
