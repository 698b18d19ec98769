"""Shared fixtures: the running stack, a database connection, the object store.

Tests marked `stack` talk to the real PostgreSQL and MinIO that `make test`
starts; the stack script exports their coordinates (see `STACK_VARS`).  When
those variables are missing the `stack_env` fixture fails the test, naming
them: a stack test that silently skips would report green for a feature that
was never exercised.

Fixtures stay generic so every test file can use them: `stack_env`, `config`,
`db` (an autocommit psycopg connection on a migrated schema), `objects` (an
`S3ObjectStore` on the configured bucket), `make_org` (a uniquely named
organisation with its own domain, so tests never collide with each other or
with earlier runs) and `store_message` (content written as the capture path
writes it, zstd frames in S3, plus the rows from `record_capture`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import click
import psycopg
import pytest
import zstandard
from click.testing import CliRunner, Result
from support.stack import REQUIRED, Stack, load_stack

from postkeep import cli
from postkeep import config as config_mod
from postkeep.milter.committer import GroupCommitter
from postkeep.storage.content import sealing
from postkeep.storage.content.objects import S3ObjectStore, message_key
from postkeep.storage.content.spool import Spool
from postkeep.storage.lifecycle import rules
from postkeep.storage.metadata import directory, dkim_keys, messages, migrate
from postkeep.storage.metadata.db import Database, connect

STACK_VARS = REQUIRED  # one list: tests/support/stack.py

# Every test carries exactly one of these (pyproject.toml describes them), so
# `-m unit`, `-m stack` and `-m outage` between them select the whole suite
# and nothing runs in the wrong company (an outage test stopping a service
# under `-m stack`, a unit test silently left out of `-m unit`).
KINDS = ("unit", "stack", "outage")
# Fixtures that need the running stack: no `unit` test may use them.
STACK_FIXTURES = ("stack_env", "stack")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: an unmarked test is an error too
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong = []
    for item in items:
        kinds = [k for k in KINDS if item.get_closest_marker(k) is not None]
        if len(kinds) != 1:
            wrong.append(f"{item.nodeid}: marked {', '.join(kinds) or 'with none of them'}")
        elif kinds == ["unit"]:
            needs = [f for f in STACK_FIXTURES if f in getattr(item, "fixturenames", ())]
            if needs:
                wrong.append(f"{item.nodeid}: marked unit but uses {', '.join(needs)}")
    if wrong:
        raise pytest.UsageError(
            f"every test needs exactly one of the markers {', '.join(KINDS)}"
            " (pytestmark in its file, or on each test of a file mixing them):\n  "
            + "\n  ".join(wrong))


@dataclass(frozen=True)
class StackEnv:
    """Where the running stack's services are (from `.stack-test/env`)."""

    config_path: str
    pg_host: str
    pg_port: int
    pg_database: str
    pg_user: str
    s3_endpoint: str
    s3_bucket: str
    s3_access_key: str
    s3_secret_key: str
    smtp_host: str
    smtp_port: int
    sink_dir: str


@dataclass(frozen=True)
class TestOrg:
    """An organisation created for one test, with one sender domain."""

    __test__ = False  # not a test class, despite the name

    id: uuid.UUID
    name: str
    tier: str
    domain: str


@pytest.fixture(scope="session")
def stack_env() -> StackEnv:
    """The stack's coordinates; fails (never skips) when any variable is missing."""
    missing = [name for name in STACK_VARS if not os.environ.get(name)]
    if missing:
        pytest.fail(
            "stack test without a running stack: missing " + ", ".join(missing)
            + " (run `make test`, or source .stack-test/env)",
            pytrace=False,
        )
    env = os.environ
    return StackEnv(
        config_path=env["POSTKEEP_CONFIG"],
        pg_host=env["PGHOST"],
        pg_port=int(env["PGPORT"]),
        pg_database=env["PGDATABASE"],
        pg_user=env["PGUSER"],
        s3_endpoint=env["POSTKEEP_S3_ENDPOINT"],
        s3_bucket=env["POSTKEEP_S3_BUCKET"],
        s3_access_key=env["POSTKEEP_S3_ACCESS_KEY"],
        s3_secret_key=env["POSTKEEP_S3_SECRET_KEY"],
        smtp_host=env["POSTKEEP_SMTP_HOST"],
        smtp_port=int(env["POSTKEEP_SMTP_PORT"]),
        sink_dir=env["POSTKEEP_SINK_DIR"],
    )


