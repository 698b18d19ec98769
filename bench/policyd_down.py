"""Mail through Postfix while postkeep-policyd is up, down, or killed and restarted.

One organisation with a limit of `--limit` messages per hour sends `--sessions`
SMTP sessions x `--per-session` messages through the stack's real Postfix
(more than its limit), in each of these cases:

- up:        policyd running throughout;
- down:      policyd stopped throughout (connections refused);
- restart:   policyd killed (kill -9) once a third of the limit is admitted,
             started again after `--restart-delay` s (systemd's RestartSec,
             1 s) on a new socket;
- held:      the same, but the listening socket is held by this process (as
             systemd's postkeep-policyd.socket holds it) and handed to each
             daemon as fd 3 (LISTEN_FDS): Postfix's connections wait in its
             backlog instead of being refused;
- wedged:    the socket held and no daemon at all (one that never comes
             back): one message per session, each check waits for
             smtpd_policy_service_timeout, twice;

under Postfix policy-client settings given as `--settings NAME=postconf...`
(applied with postconf -e and `postfix reload`, restored at the end).  Per
case: messages/s over all attempts, messages admitted (250) against the limit,
what rate_counters counted, the slowest message, and the number of
"problem talking to server" warnings Postfix logged (one per failed try).

Usage (a stack must be up; every run is bounded by --per-session and a deadline):
    devstack/stack.sh up $PWD/.stack-bench-pd 18025
    .venv/bin/python bench/policyd_down.py --stack $PWD/.stack-bench-pd
    devstack/stack.sh down $PWD/.stack-bench-pd
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from postkeep.config import load
from postkeep.storage.metadata import directory, dkim_keys

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import smtp
from support.policyd import free_port

REPO = Path(__file__).resolve().parents[1]
SHIM = ("import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.argv[2], sys.argv[2:])\n")
POLICY_PARAMS = ("smtpd_policy_service_try_limit", "smtpd_policy_service_retry_delay",
                 "smtpd_policy_service_timeout", "smtpd_policy_service_default_action",
                 "smtpd_policy_service_request_limit")
DEFAULT_SETTINGS = [
    "before=smtpd_policy_service_try_limit=2,smtpd_policy_service_timeout=10s",
    "try1=smtpd_policy_service_try_limit=1,smtpd_policy_service_timeout=10s",
    "after=smtpd_policy_service_try_limit=2,smtpd_policy_service_timeout=5s",
]


def read_env(stack_dir: Path) -> dict[str, str]:
    env = {}
    for line in (stack_dir / "env").read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[7:].partition("=")
            env[key] = value.strip("'\"")
    return env


@dataclass
class Result:
    case: str
    settings: str
    attempts: int
    seconds: float
    admitted: int
    counted: int
    slowest: float
    problems: int


class Bench:
    def __init__(self, stack_dir: Path, limit: int, sessions: int, per_session: int,
                 restart_delay: float) -> None:
        self.restart_delay = restart_delay
        self.dir = stack_dir
        self.env = read_env(stack_dir)
        self.cfg = load(self.env["POSTKEEP_CONFIG"])
        self.pfdir = self.env["POSTKEEP_POSTFIX_CONFIG_DIR"]
        self.log = Path(self.env["POSTKEEP_POSTFIX_LOG"])
        self.port = int(self.env["POSTKEEP_POLICYD_PORT"])
        self.smtp = (self.env["POSTKEEP_SMTP_HOST"], int(self.env["POSTKEEP_SMTP_PORT"]))
        self.limit, self.sessions, self.per_session = limit, sessions, per_session

    def ctl(self, action: str, service: str) -> None:
        subprocess.run(["bash", str(REPO / "devstack" / "stack.sh"), action, str(self.dir),
                        service], check=True, timeout=120, capture_output=True)

    def postconf(self, *assignments: str) -> None:
        subprocess.run(["postconf", "-c", self.pfdir, "-e", *assignments], check=True)
        subprocess.run(["postfix", "-c", self.pfdir, "reload"], check=True,
                       capture_output=True)

    def current(self) -> list[str]:
        out = subprocess.run(["postconf", "-c", self.pfdir, *POLICY_PARAMS], check=True,
                             capture_output=True, text=True).stdout
        return [line.replace(" = ", "=", 1) for line in out.splitlines()]

    def org(self) -> uuid.UUID:
        with psycopg.connect(self.cfg.postgres.conninfo(), autocommit=True) as conn:
            tag = uuid.uuid4().hex[:10]
            oid = directory.add_organisation(conn, f"bench-{tag}", "enterprise")
            directory.add_domain(conn, oid, f"b{tag}.example")
            dkim_keys.set_missing_key_policy(conn, oid, "unsigned")
            conn.execute("UPDATE organisations SET messages_per_hour = %s WHERE id = %s",
                         (self.limit, oid))
        self.domain = f"b{tag}.example"
        return oid

    def counted(self, oid: uuid.UUID) -> int:
        with psycopg.connect(self.cfg.postgres.conninfo(), autocommit=True) as conn:
            row = conn.execute("SELECT coalesce(sum(used), 0) FROM rate_counters"
                               " WHERE org_id = %s AND kind = 'messages'", (oid,)).fetchone()
        return int(row[0]) if row else 0

    def send_all(self, during: Callable[[Callable[[], int]], None]) -> tuple[list[int],
                                                                            list[float],
                                                                            float]:
        codes: list[int] = []
        waits: list[float] = []
        lock = threading.Lock()

        def session() -> None:
            client = smtp.Client(*self.smtp, timeout=300)
            try:
                for _ in range(self.per_session):
                    msg = (f"From: app@{self.domain}\r\nTo: r@sink.test\r\nSubject: b\r\n"
                           f"Message-ID: <{uuid.uuid4().hex}@{self.domain}>\r\n\r\nx\r\n")
                    started = time.monotonic()
                    try:
                        code = client.send(f"app@{self.domain}", ["r@sink.test"],
                                           msg.encode()).code
                    except smtp.SMTPError as exc:
                        code = exc.reply.code
                        client.reset()
                    with lock:
                        codes.append(code)
                        waits.append(time.monotonic() - started)
            finally:
                client.close()

        def admitted() -> int:
            with lock:
                return codes.count(250)

        started = time.monotonic()
        threads = [threading.Thread(target=session) for _ in range(self.sessions)]
        for t in threads:
            t.start()
        during(admitted)
        for t in threads:
            t.join(600)
        return codes, waits, time.monotonic() - started

    def wait_for(self, cond: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError("bench condition not reached")
            time.sleep(0.02)

    def stack_pid(self) -> int:
        return int((self.dir / "policyd" / "policyd.pid").read_text())

    def held_daemon(self, sock: socket.socket) -> subprocess.Popen[bytes]:
        binary = str(Path(sys.executable).with_name("postkeep-policyd"))
        with (self.dir / "policyd" / "held.log").open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-c", SHIM, str(sock.fileno()), binary, "--config",
                 self.env["POSTKEEP_CONFIG"], "--metrics", f"127.0.0.1:{free_port()}"],
                pass_fds=(sock.fileno(),), cwd="/tmp", stdout=out, stderr=out)

    def run(self, case: str, settings: str) -> Result:
        oid = self.org()
        log_from = self.log.stat().st_size
        third = max(1, self.limit // 3)

        def nothing(_: Callable[[], int]) -> None:
            pass

        def kill_restart(admitted: Callable[[], int]) -> None:
            self.wait_for(lambda: admitted() >= third)
            pid = self.stack_pid()
            subprocess.run(["kill", "-9", str(pid)], check=True)
            self.wait_for(lambda: not Path(f"/proc/{pid}").exists())
            time.sleep(self.restart_delay)  # systemd's RestartSec
            self.ctl("start", "policyd")

        if case == "up":
            codes, waits, secs = self.send_all(nothing)
        elif case == "down":
            self.ctl("stop", "policyd")
            try:
                codes, waits, secs = self.send_all(nothing)
            finally:
                self.ctl("start", "policyd")
        elif case == "restart":
            codes, waits, secs = self.send_all(kill_restart)
        elif case == "wedged":
            self.ctl("stop", "policyd")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(128)
            per_session, self.per_session = self.per_session, 1
            try:
                codes, waits, secs = self.send_all(nothing)
            finally:
                self.per_session = per_session
                sock.close()
                self.ctl("start", "policyd")
        else:  # held
            self.ctl("stop", "policyd")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(128)
            daemons = [self.held_daemon(sock)]
            try:
                def kill_held(admitted: Callable[[], int]) -> None:
                    self.wait_for(lambda: admitted() >= third)
                    daemons[0].send_signal(signal.SIGKILL)
                    daemons[0].wait(30)
                    time.sleep(self.restart_delay)  # systemd's RestartSec
                    daemons[0] = self.held_daemon(sock)

                codes, waits, secs = self.send_all(kill_held)
            finally:
                daemons[0].terminate()
                daemons[0].wait(30)
                sock.close()
                self.ctl("start", "policyd")
        logged = self.log.read_bytes()[log_from:].decode(errors="replace")
        problems = logged.count(f"problem talking to server 127.0.0.1:{self.port}")
        return Result(case, settings, len(codes), secs, codes.count(250), self.counted(oid),
                      max(waits), problems)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stack", type=Path, required=True, help="a running stack's DIR")
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--per-session", type=int, default=15)
    ap.add_argument("--cases", default="up,down,restart,held")
    ap.add_argument("--restart-delay", type=float, default=1.0,
                    help="seconds between kill -9 and the restart (systemd's RestartSec)")
    ap.add_argument("--settings", action="append",
                    help="NAME=param=value,param=value (repeatable)")
    args = ap.parse_args()
    bench = Bench(args.stack.resolve(), args.limit, args.sessions, args.per_session,
                  args.restart_delay)
    saved = bench.current()
    results = []
    try:
        for spec in args.settings or DEFAULT_SETTINGS:
            name, _, assignments = spec.partition("=")
            bench.postconf(*assignments.split(","))
            for case in args.cases.split(","):
                r = bench.run(case, name)
                results.append(r)
                print(f"{name:8} {case:8} {r.attempts / r.seconds:7.1f} msg/s  admitted "
                      f"{r.admitted}/{bench.limit} counted {r.counted}  slowest "
                      f"{r.slowest:5.1f}s  problem-talking {r.problems}", flush=True)
    finally:
        bench.postconf(*saved)
    print(f"\n{args.sessions} sessions x {args.per_session} messages, limit {args.limit}/h,"
          f" restart {args.restart_delay:g} s after kill -9\n")
    print("| settings | case | messages/s | admitted / limit | counted | slowest message |"
          " 'problem talking to server' |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.settings} | {r.case} | {r.attempts / r.seconds:.1f} | {r.admitted} / "
              f"{args.limit} | {r.counted} | {r.slowest:.1f} s | {r.problems} |")


if __name__ == "__main__":
    main()
