"""postkeep-policyd killed (kill -9) and restarted under load, through the real Postfix.

Socket activation (README, "When policyd is down"): something other than the
daemon (systemd's postkeep-policyd.socket; here the test process) holds the
listening socket and hands it to each new policyd as fd 3 (LISTEN_FDS).
While no daemon runs, the kernel still completes Postfix's connections and
keeps them in the backlog, so Postfix is never refused: its policy requests
wait for the next daemon, which answers them, and no check falls to
`smtpd_policy_service_default_action` (DUNNO, uncounted).

One organisation over its limit sends from several SMTP sessions while
policyd is killed twice and restarted; exactly its limit of messages is
admitted and counted, the rest get the rate-limit deferral, and Postfix's
connections are never refused.  A request a kill cuts in flight fails its
try (Postfix may log "problem talking to server" for it) and is tried again
after `smtpd_policy_service_retry_delay` on a new connection, which waits in
the backlog; only a message whose every try failed would pass uncounted, and
the exact counts show none did.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from conftest import TestOrg
from support import smtp
from support.policyd import PolicyClient, free_port, request
from support.stack import Stack
from support.wait import until

pytestmark = pytest.mark.outage

LIMIT = 12
SESSIONS = 3
PER_SESSION = 10  # 30 attempts: 12 admitted, 18 deferred
KILLS = 2

# Run as the daemon's parent: put the inherited socket on fd 3 and name this
# process in LISTEN_PID (what systemd does between fork and exec), then exec
# postkeep-policyd, which keeps the pid.
SHIM = ("import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.argv[2], sys.argv[2:])\n")


def start_on(sock: socket.socket, config: str, log: Path) -> subprocess.Popen[bytes]:
    """postkeep-policyd serving SOCK, which this process keeps open."""
    binary = str(Path(sys.executable).with_name("postkeep-policyd"))
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", SHIM, str(sock.fileno()), binary, "--config", config,
             "--metrics", f"127.0.0.1:{free_port()}"],
            pass_fds=(sock.fileno(),), cwd="/tmp", stdout=out, stderr=out)


def pending_connections(port: int) -> int:
    """Connections waiting in the accept queue of the socket listening on 127.0.0.1:PORT
    (for a listening socket, /proc/net/tcp's rx_queue is the accept queue's length)."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":
            return int(fields[4].split(":")[1], 16)
    return 0


def answered(port: int) -> bool:
    """True once a policyd answers on PORT (a request for no organisation: not counted)."""
    client = PolicyClient(port, timeout=60)
    try:
        return client.ask(request("RCPT", "x@nobody.invalid", uuid.uuid4().hex)) == "DUNNO"
    finally:
        client.close()


@contextmanager
def held_socket(stack: Stack) -> Iterator[tuple[socket.socket, int]]:
    """The stack's policy port, held by this process instead of the stack's policyd."""
    port = int(stack.env["POSTKEEP_POLICYD_PORT"])
    stack.stack_ctl("stop", "policyd")
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        yield sock, port
    finally:
        sock.close()
        stack.stack_ctl("start", "policyd")


def _message(domain: str, n: int) -> bytes:
    return (f"From: app@{domain}\r\nTo: r@sink.test\r\nSubject: down {n}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@{domain}>\r\n\r\nbody\r\n").encode()


def test_limit_exact_across_kill_and_restart_on_an_inherited_socket(
        stack: Stack, db: psycopg.Connection, make_org: Callable[..., TestOrg],
        tmp_path: Path) -> None:
    org = make_org("enterprise")
    db.execute("UPDATE organisations SET messages_per_hour = %s WHERE id = %s", (LIMIT, org.id))
    postfix_log = Path(stack.env["POSTKEEP_POSTFIX_LOG"])
    log_from = postfix_log.stat().st_size if postfix_log.exists() else 0
    policyd_log = tmp_path / "policyd.log"
    replies: list[smtp.Reply] = []
    lock = threading.Lock()

    def session(n: int) -> None:
        client = smtp.Client(*stack.smtp, timeout=120)
        try:
            for i in range(PER_SESSION):
                try:
                    reply = client.send(f"app@{org.domain}", ["r@sink.test"],
                                        _message(org.domain, n * PER_SESSION + i))
                except smtp.SMTPError as exc:
                    reply = exc.reply
                    client.reset()
                with lock:
                    replies.append(reply)
        finally:
            client.close()

    def admitted() -> int:
        with lock:
            return sum(r.code == 250 for r in replies)

    with held_socket(stack) as (sock, port):
        daemon = start_on(sock, stack.env["POSTKEEP_CONFIG"], policyd_log)
        try:
            until(lambda: answered(port), "the first policyd answering on the held socket",
                  timeout=60)
            threads = [threading.Thread(target=session, args=(n,)) for n in range(SESSIONS)]
            for t in threads:
                t.start()
            for k in range(1, KILLS + 1):
                # kill -9 while the organisation is still under its limit ...
                until(lambda k=k: admitted() >= k * LIMIT // (KILLS + 1),
                      f"{k * LIMIT // (KILLS + 1)} messages admitted", timeout=120)
                daemon.send_signal(signal.SIGKILL)
                daemon.wait(30)
                # ... and restart only once Postfix's requests wait in the backlog
                # (or no session is left: then they did not wait, they passed)
                until(lambda: pending_connections(port) > 0
                      or not any(t.is_alive() for t in threads),
                      "a policy connection waiting for the next policyd", timeout=60)
                daemon = start_on(sock, stack.env["POSTKEEP_CONFIG"], policyd_log)
            for t in threads:
                t.join(300)
            assert not any(t.is_alive() for t in threads), "an SMTP session never finished"
        finally:
            daemon.terminate()
            daemon.wait(30)

    assert len(replies) == SESSIONS * PER_SESSION
    others = [r for r in replies if r.code != 250 and not (r.code == 450
                                                           and r.enhanced == "4.7.1")]
    assert not others, f"replies other than 250 or the rate-limit deferral: {others}"
    assert admitted() == LIMIT, policyd_log.read_text()[-3000:]
    used = db.execute("SELECT coalesce(sum(used), 0) FROM rate_counters"
                      " WHERE org_id = %s AND kind = 'messages'", (org.id,)).fetchone()
    assert used is not None and used[0] == LIMIT
    logged = postfix_log.read_bytes()[log_from:].decode(errors="replace")
    problems = [line for line in logged.splitlines()
                if f"problem talking to server 127.0.0.1:{port}" in line]
    # Never refused: the held socket's backlog kept every new connection.
    refused = [line for line in problems if "refused" in line]
    assert not refused, refused[:5]
    # A kill can cut the one request each session may have in flight; Postfix
    # logs that try and tries again (try_limit 2) on a new connection, which
    # waits in the backlog: the exact counts above show every retry answered.
    assert len(problems) <= KILLS * SESSIONS, problems[:5]