@pytest.fixture(autouse=True)
def _unit_tests_without_the_stacks_keyring(request: pytest.FixtureRequest) -> Iterator[None]:
    """A unit test runs with no content key installed, whatever stack test ran
    before it in this process (`config` installs the stack's for the session):
    sealing is a process-wide setting, and a unit test that wants it installs
    its own."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    with sealing.using(None):
        yield


@pytest.fixture(scope="session")
def config(stack_env: StackEnv) -> config_mod.Config:
    """The stack's postkeep.toml, loaded as the daemons load it (with its
    content master key installed, as each daemon and CLI command does)."""
    cfg = config_mod.load(stack_env.config_path)
    sealing.install(cfg.storage.master_key_bytes())
    return cfg


@pytest.fixture(scope="session")
def _migrated(config: config_mod.Config) -> None:
    """Apply migrations and partitions once per session (both idempotent)."""
    with connect(config.postgres) as conn:
        migrate.apply_migrations(conn)
        migrate.ensure_partitions(conn)


@pytest.fixture
def db(config: config_mod.Config, _migrated: None) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the stack's database, as the table owner."""
    conn = connect(config.postgres)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(scope="session")
def objects(config: config_mod.Config) -> S3ObjectStore:
    """The stack's object store, bucket created if needed."""
    store = S3ObjectStore(config.s3)
    store.ensure_bucket()
    return store


Invoke = Callable[..., Result]


@pytest.fixture(scope="session")
def root() -> click.Group:
    """The `postkeep` command tree with every group registered, as main() builds it."""
    cli._register()
    return cli.cli


@pytest.fixture
def run(root: click.Group, stack_env: StackEnv) -> Invoke:
    """run(*args, input=None, config=None): `postkeep --config <stack config> ARGS…`
    in-process; the click Result."""

    def _run(*args: str, input: str | None = None, config: str | None = None) -> Result:
        return CliRunner().invoke(root, ["--config", config or stack_env.config_path, *args],
                                  input=input)

    return _run


@pytest.fixture(scope="module")
def locked(config: config_mod.Config) -> S3ObjectStore:
    """A bucket of the test module's own, created with Object Lock by ensure_bucket."""
    cfg = dataclasses.replace(config.s3, bucket=f"postkeep-lock-{uuid.uuid4().hex[:8]}",
                              object_lock="compliance")
    store = S3ObjectStore(cfg)
    store.ensure_bucket()
    return store


class CountingRetention(rules.S3Retention):
    """S3Retention counting the deletes it is asked for."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.deletes: list[str] = []

    def delete_many(self, keys: list[str]) -> list[str]:
        self.deletes += keys or ["<an empty delete_many call>"]
        return super().delete_many(keys)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """An empty outage spool of the test's own."""
    s = Spool(tmp_path / "spool")
    s.ensure()
    return s


@pytest.fixture
def committer(stack: Stack) -> Iterator[tuple[GroupCommitter, Database]]:
    """A group commit of the test's own on the stack (one worker, no linger)
    and its pool."""
    pool = Database(stack.config.postgres, min_size=1)
    c = GroupCommitter(pool, stack.objects(), workers=1, linger=0)
    yield c, pool
    c.close()
    pool.close()


