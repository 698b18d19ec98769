"""`postkeep postfix apply|remove|check` on a host's own main.cf (issue 16).

Each test builds a Postfix configuration directory in a temp dir and runs the
real CLI, which runs the real `postconf -c DIR`: no service is needed.  Three
starting points: Debian 12's stock main.cf (as the postfix package's postinst
writes it), a host with RBL checks and an OpenDKIM milter, and a host that
already carries postkeep's bundle.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from postkeep.cli.postfix import (
    QueuedMessage,
    merge_milters,
    merge_restrictions,
    parse_age,
    parse_postqueue_json,
    policy_position,
    too_old,
)

pytestmark = pytest.mark.unit

MILTER = "inet:127.0.0.1:18891"
POLICY_ADDRESS = "inet:127.0.0.1:10040"
POLICY = f"check_policy_service {POLICY_ADDRESS}"
OPENDKIM = "inet:127.0.0.1:8891"
RBL_RESTRICTIONS = ("permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination,"
                    " reject_rbl_client zen.spamhaus.org")
MERGED = ("restrictions", "smtpd_recipient_restrictions", "smtpd_data_restrictions",
          "smtpd_end_of_data_restrictions", "smtpd_milters", "non_smtpd_milters",
          "transport_maps", "relay_domains", "smtpd_relay_restrictions", "myhostname")


def _postkeep(toml: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("postkeep")
    return subprocess.run([str(exe), "--config", str(toml), *args],
                          capture_output=True, text=True, check=False)


def _explicit(pfdir: Path, *names: str) -> dict[str, str]:
    """main.cf's own values (postconf -n): what remove must give back exactly."""
    out = subprocess.run(["postconf", "-c", str(pfdir), "-n", *names],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split(" = ", 1) if " = " in line else (line.removesuffix(" ="), "")
                for line in out.splitlines())


def _debian_stock(pfdir: Path) -> None:
    """main.cf and master.cf as Debian 12's postfix postinst creates them."""
    pfdir.mkdir()
    shutil.copyfile("/usr/share/postfix/main.cf.debian", pfdir / "main.cf")
    with (pfdir / "main.cf").open("a") as f:
        f.write(Path("/usr/share/postfix/main.cf.tls").read_text())
    subprocess.run(["postconf", "-c", str(pfdir), "-e", "smtpd_relay_restrictions="
                    "permit_mynetworks permit_sasl_authenticated defer_unauth_destination"],
                   check=True)
    # then what its debconf answers add ("Internet Site"; this host's name)
    with (pfdir / "main.cf").open("a") as f:
        f.write("myhostname = mail.example.test\n"
                "alias_maps = hash:/etc/aliases\n"
                "alias_database = hash:/etc/aliases\n"
                "mydestination = $myhostname, mail.example.test, localhost.localdomain, ,"
                " localhost\n"
                "relayhost = \n"
                "mynetworks = 127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128\n"
                "mailbox_size_limit = 0\n"
                "recipient_delimiter = +\n"
                "inet_interfaces = all\n"
                "inet_protocols = all\n")
    shutil.copyfile("/usr/share/postfix/master.cf.dist", pfdir / "master.cf")


def _rbl_opendkim_host(pfdir: Path) -> None:
    """A host with RBL checks in the recipient list, OpenDKIM, its own transports."""
    _debian_stock(pfdir)
    with (pfdir / "main.cf").open("a") as f:
        f.write(f"smtpd_recipient_restrictions = {RBL_RESTRICTIONS}\n"
                "smtpd_data_restrictions = reject_unauth_pipelining\n"
                f"smtpd_milters = {OPENDKIM}\n"
                f"non_smtpd_milters = $smtpd_milters\n"
                "transport_maps = hash:/etc/postfix/transport\n"
                "relay_domains = example.org\n")


@pytest.fixture()
def toml(tmp_path: Path) -> Path:
    # config_directory points elsewhere on purpose: every command here names
    # its directory with --config-directory, which must win everywhere.
    path = tmp_path / "postkeep.toml"
    path.write_text(f'[postfix]\nconfig_directory = "{tmp_path / "elsewhere"}"\n'
                    f'milter_address = "{MILTER}"\npolicy_address = "{POLICY_ADDRESS}"\n')
    return path


