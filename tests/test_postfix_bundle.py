"""The Postfix bundle: parsing, rendering, diffing, and the live test instance."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from postkeep.cli.postfix import (
    BUNDLE_CANDIDATES,
    BundleError,
    Difference,
    diff,
    normalize,
    parse_bundle,
    parse_postconf,
    render,
)

PLACEHOLDERS = {"milter_address": "inet:127.0.0.1:8891", "config_directory": "/etc/postfix",
                "policy_address": "inet:127.0.0.1:10040"}

GOLDEN_BUNDLE = """\
# a comment
maximal_queue_lifetime = 1h

smtpd_milters = {milter_address}
milter_connect_macros = j {daemon_name} v {client_addr}
  # comment inside is skipped
milter_mail_macros = i {auth_type}
    {auth_authen}
empty_value =
"""


@pytest.mark.unit
def test_parse_renders_placeholders_in_order() -> None:
    assert parse_bundle(GOLDEN_BUNDLE, PLACEHOLDERS) == [
        ("maximal_queue_lifetime", "1h"),
        ("smtpd_milters", "inet:127.0.0.1:8891"),
        ("milter_connect_macros", "j {daemon_name} v {client_addr}"),
        ("milter_mail_macros", "i {auth_type} {auth_authen}"),
        ("empty_value", ""),
    ]


@pytest.mark.unit
def test_render_leaves_postfix_macros_alone() -> None:
    assert render("{milter_address} {client_addr} {i}", PLACEHOLDERS) == (
        "inet:127.0.0.1:8891 {client_addr} {i}"
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("a = 1\na = 2\n", "a is set twice"),
        ("  b = 1\n", "continuation line before any parameter"),
        ("not a parameter\n", "expected 'name = value'"),
    ],
)
def test_parse_refuses_bad_lines_naming_the_line(text: str, error: str) -> None:
    with pytest.raises(BundleError, match=error) as info:
        parse_bundle(text, PLACEHOLDERS, source="x.cf")
    assert str(info.value).startswith("x.cf:")


@pytest.mark.unit
def test_parse_postconf_output() -> None:
    out = "message_size_limit = 10485760\nsmtpd_milters =\nmilter_protocol = 6\n"
    assert parse_postconf(out) == {
        "message_size_limit": "10485760",
        "smtpd_milters": "",
        "milter_protocol": "6",
    }


@pytest.mark.unit
def test_diff_reports_changed_and_unknown_in_bundle_order() -> None:
    wanted = [("a", "1h"), ("b", "x, y"), ("c", "j  {i}"), ("d", "5")]
    have = {"a": "5d", "b": "x,y", "c": "j {i}"}
    assert diff(wanted, have) == [Difference("a", "5d", "1h"), Difference("d", None, "5")]
    assert str(Difference("a", "5d", "1h")) == "a: have '5d', want '1h'"
    assert "unknown parameter" in str(Difference("d", None, "5"))


@pytest.mark.unit
def test_normalize_folds_whitespace_and_commas() -> None:
    assert normalize("  a ,b,   c  d ") == "a, b, c d"


@pytest.mark.unit
def test_shipped_bundle_has_the_product_settings() -> None:
    bundle = BUNDLE_CANDIDATES[0]
    values = dict(parse_bundle(bundle.read_text(), PLACEHOLDERS, source=str(bundle)))
    assert values["maximal_queue_lifetime"] == "1h"
    assert values["bounce_queue_lifetime"] == "1h"
    assert values["message_size_limit"] == "10485760"
    assert values["smtpd_milters"] == values["non_smtpd_milters"] == "inet:127.0.0.1:8891"
    assert values["milter_default_action"] == "tempfail"
    assert "{client_addr}" in values["milter_connect_macros"].split()
    assert {"{auth_type}", "{auth_authen}"} <= set(values["milter_mail_macros"].split())
    # policyd at RCPT, DATA and END-OF-DATA; never before the relay checks
    # decide, and nothing (permit_mynetworks) lets trusted clients skip it.
    policy = "check_policy_service inet:127.0.0.1:10040"
    assert values["smtpd_recipient_restrictions"] == policy
    assert values["smtpd_data_restrictions"] == policy
    assert values["smtpd_end_of_data_restrictions"] == policy
    assert "smtpd_relay_restrictions" not in values
    assert values["smtpd_policy_service_default_action"] == "DUNNO"
    assert values["smtpd_policy_service_timeout"] == "5s"
    assert values["smtpd_policy_service_try_limit"] == "2"  # README, "When policyd is down"


@pytest.mark.unit
def test_shipped_bundle_is_accepted_by_postconf(tmp_path: Path) -> None:
    """Every bundle parameter is one this Postfix knows (no typo goes unnoticed)."""
    (tmp_path / "main.cf").write_text("")
    # Per-transport parameters (lmtp_destination_concurrency_limit) exist only
    # for master.cf's services: Debian's master.cf has lmtp, the bundle's own
    # master.cf the system lane (postkeep-system_*).
    bundle = BUNDLE_CANDIDATES[0]
    (tmp_path / "master.cf").write_text(
        "lmtp unix - - n - - lmtp\n" + bundle.with_name("master.cf").read_text())
    names = [n for n, _ in parse_bundle(bundle.read_text(), PLACEHOLDERS)]
    done = subprocess.run(
        ["postconf", "-c", str(tmp_path), *names], capture_output=True, text=True, check=False
    )
    assert "unknown parameter" not in done.stderr
    assert set(parse_postconf(done.stdout)) == set(names)


def _postkeep(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("postkeep")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=False)


@pytest.mark.stack
def test_running_instance_matches_the_bundle() -> None:
    """`postkeep postfix check` on the stack's Postfix: every bundle value is in force."""
    config = os.environ.get("POSTKEEP_CONFIG")
    assert config, "POSTKEEP_CONFIG unset: run `make test` (it sources .stack-test/env)"
    done = _postkeep("--config", config, "postfix", "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bundle parameters match" in done.stdout


@pytest.mark.stack
def test_check_reports_a_drifted_parameter(tmp_path: Path) -> None:
    """A copy of the instance with one value changed: check names it and exits 1."""
    pfdir = os.environ.get("POSTKEEP_POSTFIX_CONFIG_DIR")
    config = os.environ.get("POSTKEEP_CONFIG")
    assert pfdir and config, "stack env unset: run `make test`"
    for name in ("main.cf", "master.cf"):
        (tmp_path / name).write_text(Path(pfdir, name).read_text())
    subprocess.run(
        ["postconf", "-c", str(tmp_path), "-e", "maximal_queue_lifetime = 5d"], check=True
    )
    done = _postkeep("--config", config, "postfix", "check", "--config-directory", str(tmp_path))
    assert done.returncode == 1
    assert "maximal_queue_lifetime: have '5d', want '1h'" in done.stdout
    applied = _postkeep("--config", config, "postfix", "apply", "--config-directory", str(tmp_path))
    assert applied.returncode == 0, applied.stderr
    assert "maximal_queue_lifetime: '5d' -> '1h'" in applied.stdout
    again = _postkeep("--config", config, "postfix", "check", "--config-directory", str(tmp_path))
    assert again.returncode == 0, again.stdout
