"""DKIM keys in PostgreSQL: sealed at rest, rotated by time, driven from the CLI.

Against the stack's database: a key stored and read back signs mail that
dkimpy verifies with the record `postkeep dkim dns` prints; a ciphertext moved
to another selector or opened with another master key is refused; the active
set follows stage -> activate -> grace -> retired at injected times; the
change marker moves on every write, so a running milter notices.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import dkim
import psycopg
import pytest
from click.testing import CliRunner, Result
from conftest import StackEnv, TestOrg, act_as, dashboard_role

from postkeep import config
from postkeep.config import ConfigError
from postkeep.milter import dkim as pkdkim
from postkeep.storage.metadata import directory, dkim_keys
from postkeep.storage.metadata.db import BackendError, Database
from postkeep.storage.metadata.dkim_keys import DkimKeyError, MasterKey

pytestmark = pytest.mark.stack

MakeOrg = Callable[..., TestOrg]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MESSAGE = (
    b"From: Ops <ops@{domain}>\r\nTo: someone@example.net\r\nSubject: rotation\r\n"
    b"Date: Sun, 01 Mar 2026 12:00:00 +0000\r\nMessage-ID: <r@x>\r\n\r\nbody \t text\r\n"
)


@pytest.fixture(scope="module")
def master() -> MasterKey:
    return MasterKey.from_bytes(os.urandom(32))


def _dnsfunc(keys: list[dkim_keys.DkimKey]) -> Callable[..., bytes | None]:
    """A resolver stub serving the TXT records of KEYS (strings concatenated)."""
    records = {
        f"{k.selector}._domainkey.{k.domain}.".encode(): "".join(
            dkim_keys.dns_txt_strings(k.txt_value)
        ).encode()
        for k in keys
    }

    def get_txt(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return get_txt


def _sign_and_verify(key: dkim_keys.SigningKey, domain: str, dns: list[dkim_keys.DkimKey]) -> bool:
    message = MESSAGE.replace(b"{domain}", domain.encode())
    sig = pkdkim.sign_message(
        message, key.private_key, key.domain, key.selector, key.algorithm, int(T0.timestamp())
    )
    return bool(dkim.verify(sig + message, dnsfunc=_dnsfunc(dns)))


def test_stored_key_round_trips_and_signs_verifiably(
    db: psycopg.Connection, make_org: MakeOrg, master: MasterKey
) -> None:
    org = make_org()
    rsa = dkim_keys.create_key(db, master, org.domain, "s1", "rsa-sha256", active_from=T0)
    ed = dkim_keys.create_key(db, master, org.domain, "e1", "ed25519-sha256", active_from=T0)
    assert (rsa.org_id, ed.org_id) == (org.id, org.id)
    ring = dkim_keys.load_keyring(db, master, T0)
    signing = ring.signing_keys(org.domain.upper(), T0 + timedelta(seconds=1))
    assert [(k.selector, k.algorithm) for k in signing] == [
        ("s1", "rsa-sha256"), ("e1", "ed25519-sha256")
    ]
    assert dkim_keys.public_key_bytes(signing[0].private_key) == rsa.public_key
    assert dkim_keys.public_key_bytes(signing[1].private_key) == ed.public_key
    for key in signing:
        assert _sign_and_verify(key, org.domain, [rsa, ed])
    # nothing in the row or its repr carries the private key in clear
    assert "PRIVATE" not in repr(rsa) and "private_key=" not in repr(signing[0])


def test_active_keys_reads_one_domain_at_a_time(
    db: psycopg.Connection, make_org: MakeOrg, master: MasterKey
) -> None:
    org = make_org()
    dkim_keys.create_key(db, master, org.domain, "old", active_from=T0 - timedelta(days=1))
    dkim_keys.create_key(db, master, org.domain, "new", active_from=T0)
    dkim_keys.create_key(db, master, org.domain, "later")
    assert [k.selector for k in dkim_keys.active_keys(db, master, org.domain, T0)] == ["new"]
    earlier = T0 - timedelta(hours=1)
    assert [k.selector for k in dkim_keys.active_keys(db, master, org.domain, earlier)] == ["old"]


def test_row_level_security_shows_a_dashboard_role_only_its_organisation(
    db: psycopg.Connection, make_org: MakeOrg, master: MasterKey
) -> None:
    mine, theirs = make_org(), make_org()
    dkim_keys.create_key(db, master, mine.domain, "s1", "ed25519-sha256")
    dkim_keys.create_key(db, master, theirs.domain, "s1", "ed25519-sha256")
    with dashboard_role(db, "dkim_keys") as role, db.transaction():
        act_as(db, role, mine.id)
        seen = db.execute(
            "SELECT domain FROM dkim_keys WHERE domain IN (%s, %s)",
            (mine.domain, theirs.domain),
        ).fetchall()
    assert seen == [(mine.domain,)]


def test_ciphertext_moved_to_another_selector_does_not_decrypt(
    db: psycopg.Connection, make_org: MakeOrg, master: MasterKey
) -> None:
    org = make_org()
    dkim_keys.create_key(db, master, org.domain, "a", active_from=T0)
    dkim_keys.create_key(db, master, org.domain, "b", active_from=T0 - timedelta(days=1))
    db.execute(
        "UPDATE dkim_keys b SET private_key_enc = a.private_key_enc, nonce = a.nonce"
        " FROM dkim_keys a WHERE a.domain = b.domain AND a.selector = 'a'"
        " AND b.selector = 'b' AND b.domain = %s",
        (org.domain,),
    )
    db.execute("UPDATE dkim_keys SET retire_after = %s WHERE domain = %s AND selector = 'a'",
               (T0, org.domain))
    ring = dkim_keys.load_keyring(db, master, T0 - timedelta(hours=1))
    with pytest.raises(DkimKeyError, match=r"b\._domainkey\..* does not decrypt"):
        ring.signing_keys(org.domain, T0 + timedelta(hours=1))


def test_another_master_key_is_refused_naming_both_ids(
    db: psycopg.Connection, make_org: MakeOrg, master: MasterKey
) -> None:
    org = make_org()
    dkim_keys.create_key(db, master, org.domain, "s1", active_from=T0)
    other = MasterKey.from_bytes(os.urandom(32))
    ring = dkim_keys.load_keyring(db, other, T0)
    with pytest.raises(DkimKeyError) as info:
        ring.signing_keys(org.domain, T0)
    assert master.key_id in str(info.value) and other.key_id in str(info.value)


def test_master_key_from_file_mode_checked_and_length_named(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        config.parse({"dkim": {"master_key_file": str(path)}})
    assert str(info.value).startswith(f"dkim.master_key_file = {str(path)!r}")
    assert "mode 644" in str(info.value)
    path.chmod(0o600)
    cfg = config.parse({"dkim": {"master_key_file": str(path)}})
    assert len(dkim_keys.load_master_key(cfg.dkim).key) == 32
    path.write_text(base64.b64encode(b"too short").decode())
    with pytest.raises(ConfigError, match=r"master_key_file = .*decodes to 9 bytes"):
        dkim_keys.load_master_key(config.parse({"dkim": {"master_key_file": str(path)}}).dkim)
    with pytest.raises(ConfigError, match=r"dkim\.master_key: not set"):
        dkim_keys.load_master_key(config.DkimConfig())


def test_rotation_states_follow_time(
    db: psycopg.Connection, make_org: MakeOrg, master: MasterKey
) -> None:
    org = make_org()
    d = org.domain
    dkim_keys.create_key(db, master, d, "old")
    dkim_keys.create_key(db, master, d, "new")
    t1 = T0 + timedelta(days=30)

    def states(at: datetime) -> dict[str, str]:
        return {k.selector: s for k, s in dkim_keys.key_states(dkim_keys.list_keys(db, d), at)}

    def signing(at: datetime) -> list[str]:
        ring = dkim_keys.load_keyring(db, master, T0 - timedelta(days=1))
        return [k.selector for k in ring.signing_keys(d, at)]

    assert states(T0) == {"old": "staged", "new": "staged"} and signing(T0) == []
    first = dkim_keys.activate(db, d, "old", T0, timedelta(days=7))
    assert first.superseded == []
    second = dkim_keys.activate(db, d, "new", t1, timedelta(days=7))
    assert [k.selector for k in second.superseded] == ["old"]
    assert second.superseded[0].retire_after == t1 + timedelta(days=7)

    assert states(T0 - timedelta(seconds=1)) == {"old": "staged", "new": "staged"}
    assert states(T0) == {"old": "active", "new": "staged"} and signing(T0) == ["old"]
    assert signing(t1 - timedelta(seconds=1)) == ["old"]
    assert states(t1) == {"old": "grace", "new": "active"} and signing(t1) == ["new"]
    during = t1 + timedelta(days=6)
    assert states(during) == {"old": "grace", "new": "active"}
    published = [k.selector for k in dkim_keys.published(dkim_keys.list_keys(db, d), during)]
    assert sorted(published) == ["new", "old"]
    after = t1 + timedelta(days=7)
    assert states(after) == {"old": "retired", "new": "active"}
    assert [k.selector for k in dkim_keys.published(dkim_keys.list_keys(db, d), after)] == ["new"]

    # Retiring the new key falls back to no key (old one is retired too).
    dkim_keys.retire(db, d, "new", after + timedelta(days=1))
    assert signing(after + timedelta(days=2)) == []


def test_store_refuses_unknown_domain_and_duplicate_selector(
    db: psycopg.Connection, make_org: MakeOrg, master: MasterKey
) -> None:
    org = make_org()
    with pytest.raises(DkimKeyError, match=r"unknown domain 'nowhere\.example\.test'"):
        dkim_keys.create_key(db, master, "nowhere.example.test", "s1")
    dkim_keys.create_key(db, master, org.domain, "s1", "ed25519-sha256")
    duplicate = re.escape(f"selector 's1' already exists for {org.domain}")
    with pytest.raises(DkimKeyError, match=duplicate):
        dkim_keys.create_key(db, master, org.domain, "s1", "ed25519-sha256")


def test_change_marker_moves_on_every_write(
    db: psycopg.Connection, make_org: MakeOrg, master: MasterKey
) -> None:
    org = make_org()
    m0 = dkim_keys.change_marker(db)
    dkim_keys.create_key(db, master, org.domain, "s1", "ed25519-sha256")
    m1 = dkim_keys.change_marker(db)
    dkim_keys.activate(db, org.domain, "s1", T0, timedelta(days=1))
    m2 = dkim_keys.change_marker(db)
    db.execute("DELETE FROM organisations WHERE id = %s", (org.id,))  # cascades to keys
    m3 = dkim_keys.change_marker(db)
    assert m0 < m1 < m2 < m3
    assert dkim_keys.list_keys(db, org.domain) == []


def test_key_ring_source_reloads_when_keys_change_and_survives_an_outage(
    db: psycopg.Connection, make_org: MakeOrg, master: MasterKey, config: config.Config
) -> None:
    org = make_org()
    dkim_keys.create_key(db, master, org.domain, "s1", "ed25519-sha256", active_from=T0)
    clock = [0.0]
    database = Database(config.postgres, min_size=1)
    try:
        source = dkim_keys.KeyRingSource(database, master, poll_seconds=5, clock=lambda: clock[0])
        ring = source.current(T0)
        assert [k.selector for k in ring.signing_keys(org.domain, T0)] == ["s1"]
        dkim_keys.create_key(db, master, org.domain, "s2", "ed25519-sha256")
        dkim_keys.activate(db, org.domain, "s2", T0 + timedelta(hours=1), timedelta(days=1))
        clock[0] = 4.0
        assert source.current(T0) is ring  # within the poll interval: no query
        clock[0] = 5.0
        fresh = source.current(T0)
        assert fresh is not ring
        assert [k.selector for k in fresh.signing_keys(org.domain, T0 + timedelta(hours=2))] == [
            "s2"
        ]
        clock[0] = 6.0
        source.invalidate()
        assert source.current(T0) is fresh  # checked again, nothing changed
    finally:
        database.close()
    # With the pool closed and PostgreSQL unreachable, the last ring keeps serving.
    broken = Database(dataclasses.replace(config.postgres, port=1, connect_timeout_seconds=1))
    source = dkim_keys.KeyRingSource(broken, master, clock=lambda: clock[0])
    with pytest.raises(BackendError):
        source.current(T0)
    source._ring = fresh  # as if loaded before the outage
    clock[0] = 100.0
    assert source.current(T0) is fresh
    broken.close()


def test_missing_key_policy_defaults_to_tempfail(db: psycopg.Connection, make_org: MakeOrg) -> None:
    org = make_org()  # make_org sets 'unsigned'; a plain new organisation has the default
    oid = directory.add_organisation(db, f"{org.name}-plain", "free")
    assert dkim_keys.missing_key_policy(db, oid) == "tempfail"
    # Set on the organisation still at the default (make_org's is 'unsigned'
    # already, so reading 'unsigned' back there would prove nothing), both ways.
    dkim_keys.set_missing_key_policy(db, oid, "unsigned")
    assert dkim_keys.missing_key_policy(db, oid) == "unsigned"
    dkim_keys.set_missing_key_policy(db, org.id, "tempfail")
    assert dkim_keys.missing_key_policy(db, org.id) == "tempfail"
    with pytest.raises(DkimKeyError, match="'drop'"):
        dkim_keys.set_missing_key_policy(db, oid, "drop")
    assert dkim_keys.missing_key_policy(db, oid) == "unsigned"  # a refusal changes nothing


# --- the CLI ------------------------------------------------------------------------


@pytest.fixture
def run(root: click.Group, stack_env: StackEnv,
        tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Result]:
    """`postkeep --config <stack> ARGS` with a master key in the environment."""
    env = {"POSTKEEP_DKIM_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}

    # The stack's config names a master key file; "no master key" needs a
    # copy of it without the [dkim] section.
    text = Path(stack_env.config_path).read_text()
    bare = tmp_path_factory.mktemp("cfg") / "postkeep.toml"
    before, _, after = text.partition("\n[dkim]\n")
    keep = after[after.index("\n[return_path]\n"):] if "\n[return_path]\n" in after else ""
    bare.write_text(before + "\n" + keep + "\n")  # every section but [dkim]
    bare.chmod(0o600)

    def _run(*args: str, master: bool = True) -> Result:
        if master:
            return CliRunner().invoke(root, ["--config", stack_env.config_path, *args],
                                      env=env)
        return CliRunner().invoke(root, ["--config", str(bare), *args],
                                  env={"POSTKEEP_DKIM_MASTER_KEY": ""})

    return _run


def _ok(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.stderr}{result.exception!r}"
    return result


def test_cli_keygen_list_dns_activate(run: Callable[..., Result], make_org: MakeOrg) -> None:
    d = make_org().domain
    out = _ok(run("dkim", "keygen", d, "--selector", "s1")).stdout
    assert out.startswith(f's1._domainkey.{d}. IN TXT ( "v=DKIM1; k=rsa; p=MIIB')
    assert "staged" in _ok(run("dkim", "keygen", d, "--selector", "e1", "--algorithm",
                               "ed25519")).stderr
    listed = json.loads(_ok(run("dkim", "list", "--domain", d, "--json")).stdout)
    assert {(k["selector"], k["state"]) for k in listed} == {("s1", "staged"), ("e1", "staged")}
    # the printed record is the one dkimpy needs to verify a signature
    dns = _ok(run("dkim", "dns", d)).stdout.splitlines()
    assert sorted(line.split(".", 1)[0] for line in dns) == ["e1", "s1"]

    _ok(run("dkim", "activate", d, "s1", "--at", "now"))
    _ok(run("dkim", "keygen", d, "--selector", "s2"))
    out = _ok(run("dkim", "activate", d, "s2", "--grace", "2d")).stdout
    assert f"{d} s2 (rsa-sha256): active from" in out
    assert f"{d} s1 (rsa-sha256): replaced at" in out and "published until" in out
    table = _ok(run("dkim", "list", "--domain", d)).stdout
    states = {line.split()[1]: line.split()[3] for line in table.splitlines()[1:]}
    assert states == {"s1": "grace", "s2": "active", "e1": "staged"}
    assert len(_ok(run("dkim", "dns", d)).stdout.splitlines()) == 3


def test_cli_refusals_name_the_problem(run: Callable[..., Result], make_org: MakeOrg) -> None:
    d = make_org().domain
    r = run("dkim", "keygen", "nowhere.example.test", "--selector", "s1")
    assert r.exit_code == 1 and "unknown domain 'nowhere.example.test'" in r.stderr
    _ok(run("dkim", "keygen", d, "--selector", "s1", "--algorithm", "ed25519"))
    r = run("dkim", "keygen", d, "--selector", "s1", "--algorithm", "ed25519")
    assert r.exit_code == 1 and "selector 's1' already exists" in r.stderr
    r = run("dkim", "activate", d, "s1", "--at", "tomorrow-ish")
    assert r.exit_code == 1 and "--at 'tomorrow-ish': expected 'now' or ISO 8601" in r.stderr
    r = run("dkim", "activate", d, "nope")
    assert r.exit_code == 1 and "no key with selector 'nope'" in r.stderr
    r = run("dkim", "keygen", d, "--selector", "under_score")
    assert r.exit_code == 1 and "selector 'under_score'" in r.stderr
    r = run("dkim", "dns", make_org().domain)
    assert r.exit_code == 1 and "no key to publish" in r.stderr
    r = run("dkim", "keygen", d, "--selector", "s9", master=False)
    assert isinstance(r.exception, ConfigError) and "dkim.master_key: not set" in str(r.exception)


def test_cli_failure_exits_nonzero_through_the_console_script(
    stack_env: StackEnv, tmp_path: Path
) -> None:
    postkeep = Path(sys.executable).with_name("postkeep")
    r = subprocess.run(
        [str(postkeep), "--config", stack_env.config_path, "dkim", "list", "--domain",
         "nowhere.example.test"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert r.returncode == 1 and "unknown domain 'nowhere.example.test'" in r.stderr


@pytest.mark.parametrize("args", [[], ["keygen"], ["list"], ["dns"], ["activate"], ["retire"],
                                  ["missing-key"]])
def test_every_dkim_command_has_help(root: click.Group, args: list[str]) -> None:
    r = CliRunner().invoke(root, ["dkim", *args, "--help"])
    assert r.exit_code == 0 and "Usage: " in r.stdout