def _apply(toml: Path, pfdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    done = _postkeep(toml, "postfix", "apply", "--config-directory", str(pfdir), *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _remove(toml: Path, pfdir: Path) -> None:
    done = _postkeep(toml, "postfix", "remove", "--yes", "--config-directory", str(pfdir))
    assert done.returncode == 0, done.stdout + done.stderr


def test_policy_position_rules() -> None:
    # before the first entry that may permit, after a relay decision ahead of it
    assert policy_position([]) == 0
    assert policy_position(["permit_mynetworks", "reject_unauth_destination"]) == 0
    assert policy_position(["reject_non_fqdn_recipient", "reject_unauth_destination",
                            "reject_rbl_client zen.spamhaus.org"]) == 2
    assert policy_position(["reject_non_fqdn_recipient", "check_client_access hash:/x"]) == 1
    assert merge_restrictions("reject_unauth_pipelining", POLICY) == (
        f"reject_unauth_pipelining, {POLICY}")
    assert merge_milters(f"{MILTER}, {OPENDKIM}", MILTER) == f"{OPENDKIM}, {MILTER}"


def test_debian_stock_main_cf(tmp_path: Path, toml: Path) -> None:
    pfdir = tmp_path / "pf"
    _debian_stock(pfdir)
    original = (pfdir / "main.cf").read_bytes()
    _apply(toml, pfdir)
    values = _explicit(pfdir, *MERGED)
    assert values["smtpd_recipient_restrictions"] == POLICY
    assert values["smtpd_data_restrictions"] == POLICY
    assert values["smtpd_end_of_data_restrictions"] == POLICY
    assert values["smtpd_milters"] == values["non_smtpd_milters"] == MILTER
    # the host's relay decision is untouched, and the maps are this directory's
    assert values["smtpd_relay_restrictions"] == (
        "permit_mynetworks permit_sasl_authenticated defer_unauth_destination")
    assert values["transport_maps"] == (
        f"pcre:{pfdir}/postkeep-transport.pcre, texthash:{pfdir}/postkeep-inbound-transport")
    # the two tables `postkeep domain set-inbound` writes, created empty
    assert values["relay_domains"] == f"texthash:{pfdir}/postkeep-inbound-domains"
    for name in ("postkeep-inbound-domains", "postkeep-inbound-transport"):
        assert (pfdir / name).read_text() == ""
    assert (pfdir / "postkeep-transport.pcre").is_file()
    backups = list((pfdir / "postkeep-backup").glob("*/main.cf"))
    assert [b.read_bytes() for b in backups] == [original]
    check = _postkeep(toml, "postfix", "check", "--config-directory", str(pfdir), "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["match"] is True
    _remove(toml, pfdir)
    assert (pfdir / "main.cf").read_bytes() == original
    assert not (pfdir / "postkeep-transport.pcre").exists()
    assert not (pfdir / "postkeep-inbound-domains").exists()  # created empty, still empty


def test_rbl_and_opendkim_host(tmp_path: Path, toml: Path) -> None:
    pfdir = tmp_path / "pf"
    _rbl_opendkim_host(pfdir)
    before = _explicit(pfdir, *MERGED)
    _apply(toml, pfdir)
    values = _explicit(pfdir, *MERGED)
    # policy before the permits (a SASL submission is counted), RBL kept
    assert values["smtpd_recipient_restrictions"] == (
        f"{POLICY}, permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination,"
        " reject_rbl_client zen.spamhaus.org")
    assert values["smtpd_data_restrictions"] == f"reject_unauth_pipelining, {POLICY}"
    assert values["smtpd_end_of_data_restrictions"] == POLICY
    # OpenDKIM kept, postkeep last; $smtpd_milters expanded to the host's list
    assert values["smtpd_milters"] == f"{OPENDKIM}, {MILTER}"
    assert values["non_smtpd_milters"] == f"{OPENDKIM}, {MILTER}"
    assert values["transport_maps"] == (
        f"pcre:{pfdir}/postkeep-transport.pcre, texthash:{pfdir}/postkeep-inbound-transport,"
        " hash:/etc/postfix/transport")
    assert values["relay_domains"] == f"texthash:{pfdir}/postkeep-inbound-domains, example.org"
    # an unrelated edit after apply survives remove; the host's values come back
    subprocess.run(["postconf", "-c", str(pfdir), "-e", "myhostname = edited.example"],
                   check=True)
    _remove(toml, pfdir)
    after = _explicit(pfdir, *MERGED)
    assert after == {**before, "myhostname": "edited.example"}
    assert after["non_smtpd_milters"] == "$smtpd_milters"  # byte-exact, not expanded


def test_remove_keeps_a_milter_added_after_apply(tmp_path: Path, toml: Path) -> None:
    pfdir = tmp_path / "pf"
    _rbl_opendkim_host(pfdir)
    _apply(toml, pfdir)
    subprocess.run(["postconf", "-c", str(pfdir), "-e",
                    f"smtpd_milters = {OPENDKIM}, {MILTER}, unix:/run/clamav.sock"], check=True)
    _remove(toml, pfdir)
    assert _explicit(pfdir, "smtpd_milters")["smtpd_milters"] == (
        f"{OPENDKIM}, unix:/run/clamav.sock")


def test_already_carrying_the_bundle_is_idempotent(tmp_path: Path, toml: Path) -> None:
    pfdir = tmp_path / "pf"
    _rbl_opendkim_host(pfdir)
    _apply(toml, pfdir)
    applied = (pfdir / "main.cf").read_bytes()
    backups = sorted((pfdir / "postkeep-backup").iterdir())
    again = _apply(toml, pfdir)
    assert "already set" in again.stdout
    assert (pfdir / "main.cf").read_bytes() == applied
    assert sorted((pfdir / "postkeep-backup").iterdir()) == backups


def test_postkeep_milter_not_last_is_moved_last(tmp_path: Path, toml: Path) -> None:
    pfdir = tmp_path / "pf"
    _debian_stock(pfdir)
    with (pfdir / "main.cf").open("a") as f:
        f.write(f"smtpd_milters = {MILTER}, {OPENDKIM}\n")
    _apply(toml, pfdir)
    assert _explicit(pfdir, "smtpd_milters")["smtpd_milters"] == f"{OPENDKIM}, {MILTER}"
    _remove(toml, pfdir)
    assert _explicit(pfdir, "smtpd_milters")["smtpd_milters"] == f"{MILTER}, {OPENDKIM}"


def test_dry_run_prints_the_diff_and_changes_nothing(tmp_path: Path, toml: Path) -> None:
    pfdir = tmp_path / "pf"
    _rbl_opendkim_host(pfdir)
    original = sorted((p.name, p.read_bytes()) for p in pfdir.iterdir())
    done = _apply(toml, pfdir, "--dry-run")
    assert f"--- {pfdir}/main.cf\n" in done.stdout
    assert f"-smtpd_milters = {OPENDKIM}\n" in done.stdout
    assert f"+smtpd_milters = {OPENDKIM}, {MILTER}\n" in done.stdout
    assert f"+++ {pfdir}/postkeep-transport.pcre (new)\n" in done.stdout
    assert sorted((p.name, p.read_bytes()) for p in pfdir.iterdir()) == original


def test_check_honours_config_directory(tmp_path: Path, toml: Path) -> None:
    """Applied to A, copied to B: B's map paths name A's tables, so check on B fails."""
    a, b = tmp_path / "a", tmp_path / "b"
    _debian_stock(a)
    _apply(toml, a)
    b.mkdir()
    for name in ("main.cf", "master.cf", "postkeep-transport.pcre",
                 "postkeep-command-filter.pcre", "postkeep-system-senders",
                 "postkeep-inbound-domains", "postkeep-inbound-transport"):
        shutil.copyfile(a / name, b / name)
    check = _postkeep(toml, "postfix", "check", "--config-directory", str(b), "--json")
    assert check.returncode == 1, check.stdout
    report = json.loads(check.stdout)
    assert report["match"] is False
    assert {d["name"] for d in report["differences"]} == {
        "smtpd_command_filter", "transport_maps", "sender_dependent_default_transport_maps",
        "relay_domains"}
    wants = {d["name"]: d["want"] for d in report["differences"]}
    assert wants["transport_maps"] == (
        f"pcre:{b}/postkeep-transport.pcre, texthash:{b}/postkeep-inbound-transport, ...")


def test_inbound_tables_kept_when_filled_and_checked(tmp_path: Path, toml: Path) -> None:
    """set-inbound's tables: apply never overwrites one, remove keeps a filled
    one, check names a missing one."""
    pfdir = tmp_path / "pf"
    _debian_stock(pfdir)
    (pfdir / "postkeep-inbound-transport").write_text("example.com\tdiscard:\n")
    _apply(toml, pfdir)
    assert (pfdir / "postkeep-inbound-transport").read_text() == "example.com\tdiscard:\n"
    (pfdir / "postkeep-inbound-domains").write_text("example.com\tOK\n")  # set-inbound
    assert "already set" in _apply(toml, pfdir).stdout
    (pfdir / "postkeep-inbound-transport").unlink()
    check = _postkeep(toml, "postfix", "check", "--config-directory", str(pfdir), "--json")
    assert check.returncode == 1
    assert json.loads(check.stdout)["stale_maps"] == [f"{pfdir}/postkeep-inbound-transport"]
    _apply(toml, pfdir)  # created again, empty
    _remove(toml, pfdir)
    assert (pfdir / "postkeep-inbound-domains").read_text() == "example.com\tOK\n"
    assert not (pfdir / "postkeep-inbound-transport").exists()
    assert "relay_domains" not in _explicit(pfdir, "relay_domains")


def test_expire_queue_picks_old_held_files_only() -> None:
    out = "\n".join([
        '{"queue_name": "hold", "queue_id": "A1", "arrival_time": 100, "recipients":'
        ' [{"address": "a@x.test"}, {"address": "b@x.test", "delay_reason": "held"}]}',
        '{"queue_name": "deferred", "queue_id": "B2", "arrival_time": 100, "recipients": []}',
        '{"queue_name": "hold", "queue_id": "C3", "arrival_time": 100, "recipients": []}',
        ""])
    queued = parse_postqueue_json(out)
    assert queued[0] == QueuedMessage("hold", "A1", 100, ("a@x.test", "b@x.test"))
    # deferred is Postfix's own to expire (maximal_queue_lifetime); C3 is young
    ages = {"A1": 3601.0, "B2": 99999.0, "C3": 3599.0}
    assert [m.queue_id for m in too_old(queued, ages, parse_age("1h"))] == ["A1"]
    assert parse_age("90s") == 90 and parse_age("2d") == 172800