def unique_name(prefix: str = "t") -> str:
    """A name no other test or earlier run uses: PREFIX-<12 hex digits>."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@contextmanager
def dashboard_role(db: psycopg.Connection, tables: str) -> Iterator[str]:
    """A login-less role that may SELECT TABLES (comma-separated), for one test:
    row-level security applies to it as to a customer dashboard.  Yields its name.

    It may read `tenant_roles` (its own row: what the tenant policies look up),
    as every member of postkeep_tenant may."""
    role = unique_name("dash").replace("-", "_")
    db.execute(f'CREATE ROLE "{role}" NOLOGIN')
    try:
        db.execute(f'GRANT SELECT ON {tables}, tenant_roles TO "{role}"')
        yield role
    finally:
        db.execute("DELETE FROM tenant_roles WHERE role_name = %s", (role,))
        db.execute(f'REVOKE ALL ON {tables}, tenant_roles FROM "{role}"')
        db.execute(f'DROP ROLE "{role}"')


def act_as(db: psycopg.Connection, role: str, org_id: uuid.UUID | None = None) -> None:
    """Inside a transaction: ROLE for the rest of it, mapped to ORG_ID (None: to none).

    The mapping is written (as the owner, before switching) the way
    `postkeep tenant grant` writes it; it outlives the transaction only if
    the transaction commits, and dashboard_role removes it."""
    db.execute("DELETE FROM tenant_roles WHERE role_name = %s", (role,))
    if org_id is not None:
        db.execute("INSERT INTO tenant_roles (role_name, org_id) VALUES (%s, %s)", (role, org_id))
    db.execute(f'SET LOCAL ROLE "{role}"')


@pytest.fixture
def make_org(db: psycopg.Connection) -> Callable[..., TestOrg]:
    """A factory: make_org(tier='free', content_days=None, metadata_days=None)."""

    def _make(
        tier: str = "free",
        *,
        content_days: int | None = None,
        metadata_days: int | None = None,
    ) -> TestOrg:
        name = unique_name("org")
        oid = directory.add_organisation(
            db, name, tier, content_days=content_days, metadata_days=metadata_days
        )
        domain = f"{name}.example.test"
        directory.add_domain(db, oid, domain)
        # These organisations have no DKIM key; mail sent for them through the
        # stack goes out unsigned instead of being tempfailed (451 4.7.5).
        dkim_keys.set_missing_key_policy(db, oid, "unsigned")
        if metadata_days is not None:
            migrate.ensure_partitions(db)
        return TestOrg(oid, name, tier, domain)

    return _make


def zstd_frames(parts: Sequence[bytes]) -> bytes:
    """PARTS compressed as one zstd frame each, concatenated (as the milter may)."""
    cctx = zstandard.ZstdCompressor(level=3)
    return b"".join(cctx.compress(part) for part in parts)


StoreMessage = Callable[..., messages.CapturedMessage]


@pytest.fixture
def store_message(db: psycopg.Connection, objects: S3ObjectStore) -> StoreMessage:
    """A factory storing a message as the capture path does; returns what it recorded.

    store_message(org, parts=(headers, body), recipients=(...), created=now,
    content_days=org's, metadata_days=org's, envelope_from=..., subject=...)
    """

    def _store(
        org: TestOrg,
        parts: Sequence[bytes] = (b"Subject: hi\r\n\r\n", b"hello\r\n"),
        recipients: Sequence[str] = ("rcpt@example.net",),
        *,
        created: datetime | None = None,
        content_days: int = 7,
        metadata_days: int | None = 30,
        envelope_from: str | None = None,
        subject: str | None = "hi",
    ) -> messages.CapturedMessage:
        created = created or datetime.now(UTC)
        mid = uuid.uuid4()
        raw = b"".join(parts)
        blob = zstd_frames(parts)
        key = message_key(str(org.id), str(mid), created)
        objects.put(key, io.BytesIO(blob), len(blob))
        content_at, metadata_at = messages.expiry_dates(created, content_days, metadata_days)
        m = messages.CapturedMessage(
            id=mid,
            org_id=org.id,
            domain=org.domain,
            queue_id=uuid.uuid4().hex[:10].upper(),
            envelope_from=envelope_from or f"sender@{org.domain}",
            recipients=tuple(recipients),
            size=len(raw),
            sha256=hashlib.sha256(raw).digest(),
            object_key=key,
            compressed_size=len(blob),
            created_at=created,
            content_expires_at=content_at,
            metadata_expires_at=metadata_at,
            message_id_header=f"<{mid}@{org.domain}>",
            header_from=envelope_from or f"sender@{org.domain}",
            subject=subject,
        )
        with db.transaction():
            messages.record_capture(db, m)
        return m

    return _store


@pytest.fixture(scope="session")
def stack() -> Stack:
    """The running stack (Postfix, PostgreSQL, MinIO, sink) as `support.stack.Stack`."""
    return load_stack()
