"""Tenant isolation as an attacker with a dashboard's database login would try it.

The attacker is a real LOGIN role, mapped to its organisation with
`postkeep tenant grant`, connecting over TCP with its own password and
running any SQL it is granted: setting `postkeep.org_id` (the setting the old
policies trusted) by SET, set_config() and PGOPTIONS, switching roles,
writing its own mapping, turning row security off, and reading partitions
and side tables an administrator granted it directly.  It must see its own
organisation's rows and nothing else, and every table and partition,
including those created later, must carry the policy.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import click
import psycopg
import pytest
from click.testing import CliRunner
from conftest import StackEnv, StoreMessage, TestOrg, unique_name

from postkeep import cli
from postkeep import config as config_mod
from postkeep.storage.metadata import tenants
from postkeep.storage.metadata.audit import audit

pytestmark = pytest.mark.stack


@dataclass(frozen=True)
class Login:
    """A tenant's database login: role name and password."""

    role: str
    password: str


@pytest.fixture
def login_role(db: psycopg.Connection) -> Iterator[Login]:
    """A LOGIN role with a password, as a DBA creates one for a dashboard; dropped after."""
    login = Login(unique_name("tenant").replace("-", "_"), uuid.uuid4().hex)
    db.execute(f"CREATE ROLE \"{login.role}\" LOGIN PASSWORD '{login.password}'")
    try:
        yield login
    finally:
        db.execute("DELETE FROM tenant_roles WHERE role_name = %s", (login.role,))
        db.execute(f'DROP OWNED BY "{login.role}"')  # grants made on its behalf
        db.execute(f'DROP ROLE "{login.role}"')


def connect_as(config: config_mod.Config, login: Login, options: str = "") -> psycopg.Connection:
    """A connection as LOGIN over TCP, with its password (never the owner's)."""
    pg = config.postgres
    extra = {"options": options} if options else {}
    return psycopg.connect(host=pg.host, port=pg.port, dbname=pg.dbname, user=login.role,
                           password=login.password, autocommit=True, **extra)


def _ids(conn: psycopg.Connection, query: str) -> set[object]:
    return {r[0] for r in conn.execute(query)}


def test_a_tenant_login_reads_only_its_organisation_whatever_the_session_sets(
        db: psycopg.Connection, config: config_mod.Config, login_role: Login,
        make_org: Callable[..., TestOrg], store_message: StoreMessage) -> None:
    mine, theirs = make_org(), make_org()
    m_mine, m_theirs = store_message(mine), store_message(theirs)
    tenants.grant_role(db, mine.id, login_role.role)

    def visible(conn: psycopg.Connection) -> dict[str, set[object]]:
        return {
            "messages": _ids(conn, "SELECT id FROM messages"),
            "recipients": _ids(conn, "SELECT message_id FROM message_recipients"),
            "organisations": _ids(conn, "SELECT id FROM organisations"),
            "domains": _ids(conn, "SELECT domain FROM domains"),
        }

    own = {"messages": {m_mine.id}, "recipients": {m_mine.id},
           "organisations": {mine.id}, "domains": {mine.domain}}
    with connect_as(config, login_role) as conn:
        assert visible(conn) == own
        conn.execute(f"SET postkeep.org_id = '{theirs.id}'")
        assert visible(conn) == own
        conn.execute("SELECT set_config('postkeep.org_id', %s, false)", (str(theirs.id),))
        assert visible(conn) == own
        assert conn.execute("SELECT id FROM messages WHERE id = %s",
                            (m_theirs.id,)).fetchall() == []
        # Its group role is a role it may SET: mapped to nothing, it sees nothing.
        conn.execute("SET ROLE postkeep_tenant")
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
        conn.execute("RESET ROLE")
        # It cannot move itself to another organisation, nor add a mapping.
        for statement in (
            "UPDATE tenant_roles SET org_id = %(theirs)s",
            "INSERT INTO tenant_roles (role_name, org_id) VALUES ('postkeep_tenant', %(theirs)s)",
            "DELETE FROM tenant_roles",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement, {"theirs": theirs.id})
        # Nor turn the policies off.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("ALTER TABLE messages DISABLE ROW LEVEL SECURITY")
        conn.execute("SET row_security = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT id FROM messages")
    # PGOPTIONS is `options` in the startup packet.
    with connect_as(config, login_role, f"-c postkeep.org_id={theirs.id}") as conn:
        assert visible(conn) == own


