"""The system mail lane's master.cf entry in `postkeep postfix apply|remove|check`.

Each test builds a Postfix configuration directory in a temp dir (Debian 12's
stock main.cf and master.cf) and runs the real CLI, which runs the real
`postconf -c DIR -M`: no service is needed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from postkeep.cli.postfix import (
    BUNDLE_CANDIDATES,
    BundleError,
    parse_master,
    parse_services,
    system_senders_table,
)

pytestmark = pytest.mark.unit

KEY = "postkeep-system/unix"
BIND = "192.0.2.25"


def _postkeep(toml: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("postkeep")
    return subprocess.run([str(exe), "--config", str(toml), *args],
                          capture_output=True, text=True, check=False)


def _ok(toml: Path, pfdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = _postkeep(toml, "postfix", *args, "--config-directory", str(pfdir))
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _entries(pfdir: Path) -> dict[str, str]:
    out = subprocess.run(["postconf", "-c", str(pfdir), "-M"], capture_output=True,
                         text=True, check=True).stdout
    return parse_master(out)


def _lane(pfdir: Path) -> dict[str, str]:
    """The lane's -o overrides as postconf -P reports them."""
    out = subprocess.run(["postconf", "-c", str(pfdir), "-P", f"{KEY}/"], capture_output=True,
                         text=True, check=True).stdout
    return dict(line.removeprefix(f"{KEY}/").split(" = ", 1) if " = " in line
                else (line.removeprefix(f"{KEY}/").removesuffix(" ="), "")
                for line in out.splitlines())


@pytest.fixture()
def pfdir(tmp_path: Path) -> Path:
    path = tmp_path / "pf"
    path.mkdir()
    shutil.copyfile("/usr/share/postfix/main.cf.debian", path / "main.cf")
    shutil.copyfile("/usr/share/postfix/master.cf.dist", path / "master.cf")
    return path


@pytest.fixture()
def toml(tmp_path: Path) -> Path:
    key = tmp_path / "system.pem"
    key.write_text("unused here\n")
    key.chmod(0o600)
    path = tmp_path / "postkeep.toml"
    path.write_text(f'[postfix]\nconfig_directory = "{tmp_path / "elsewhere"}"\n'
                    f'system_bind_address = "{BIND}"\nsystem_helo_name = "out.example.test"\n'
                    '[dkim]\nsystem_domains = ["Sys.Example.test", "codes.example.test"]\n'
                    f'system_selector = "sys"\nsystem_key_file = "{key}"\n')
    path.chmod(0o600)
    return path


def test_bundle_entry_parses_and_renders() -> None:
    text = BUNDLE_CANDIDATES[0].with_name("master.cf").read_text()
    [(key, entry)] = parse_services(text, {"system_bind_address": BIND,
                                           "system_helo_name": "$myhostname"})
    assert key == KEY
    assert entry.startswith("postkeep-system unix - - n - 20 smtp ")
    assert f"-o smtp_bind_address={BIND} " in entry
    assert "-o smtp_helo_name=$myhostname" in entry
    # Postfix's own {...} syntax in syslog_name is not a placeholder
    assert "-o syslog_name=${multi_instance_name?{$multi_instance_name}:{postfix}}/" in entry


@pytest.mark.parametrize(("text", "error"), [
    ("  -o a=b\n", "continuation line before any service"),
    ("postkeep-system unix - - n -\n", "expected a master.cf service entry"),
    ("a unix - - n - - smtp\na unix - - n - - smtp\n", "a/unix is given twice"),
])
def test_parse_services_refuses_bad_entries(text: str, error: str) -> None:
    with pytest.raises(BundleError, match=error):
        parse_services(text, {})


def test_senders_table_names_each_domain() -> None:
    assert system_senders_table(["Sys.Example.", "b.example"]) == (
        "@sys.example\tpostkeep-system\n@b.example\tpostkeep-system\n")
    assert system_senders_table([]) == ""


