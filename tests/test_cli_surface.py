"""The shape of the `postkeep` command tree, and its exit statuses without a backend.

Walks every command click knows (as `main()` registers them) and holds each
to the operator's contract: --help everywhere, --json on every command that
only reads, --yes and --dry-run on every command that deletes, removes or
revokes.  Then runs the installed console script against a PostgreSQL port
nothing listens on: exit 3 and one line, no traceback; a usage error is 2.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import click
import psycopg
import pytest
from click.testing import CliRunner
from minio.error import S3Error
from urllib3.exceptions import MaxRetryError

from postkeep import cli
from postkeep.cli.common import CLEAR, Override, backend_message, unavailable
from postkeep.cli.messages import decode_cursor, encode_cursor
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.messages import MessageRow

pytestmark = pytest.mark.unit

# Commands that only read: each must offer --json.
READ_NAMES = {"list", "show", "dns", "status", "stats", "unmatched", "check", "export"}
# spool drain changes state but reports counts a script wants as JSON (issue 16).
ALSO_JSON = {("spool", "drain")}
# Words that make a command destructive: each must offer --yes and --dry-run.
DESTRUCTIVE_WORDS = ("remove", "delete", "erase", "revoke", "drain", "reset", "sweep",
                     "retire", "orphans", "purge", "prune", "drop")
# `postkeep postfix` is another helper's work in issue 16 (its check gains
# --json there); drop this exclusion when that branch is merged.
NOT_HERE: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def root() -> click.Group:
    cli._register()
    return cli.cli


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], click.Command]]:
    for name, sub in sorted(group.commands.items()):
        if isinstance(sub, click.Group):
            yield from _commands(sub, (*path, name))
        else:
            yield (*path, name), sub


def _options(cmd: click.Command) -> set[str]:
    return {opt for p in cmd.params if isinstance(p, click.Option) for opt in p.opts}


def _ours(path: tuple[str, ...]) -> bool:
    return path[0] not in NOT_HERE


def test_every_read_command_has_json(root: click.Group) -> None:
    reads = [p for p, _ in _commands(root) if _ours(p) and (p[-1] in READ_NAMES
                                                             or p in ALSO_JSON)]
    assert ("limits", "show") in reads and ("dkim", "dns") in reads
    assert ("retention", "lifecycle", "show") in reads and ("dict", "list") in reads
    assert ("tier", "list") in reads and ("org", "show") in reads
    assert ("suppression", "list") in reads and ("suppression", "export") in reads
    commands = dict(_commands(root))
    missing = [" ".join(p) for p in reads if "--json" not in _options(commands[p])]
    assert missing == []


# Commands whose output is the bytes themselves (a message, a report), and
# `postkeep postfix apply|remove` (their diff is the output; --dry-run shows it).
NO_JSON = {("messages", "raw"), ("reports", "raw"), ("postfix", "apply"), ("postfix", "remove")}


def test_every_command_has_json(root: click.Group) -> None:
    # Commands that change something print their result through common.say():
    # under --json one JSON object, the human line in "message".
    missing = [" ".join(p) for p, c in _commands(root)
               if p not in NO_JSON and "--json" not in _options(c)]
    assert missing == []
    assert ("org", "add") in dict(_commands(root)) and ("erase",) in dict(_commands(root))


def test_say_prints_one_json_object_under_json() -> None:
    from postkeep.cli.common import fail, json_flag, say

    @click.command()
    @json_flag
    @click.option("--bad", is_flag=True)
    def cmd(bad: bool) -> None:
        if bad:
            fail("no such thing 'x'")
        say("did it", count=2, when=datetime(2026, 1, 2, tzinfo=UTC))

    import json

    r = CliRunner().invoke(cmd, ["--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == {
        "count": 2, "when": "2026-01-02 00:00:00+00:00", "message": "did it"}
    assert CliRunner().invoke(cmd, []).stdout == "did it\n"
    r = CliRunner().invoke(cmd, ["--json", "--bad"])
    assert r.exit_code == 1 and r.stdout == ""
    assert json.loads(r.stderr) == {"error": "no such thing 'x'", "exit": 1}


def test_every_destructive_command_has_yes_and_dry_run(root: click.Group) -> None:
    destructive = [(p, c) for p, c in _commands(root)
                   if _ours(p) and any(w in p[-1] for w in DESTRUCTIVE_WORDS)]
    names = {" ".join(p) for p, _ in destructive}
    assert {"org remove", "domain remove", "submitter remove", "tier remove", "erase",
            "tenant revoke", "hold remove", "limits reset", "dict sweep", "spool drain",
            "dkim retire", "retention orphans", "suppression remove",
            "suppression purge"} <= names
    missing = [" ".join(p) for p, c in destructive
               if not {"--yes", "--dry-run"} <= _options(c)]
    assert missing == []


def test_every_command_has_help(root: click.Group) -> None:
    for path, _ in _commands(root):
        result = CliRunner().invoke(root, [*path, "--help"])
        assert result.exit_code == 0, path
        assert "Show this message and exit." in result.stdout, path


# --- exit statuses ------------------------------------------------------------


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "postkeep.toml"
    conf.write_text(f'[postgres]\nhost = "127.0.0.1"\nport = {_closed_port()}\n'
                    "connect_timeout_seconds = 2\n")
    conf.chmod(0o600)
    exe = Path(sys.executable).with_name("postkeep")
    return subprocess.run([str(exe), "--config", str(conf), *args], capture_output=True,
                          text=True, timeout=60, cwd="/", stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args", [
    ("org", "list"), ("tier", "list", "--json"), ("messages", "list"),
    ("messages", "show", "ABC123"), ("limits", "show", "--json", "acme"),
    ("org", "remove", "--yes", "acme"), ("dict", "list", "--json"), ("db", "migrate"),
    ("suppression", "list", "--json", "acme"),
])
def test_postgres_unreachable_is_exit_3_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    done = _script(tmp_path, *args)
    assert done.returncode == 3, done
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("postkeep: postgres: "), done.stderr


def test_usage_error_is_exit_2(tmp_path: Path) -> None:
    done = _script(tmp_path, "messages", "list", "--limit", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done
    done = _script(tmp_path, "org", "set", "acme", "--content-days", "forever")
    assert done.returncode == 2 and "'forever': expected a whole number" in done.stderr, done


def test_unavailable_tells_connection_failures_from_answers() -> None:
    refused = psycopg.OperationalError("connection refused")
    assert unavailable(BackendError("postgres", "refused").with_traceback(None)) is False
    wrapped = BackendError("postgres", "refused")
    wrapped.__cause__ = refused
    assert unavailable(wrapped) and backend_message(wrapped) == ("postgres: refused", 3)
    assert backend_message(psycopg.errors.UndefinedTable("no table")) == (
        "postgres: no table", 1)
    down = BackendError("s3", "get k: connection refused")
    down.__cause__ = MaxRetryError(None, "/k", "refused")  # type: ignore[arg-type]
    assert backend_message(down) == ("s3: get k: connection refused", 3)
    missing = BackendError("s3", "get k: NoSuchKey")
    missing.__cause__ = _s3_error("NoSuchKey")
    assert backend_message(missing)[1] == 1
    busy = _s3_error("ServiceUnavailable")
    assert unavailable(busy)


def _s3_error(code: str) -> S3Error:
    # By keyword: minio 7.2.0 (the tested lower bound) and later versions put
    # `response` at different positions.
    return S3Error(code=code, message="m", resource="k", request_id="r", host_id="h",
                   response=None)  # type: ignore[arg-type]


# --- pure helpers ---------------------------------------------------------------


def _row(created: datetime, ident: uuid.UUID) -> MessageRow:
    return MessageRow(ident, uuid.uuid4(), "d.example", "outbound", "Q1", None, "a@d.example",
                      None, None, 1, "k", 1, b"\0" * 32, created, created, "queued", 1,
                      created, None)


def test_cursor_round_trips_and_refuses_garbage() -> None:
    when = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    ident = uuid.uuid4()
    assert decode_cursor(encode_cursor(_row(when, ident))) == (when, ident)
    for bad in ("", "nonsense", encode_cursor(_row(when, ident))[:-6]):
        with pytest.raises(ValueError, match="not a cursor printed by"):
            decode_cursor(bad)


def test_override_type() -> None:
    t = Override(1, allow_tier=True)
    assert t.convert("30", None, None) == 30 and t.convert("tier", None, None) == CLEAR
    with pytest.raises(click.BadParameter, match="at least 1"):
        t.convert("0", None, None)
    with pytest.raises(click.BadParameter):
        t.convert("unlimited", None, None)  # an organisation says 'tier', a tier 'unlimited'
    assert Override(0, allow_tier=False).convert("unlimited", None, None) == CLEAR