def test_tables_and_partitions_granted_directly_show_no_other_tenant(
        db: psycopg.Connection, config: config_mod.Config, login_role: Login,
        make_org: Callable[..., TestOrg], store_message: StoreMessage) -> None:
    """An administrator's mistake (SELECT on a partition or a side table) leaks nothing."""
    mine, theirs = make_org(), make_org()
    m_mine, m_theirs = store_message(mine), store_message(theirs)
    part = db.execute("SELECT tableoid::regclass::text FROM messages WHERE id = %s",
                      (m_theirs.id,)).fetchone()
    assert part is not None and part[0] != "messages"
    rpart = db.execute("SELECT tableoid::regclass::text FROM message_recipients"
                       " WHERE message_id = %s", (m_theirs.id,)).fetchone()
    assert rpart is not None
    tenants.grant_role(db, mine.id, login_role.role)
    side = ("reports", "unmatched_reports", "dkim_key_changes", "dkim_keys", "rate_counters",
            "retention_audit", "tiers", "schema_migrations")
    db.execute(f'GRANT SELECT ON {part[0]}, {rpart[0]}, {", ".join(side)}'
               f' TO "{login_role.role}"')
    # Rows of another tenant (or of none) in each, so that seeing them would show.
    probe = uuid.uuid4().bytes * 2
    db.execute("INSERT INTO unmatched_reports (sha256, kind, reason, object_key, size)"
               " VALUES (%s, 'dsn', 'rls probe', 'reports/x', 1)", (probe,))
    db.execute("INSERT INTO reports (sha256, kind, message_id, object_key, size)"
               " VALUES (%s, 'dsn', %s, 'reports/x', 1)", (probe, m_theirs.id))
    audit(db, None, "rls_probe", 0, theirs.id)
    with connect_as(config, login_role) as conn:
        assert _ids(conn, f"SELECT id FROM {part[0]}") <= {m_mine.id}
        assert m_theirs.id not in _ids(conn, f"SELECT message_id FROM {rpart[0]}")
        for table in ("reports", "unmatched_reports", "dkim_key_changes", "tiers",
                      "schema_migrations"):
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table
        for table in ("dkim_keys", "rate_counters", "retention_audit"):
            orgs = _ids(conn, f"SELECT org_id FROM {table}")
            assert orgs <= {mine.id}, table
    db.execute("DELETE FROM unmatched_reports WHERE sha256 = %s", (probe,))
    db.execute("DELETE FROM reports WHERE sha256 = %s", (probe,))


def test_every_table_and_partition_carries_the_policy_also_those_created_later(
        db: psycopg.Connection) -> None:
    # New partitions, as retention and the sidecar create them: the week
    # after the last one of `messages` (and its siblings), and a report day
    # dropped and made again.
    last = db.execute(
        "SELECT max(substring(c.relname from 'e(\\d{4}w\\d{2})$')) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'messages'::regclass"
        " AND c.relname ~ '^messages_e\\d{4}w\\d{2}$'").fetchone()
    assert last is not None and last[0] is not None
    upto = db.execute("SELECT to_date(%s, 'IYYY\"w\"IW') + 8", (last[0],)).fetchone()
    assert upto is not None
    assert db.execute("SELECT ensure_partitions(%s)", (upto[0],)).fetchone() != (0,)
    future = db.execute(
        "SELECT 'reports_d' || to_char((now() AT TIME ZONE 'UTC')::date + 2, 'YYYYMMDD')"
    ).fetchone()
    assert future is not None
    db.execute(f"DROP TABLE IF EXISTS {future[0]}")
    assert db.execute("SELECT maintain_report_partitions(NULL)").fetchone() != (0,)
    assert db.execute("SELECT to_regclass(%s)", (future[0],)).fetchone() != (None,)

    rows = db.execute(
        "SELECT c.relname, c.relrowsecurity,"
        " EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid"
        "         AND a.attname = 'org_id' AND NOT a.attisdropped),"
        " EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid"
        "         AND p.polname = 'tenant_isolation'"
        "         AND pg_get_expr(p.polqual, p.polrelid) ILIKE '%%current_user%%')"
        " FROM pg_class c WHERE c.relnamespace = current_schema()::regnamespace"
        " AND c.relkind IN ('r', 'p')").fetchall()
    assert len(rows) > 100  # every weekly partition is in there
    no_rls = sorted(name for name, rls, _org, _pol in rows if not rls)
    # tenant_roles has a policy of its own (its own row), checked below.
    no_policy = sorted(name for name, _rls, org, pol in rows
                       if org and not pol and name != "tenant_roles")
    assert (no_rls, no_policy) == ([], [])
    own = db.execute("SELECT pg_get_expr(polqual, polrelid) FROM pg_policy"
                     " WHERE polrelid = 'tenant_roles'::regclass").fetchall()
    assert own == [("(role_name = CURRENT_USER)",)]
    old = db.execute("SELECT count(*) FROM pg_policy WHERE pg_get_expr(polqual, polrelid)"
                     " LIKE '%%postkeep.org_id%%'").fetchone()
    assert old == (0,)


