"""The development stack's secrets, probed as another local Unix user.

Everything that holds a secret (the env file with MinIO's root secret, the
MinIO credentials, postkeep.toml, PostgreSQL's password files, the DKIM and
return-path keys) is mode 0600 and unreadable to another user, and so is
the stored content (MinIO's data, the milter's spools), and so are the
daemons' logs, which name senders and recipients.  PostgreSQL asks
everyone for a password (scram-sha-256), over TCP and over its Unix socket:
another user gets nothing without it.  The stack's own tools still work:
`psql` with only the env file's variables, the `postkeep` CLI, and tenant
logins with their own passwords (tests/test_tenant_isolation.py).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from support.stack import Stack

pytestmark = pytest.mark.stack

OUTSIDER = "pk-outsider"  # a local user with no business in the stack


def _outsider() -> str:
    """OUTSIDER, created (a system user without a home or shell) if absent."""
    if subprocess.run(["id", "-u", OUTSIDER], capture_output=True).returncode != 0:
        made = subprocess.run(["useradd", "--system", "--no-create-home",
                               "--shell", "/usr/sbin/nologin", OUTSIDER],
                              capture_output=True, text=True)
        # 9: created meanwhile by a parallel run
        assert made.returncode in (0, 9), made.stderr
    return OUTSIDER


def _as_outsider(*argv: str) -> subprocess.CompletedProcess[str]:
    """ARGV as OUTSIDER, with an empty environment (no PG* variables, no PGPASSFILE)."""
    return subprocess.run(["runuser", "-u", _outsider(), "--", "env", "-i",
                           "PATH=/usr/bin:/bin", *argv],
                          capture_output=True, text=True, timeout=60, cwd="/tmp")


def _secret_files(stack: Stack) -> list[Path]:
    d = Path(stack.env["POSTKEEP_STACK_DIR"])
    files = [d / "env", d / "postkeep.toml", d / "minio" / "credentials",
             *sorted((d / "dkim").iterdir())]
    pgpass = stack.env.get("PGPASSFILE", "")
    assert pgpass, "the env file names no PGPASSFILE"
    files.append(Path(pgpass))
    with open(stack.env["POSTKEEP_CONFIG"], "rb") as f:
        password_file = tomllib.load(f)["postgres"].get("password_file", "")
    assert password_file, "postkeep.toml names no [postgres] password_file"
    files.append(Path(password_file))
    return files


def test_secret_files_are_0600_and_unreadable_to_another_user(stack: Stack) -> None:
    files = _secret_files(stack)
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is mode {mode:o}"
        got = _as_outsider("cat", str(path))
        assert got.returncode != 0 and "Permission denied" in got.stderr, (path, got)
        assert not got.stdout
    # the stored content: MinIO's objects and the milter's spools
    d = Path(stack.env["POSTKEEP_STACK_DIR"])
    for where in (d / "minio" / "data", d / "milter" / "spool", d / "milter" / "tmp",
                  d / "sink"):
        got = _as_outsider("ls", "-R", str(where))
        assert got.returncode != 0 and "Permission denied" in got.stderr, (where, got)


def _daemon_logs(stack: Stack) -> list[Path]:
    d = Path(stack.env["POSTKEEP_STACK_DIR"])
    return [d / "milter" / "milter.log", d / "policyd" / "policyd.log",
            d / "storage" / "storage.log", d / "sink.log",
            Path(stack.env["POSTKEEP_POSTFIX_LOG"])]


def test_daemon_logs_are_0600_and_unreadable_to_another_user(stack: Stack) -> None:
    """The daemons', the sink's and Postfix's logs name senders and recipients."""
    for path in _daemon_logs(stack):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is mode {mode:o}"
        got = _as_outsider("cat", str(path))
        assert got.returncode != 0 and "Permission denied" in got.stderr, (path, got)


def test_a_daemon_log_left_readable_is_made_0600_at_start(stack: Stack) -> None:
    """A log kept from an older stack (appended to, never recreated) is closed too."""
    log = Path(stack.env["POSTKEEP_STACK_DIR"]) / "storage" / "storage.log"
    stack.stack_ctl("stop", "storage")
    try:
        log.chmod(0o644)
    finally:
        stack.stack_ctl("start", "storage")
    mode = stat.S_IMODE(log.stat().st_mode)
    assert mode == 0o600, f"{log} is mode {mode:o}"


def _psql_as_outsider(host: str, port: str, user: str) -> subprocess.CompletedProcess[str]:
    return _as_outsider("psql", "-XAtw", "-h", host, "-p", port, "-U", user, "-d", "postkeep",
                        "-c", "SELECT count(*) FROM messages")


def test_postgres_asks_another_user_for_a_password_over_tcp_and_the_socket(
        stack: Stack) -> None:
    port = stack.env["PGPORT"]
    socket_dir = Path(stack.env["POSTKEEP_STACK_DIR"]) / "pg" / "run"
    assert (socket_dir / f".s.PGSQL.{port}").is_socket()
    for host in ("127.0.0.1", str(socket_dir)):
        for user in ("postkeep", "postgres", OUTSIDER):
            got = _psql_as_outsider(host, port, user)
            assert got.returncode != 0 and not got.stdout, (host, user, got)
            # refused for want of a password (the postgres role on the socket: for
            # not being the postgres OS user), not for some other reason
            want = ("Peer authentication failed" if (host, user) == (str(socket_dir), "postgres")
                    else "no password supplied")
            assert want in got.stderr, (host, user, got.stderr)
    # a wrong password does not do either
    wrong = _as_outsider("PGPASSWORD=not-the-password", "psql", "-XAtw", "-h", "127.0.0.1",
                         "-p", port, "-U", "postkeep", "-d", "postkeep", "-c", "SELECT 1")
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr, wrong


def test_the_stacks_own_tools_still_work(stack: Stack) -> None:
    """psql with the env file's variables alone (TCP and socket), and the postkeep CLI."""
    psql = shutil.which("psql") or "/usr/bin/psql"
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    socket_dir = str(Path(stack.env["POSTKEEP_STACK_DIR"]) / "pg" / "run")
    for host in (env["PGHOST"], socket_dir):
        got = subprocess.run([psql, "-XAtw", "-h", host, "-c", "SELECT current_user"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert got.returncode == 0 and got.stdout.strip() == "postkeep", (host, got.stderr)
    cli = Path(sys.executable).with_name("postkeep")
    org, _ = stack.new_org("free", dkim=False)
    got = subprocess.run([str(cli), "--config", stack.env["POSTKEEP_CONFIG"], "org", "list"],
                         env=env, capture_output=True, text=True, timeout=120, cwd="/tmp")
    assert got.returncode == 0 and str(org) in got.stdout, got.stderr