def test_apply_adds_the_lane_once_and_remove_deletes_it_exactly(pfdir: Path, toml: Path) -> None:
    master, main = (pfdir / "master.cf").read_bytes(), (pfdir / "main.cf").read_bytes()
    done = _ok(toml, pfdir, "apply")
    assert f"master.cf {KEY}: <none> -> " in done.stdout
    entries = _entries(pfdir)
    assert entries[KEY].startswith("postkeep-system unix - - n - 20 smtp")
    lane = _lane(pfdir)
    assert lane["smtp_bind_address"] == BIND
    assert lane["smtp_helo_name"] == "out.example.test"
    # every other service is as it was
    assert {k: v for k, v in entries.items() if k != KEY} == _entries_of(master)
    # the table routing system senders to the lane
    assert (pfdir / "postkeep-system-senders").read_text().endswith(
        "@sys.example.test\tpostkeep-system\n@codes.example.test\tpostkeep-system\n\n")
    state = json.loads((pfdir / "postkeep-backup" / "state.json").read_text())
    assert state["services"] == {KEY: {"before": None, "applied": entries[KEY]}}
    # a second apply changes nothing (no new backup either)
    applied = (pfdir / "master.cf").read_bytes()
    backups = sorted((pfdir / "postkeep-backup").iterdir())
    assert "already set" in _ok(toml, pfdir, "apply").stdout
    assert (pfdir / "master.cf").read_bytes() == applied
    assert sorted((pfdir / "postkeep-backup").iterdir()) == backups
    check = _postkeep(toml, "postfix", "check", "--config-directory", str(pfdir), "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["services"] == []
    _ok(toml, pfdir, "remove", "--yes")
    assert (pfdir / "master.cf").read_bytes() == master
    assert (pfdir / "main.cf").read_bytes() == main
    assert not (pfdir / "postkeep-system-senders").exists()


def _entries_of(master: bytes) -> dict[str, str]:
    """postconf -M's view of the master.cf text MASTER."""
    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch, "main.cf").write_text("")
        Path(scratch, "master.cf").write_bytes(master)
        return _entries(Path(scratch))


def test_dry_run_shows_the_entry_and_changes_nothing(pfdir: Path, toml: Path) -> None:
    original = sorted((p.name, p.read_bytes()) for p in pfdir.iterdir())
    done = _ok(toml, pfdir, "apply", "--dry-run")
    assert f"+++ {pfdir}/master.cf (new)\n" in done.stdout
    assert "+postkeep-system unix -   -       n       -       20      smtp\n" in done.stdout
    assert f"+    -o smtp_bind_address={BIND}\n" in done.stdout
    assert "1 master.cf service(s)" in done.stderr
    assert sorted((p.name, p.read_bytes()) for p in pfdir.iterdir()) == original


def test_a_changed_setting_replaces_the_entry_and_remove_restores_the_hosts(
        pfdir: Path, toml: Path) -> None:
    """A host that had its own postkeep-system entry gets it back; a second apply
    with a new bind address replaces postkeep's entry without losing the host's."""
    subprocess.run(["postconf", "-c", str(pfdir), "-M",
                    f"{KEY} = postkeep-system unix - - y - 4 smtp -o smtp_helo_name=host"],
                   check=True)
    master = (pfdir / "master.cf").read_bytes()
    _ok(toml, pfdir, "apply")
    toml.write_text(toml.read_text().replace(BIND, "192.0.2.26"))
    _ok(toml, pfdir, "apply")
    assert _lane(pfdir)["smtp_bind_address"] == "192.0.2.26"
    state = json.loads((pfdir / "postkeep-backup" / "state.json").read_text())
    assert state["services"][KEY]["before"] == (
        "postkeep-system unix - - y - 4 smtp -o smtp_helo_name=host")
    _ok(toml, pfdir, "remove", "--yes")
    assert _entries(pfdir)[KEY] == "postkeep-system unix - - y - 4 smtp -o smtp_helo_name=host"
    assert (pfdir / "master.cf").read_bytes() == master


def test_remove_leaves_an_entry_edited_since_apply(pfdir: Path, toml: Path) -> None:
    _ok(toml, pfdir, "apply")
    subprocess.run(["postconf", "-c", str(pfdir), "-P", f"{KEY}/smtp_helo_name=edited"],
                   check=True)
    edited = _entries(pfdir)[KEY]
    done = _ok(toml, pfdir, "remove", "--yes")
    assert f"master.cf {KEY}: changed since apply" in done.stderr
    assert _entries(pfdir)[KEY] == edited


def test_check_reports_a_missing_lane(pfdir: Path, toml: Path) -> None:
    _ok(toml, pfdir, "apply")
    subprocess.run(["postconf", "-c", str(pfdir), "-MX", KEY], check=True)
    check = _postkeep(toml, "postfix", "check", "--config-directory", str(pfdir), "--json")
    assert check.returncode == 1, check.stdout
    report = json.loads(check.stdout)
    assert report["match"] is False
    assert [s["service"] for s in report["services"]] == [KEY]
    assert report["services"][0]["have"] is None