def test_tenant_cli_grants_lists_refuses_and_revokes(
        db: psycopg.Connection, stack_env: StackEnv, login_role: Login,
        make_org: Callable[..., TestOrg]) -> None:
    cli._register()
    root: click.Group = cli.cli

    def run(*args: str) -> tuple[int, str, str]:
        r = CliRunner().invoke(root, ["--config", stack_env.config_path, "tenant", *args])
        return r.exit_code, r.stdout, r.stderr

    org, other = make_org(), make_org()
    code, out, _ = run("grant", org.name, login_role.role)
    assert (code, f"reads organisation {org.name}" in out) == (0, True)
    code, out, _ = run("list", "--org", org.name, "--json")
    assert code == 0 and f'"role": "{login_role.role}"' in out and str(org.id) in out
    # One role, one organisation.
    code, _, err = run("grant", other.name, login_role.role)
    assert code == 1 and f"role {login_role.role!r} already reads organisation {org.id}" in err
    # A role that bypasses row-level security is refused, naming why.
    code, _, err = run("grant", org.name, stack_env.pg_user)
    assert code == 1
    assert "bypasses row-level security" in err or "owns postkeep's tables" in err
    code, _, err = run("grant", org.name, "no_such_role_here")
    assert code == 1 and "no database role 'no_such_role_here'" in err
    assert db.execute("SELECT count(*) FROM tenant_roles WHERE role_name IN (%s, %s)",
                      (stack_env.pg_user, "no_such_role_here")).fetchone() == (0,)
    code, out, _ = run("revoke", "--yes", login_role.role)
    assert code == 0
    member = db.execute("SELECT pg_has_role(%s, 'postkeep_tenant', 'MEMBER')",
                        (login_role.role,)).fetchone()
    assert member == (False,)
    code, _, err = run("revoke", login_role.role)
    assert code == 1 and "is not a tenant role" in err


def test_suppression_lists_show_a_tenant_only_its_own(
        db: psycopg.Connection, config: config_mod.Config, login_role: Login,
        make_org: Callable[..., TestOrg]) -> None:
    """Issue 17: the suppression list is readable by its organisation's dashboard
    and by nobody else's; the soft-bounce counts are not granted at all."""
    from postkeep.storage.metadata import suppression

    mine, theirs = make_org(), make_org()
    shared = f"{uuid.uuid4().hex[:8]}@shared.example"
    suppression.suppress(db, mine.id, shared, "unsubscribe", "test")
    suppression.suppress(db, theirs.id, shared, "complaint", "test")
    suppression.suppress(db, theirs.id, f"only-{shared}", "hard_bounce", "test")
    db.execute("INSERT INTO suppression_soft_bounces (org_id, address, bounce_at)"
               " VALUES (%s, %s, ARRAY[now()])", (theirs.id, shared))
    tenants.grant_role(db, mine.id, login_role.role)
    # An administrator's mistake: the side table granted directly.
    db.execute(f'GRANT SELECT ON suppression_soft_bounces TO "{login_role.role}"')
    with connect_as(config, login_role) as conn:
        rows = conn.execute("SELECT org_id, address, reason FROM suppressions").fetchall()
        assert rows == [(mine.id, shared, "unsubscribe")]
        assert conn.execute("SELECT count(*) FROM suppression_soft_bounces").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM suppressions")
