"""Capture benchmark driver: paired, alternated runs through a real Postfix.

Called by bench/run.sh once the bench stack, OpenDKIM, the null milter and
smtp-sink are up.  For each message size it runs the configurations in turn
(A B C D A B C D ...) so that a noisy neighbour hurts every configuration
alike, and reports medians and paired ratios rather than single runs:

  A  bare Postfix            smtpd_milters empty
  B  Postfix + OpenDKIM      RSA-2048 relaxed/relaxed signing (the usual peer)
  C  Postfix + postkeep      the stack's postkeep-milter, capturing
  D  Postfix + null milter   a do-nothing pymilter (floor for a Python milter)
  E  Postfix + postkeep      capturing only (a domain with no DKIM key)
  T  E + outcome tracking    the bundle's smtpd_command_filter on (NOTIFY forced):
                             a success DSN per message back to postkeep-storage
  U  T, notices discarded    the same notices, but Postfix's transport for the
                             return paths is discard: (no LMTP, postkeep-storage
                             or PostgreSQL): Postfix's own share of T's cost
  J  C through the journal   a second postkeep-milter with accept_after =
                             "journal": end of message once fsync'd in the spool;
                             the stack's postkeep-storage drains it into packs.
                             The run ends when the sink has N and the spool is
                             empty, so the drain's work is inside the run.
  K  E through the journal   capture only, as E, through that milter

Only T and U run with the command filter; every other configuration runs
without it, so no DSN traffic.  U's run ends when smtp-sink has all N and the
queue is empty again (every notice discarded).  T's run ends when smtp-sink has all N messages AND
all N recipients' outcomes are recorded in PostgreSQL; its lag is measured
per recipient from the message's acceptance (messages.accepted_at) to the
outcome row (recipient_events.recorded_at), and from postkeep-storage's own
histogram (the DSN's Date, one-second resolution, to the row).

Throughput is end to end: from smtp-source's start until smtp-sink (the relay
target) has counted all N messages.  The queue is drained before every run.
For C it also reads the milter's CPU time from /proc/PID/stat and its
end-of-message histogram from /metrics (bucket deltas), and afterwards samples
VmRSS every 50 ms while large and small messages go through.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
SESSIONS = 20
SIZES = {"5 KB": 5 * 1024, "100 KB": 100 * 1024}
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
RUN_TIMEOUT = 300.0
EOM_METRIC = "postkeep_milter_eom_duration_seconds"
LAG_METRIC = "postkeep_storage_outcome_lag_seconds"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def read_env(path: str) -> dict[str, str]:
    """DIR/env (`export K='V'` lines) as a dict."""
    env: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


def sender_for(config: str) -> str:
    """E, T, U, K: the same milters as C and J, a sender domain of an organisation
    with no DKIM key and the 'unsigned' policy: capture alone, no signing."""
    return "sender@capture.example" if config in "ETUK" else "sender@bench.example"


# ---------------------------------------------------------------- probes
def cpu_seconds(pid: int) -> float:
    """utime + stime of PID (all threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """CPU of ROOT and its live children, including their reaped children
    (PostgreSQL: the postmaster and its backends)."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(entry.name) == root or int(fields[1]) == root:
            total += sum(int(f) for f in fields[11:15])
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU-seconds all cores spent not idle since boot (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    """Samples VmRSS of PID every `interval` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            self.samples += 1
            self._done.wait(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def scrape(url: str) -> dict[str, float]:
    """Prometheus text exposition → {'name{labels}': value}."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def eom_buckets(metrics: dict[str, float], metric: str = EOM_METRIC) -> list[tuple[float, float]]:
    """[(upper bound, cumulative count)] of a histogram (the end-of-message one)."""
    buckets = []
    for key, value in metrics.items():
        m = re.fullmatch(metric + r'_bucket\{le="([^"]+)"\}', key)
        if m:
            buckets.append((float(m.group(1)), value))
    return sorted(buckets)


def histogram_quantile(q: float, before: list[tuple[float, float]],
                       after: list[tuple[float, float]]) -> float:
    """Quantile of the observations between two scrapes, linearly interpolated
    inside the bucket it falls in (as Prometheus' histogram_quantile does)."""
    deltas = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = deltas[-1][1]
    if total <= 0:
        return float("nan")
    rank = q * total
    lower, prev = 0.0, 0.0
    for le, cum in deltas:
        if cum >= rank:
            if le == float("inf"):
                return lower  # beyond the last finite bucket: report its bound
            return lower + (le - lower) * (rank - prev) / max(cum - prev, 1e-12)
        lower, prev = le, cum
    return lower


# ---------------------------------------------------------------- the harness
@dataclass
class Run:
    config: str
    size: str
    rep: int
    n: int
    seconds: float
    rate: float
    milter_cpu: float | None = None  # seconds for the run (C, D: the milter; B: opendkim)
    p50: float | None = None
    p99: float | None = None
    captured: int | None = None
    signed: int | None = None  # DKIM signatures the milter made during the run
    # T: seconds from acceptance to the outcome row (p50, p99), and from the
    # DSN's Date to the row (postkeep-storage's histogram)
    lag: tuple[float, float] | None = None
    dsn_lag: tuple[float, float] | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # machine, minio, postgres
    packs: int | None = None  # pack PUTs the milter made (postkeep_milter_packs_total)
    lingered: int | None = None  # batches whose first message waited for company
    syncs: int | None = None  # J, K: fdatasyncs of journal segments in the run


@dataclass
class LagPass:
    """T at a fixed offered rate: how far the outcome rows trail the mail."""

    offered: float        # msg/s scheduled
    n: int
    failed: int           # messages Postfix refused or the connection lost
    achieved: float       # msg/s actually sent (n / time to send them)
    lag: tuple[float, float]      # acceptance -> outcome row (p50, p99), seconds
    dsn_lag: tuple[float, float]  # DSN Date -> row, postkeep-storage's histogram


def open_loop(host: str, port: int, rate: float, n: int, size: int) -> int:
    """Send N messages, one connection each, the i-th starting at i / RATE s.

    Returns how many failed.  A message that cannot start on time starts as
    soon as a sender is free (up to 200 at once): the schedule is the load
    offered, not a reaction to Postfix's pace.
    """
    import asyncio

    body = b"".join(b"X" * 78 + b"\r\n" for _ in range(max(1, size // 80)))
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        try:
            reader, writer = await asyncio.open_connection(host, port)
            script = [b"EHLO bench.example\r\n", b"MAIL FROM:<sender@capture.example>\r\n",
                      b"RCPT TO:<rcpt@sink.example>\r\n", b"DATA\r\n",
                      b"From: <sender@capture.example>\r\nTo: <rcpt@sink.example>\r\n"
                      + f"Subject: lag pass {i}\r\n\r\n".encode() + body + b".\r\n",
                      b"QUIT\r\n"]
            await _reply(reader)  # greeting
            for line in script:
                writer.write(line)
                await writer.drain()
                code = await _reply(reader)
                if code >= 400:
                    raise OSError(f"{line[:4]!r} answered {code}")
            writer.close()
        except (OSError, asyncio.IncompleteReadError) as exc:
            failed += 1
            log(f"lag pass: message {i}: {exc}")

    async def run() -> None:
        gate = asyncio.Semaphore(200)
        t0 = asyncio.get_running_loop().time()
        tasks = []
        for i in range(n):
            delay = t0 + i / rate - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            task = asyncio.create_task(one(i))
            task.add_done_callback(lambda _t: gate.release())
            tasks.append(task)
        await asyncio.gather(*tasks)

    asyncio.run(run())
    return failed


async def _reply(reader: Any) -> int:
    """The code of one (possibly multi-line) SMTP reply."""
    while True:
        line = await reader.readuntil(b"\n")
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3])


def _wait_empty(count: Callable[[], int], timeout: float, interval: float,
                why: Callable[[], str]) -> None:
    """Poll COUNT every INTERVAL until it is 0; SystemExit(WHY()) after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while count():
        if time.monotonic() > deadline:
            raise SystemExit(why())
        time.sleep(interval)


@dataclass
class Bench:
    env: dict[str, str]
    sink_out: Path
    sink_port: int
    milter_pid: int
    dkim_pid: int
    null_pid: int
    milters: dict[str, str]
    minio_pid: int
    postgres_pid: int
    command_filter: str = ""  # the bundle's smtpd_command_filter (T only)
    storage_pid: int = 0  # postkeep-storage (its CPU is T's report handling)
    transport_maps: str = ""  # the stack's own (U swaps in a discard table)
    journal_pid: int = 0  # J, K: the journaling postkeep-milter
    journal_metrics: str = ""
    reuse: bool = False  # smtp-source -d: every session sends its messages over one connection
    _pg: Any = None
    runs: list[Run] = field(default_factory=list)
    lag_passes: list[LagPass] = field(default_factory=list)

    @property
    def pfdir(self) -> str:
        return self.env["POSTKEEP_POSTFIX_CONFIG_DIR"]

    @property
    def smtp(self) -> str:
        return f"{self.env['POSTKEEP_SMTP_HOST']}:{self.env['POSTKEEP_SMTP_PORT']}"

    def postconf(self, *settings: str) -> None:
        subprocess.run(["postconf", "-c", self.pfdir, "-e", *settings], check=True)

    def reload(self) -> None:
        subprocess.run(["postfix", "-c", self.pfdir, "reload"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let master replace idle smtpd/cleanup processes

    def use(self, config: str) -> None:
        milter = self.milters[config]
        command_filter = self.command_filter if config in "TU" else ""
        transport_maps = self.transport_maps
        if config == "U":  # the notices are made, then discarded by Postfix
            table = Path(self.pfdir, "bench-discard-transport.pcre")
            table.write_text("/^pk-[0-9a-f]{32}(-[0-9a-f]+){0,2}@/\tdiscard:\n")
            transport_maps = f"pcre:{table}"
        # A reload while notices are still being delivered leaves their queue
        # files to a qmgr that skips them ("still being delivered").
        self.drain()
        self.postconf(f"smtpd_milters = {milter}", f"non_smtpd_milters = {milter}",
                      f"smtpd_command_filter = {command_filter}",
                      f"transport_maps = {transport_maps}")
        self.reload()

    def pg(self) -> Any:
        """One PostgreSQL connection for T's polling (not one per poll)."""
        if self._pg is None:
            import psycopg

            self._pg = psycopg.connect(autocommit=True)
        return self._pg

    def outcomes_since(self, since: float) -> int:
        """Recipients of capture.example mail accepted since SINCE with an outcome."""
        row = self.pg().execute(
            "SELECT count(*) FROM message_recipients r JOIN messages m"
            " ON m.id = r.message_id AND m.metadata_expires_at = r.metadata_expires_at"
            " WHERE m.created_at >= to_timestamp(%s) AND m.envelope_from = %s"
            " AND r.status <> 'queued'", (since, "sender@capture.example")).fetchone()
        return int(row[0]) if row else 0

    def lag_since(self, since: float) -> tuple[float, float]:
        """(p50, p99) seconds from acceptance to the recorded outcome."""
        row = self.pg().execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag),"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) FROM ("
            " SELECT extract(epoch FROM min(e.recorded_at) - m.accepted_at) AS lag"
            " FROM recipient_events e JOIN messages m ON m.id = e.message_id"
            " AND m.metadata_expires_at = e.metadata_expires_at"
            " WHERE m.created_at >= to_timestamp(%s) AND m.envelope_from = %s"
            " GROUP BY e.message_id, e.recipient, m.accepted_at) x",
            (since, "sender@capture.example")).fetchone()
        assert row is not None
        return float(row[0]), float(row[1])

    def await_outcomes(self, since: float, n: int, what: str) -> None:
        """Wait until N recipients of mail accepted since SINCE have an outcome."""
        deadline = time.monotonic() + RUN_TIMEOUT
        while self.outcomes_since(since) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {what}: {self.outcomes_since(since)} of {n} "
                                 "outcomes recorded")
            time.sleep(0.05)

    def dsn_lag_since(self, before: dict[str, float]) -> tuple[float, float]:
        """(p50, p99) of postkeep-storage's DSN Date -> row histogram since BEFORE."""
        after = scrape(self.env.get("POSTKEEP_STORAGE_METRICS", ""))
        b, a = eom_buckets(before, LAG_METRIC), eom_buckets(after, LAG_METRIC)
        return histogram_quantile(0.50, b, a), histogram_quantile(0.99, b, a)

    def queued(self) -> int:
        spool = Path(subprocess.run(["postconf", "-c", self.pfdir, "-h", "queue_directory"],
                                    check=True, capture_output=True, text=True).stdout.strip())
        return sum(1 for q in QUEUES for _, _, files in os.walk(spool / q) for _ in files)

    def spooled(self) -> int:
        """Entries in the stack's spool (J and K's journal)."""
        spool = Path(self.env["POSTKEEP_STACK_DIR"]) / "milter" / "spool"
        return sum(1 for p in spool.glob("*.spool"))

    def drain_spool(self, timeout: float = 120.0) -> None:
        _wait_empty(self.spooled, timeout, 0.02, lambda: (
            f"bench: the spool still has {self.spooled()} entries after {timeout:.0f} s:"
            " is postkeep-storage draining it?"))

    def drain(self, timeout: float = 120.0) -> None:
        _wait_empty(self.queued, timeout, 0.2, lambda: (
            f"bench: queue not drained after {timeout:.0f} s (postqueue -c {self.pfdir} -p)"))

    def sink_count(self) -> int:
        with open(self.sink_out, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200))
            tail = f.read().decode(errors="replace")
        counts = re.findall(r"mesg=(\d+)", tail)
        return int(counts[-1]) if counts else 0

    def send(self, n: int, size: int, sessions: int = SESSIONS,
             message_file: str | None = None, sender: str = "sender@bench.example") -> float:
        """smtp-source N messages; return seconds until smtp-sink has them all."""
        self.drain()
        start_count = self.sink_count()
        payload = ["-F", message_file] if message_file else ["-l", str(size)]
        cmd = ["smtp-source", *(["-d"] if self.reuse else []), "-s", str(sessions), "-m", str(n),
               *payload,
               "-f", sender, "-t", "rcpt@sink.example", self.smtp]
        t0 = time.monotonic()
        # A file, not a pipe: a full pipe would stall smtp-source.
        errors = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        src = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors, text=True)

        def stderr_tail(limit: int) -> str:
            errors.seek(0)
            return errors.read()[-limit:]

        idle_since: float | None = None
        while True:
            if self.sink_count() - start_count >= n:
                elapsed = time.monotonic() - t0
                break
            now = time.monotonic()
            if now - t0 > RUN_TIMEOUT:
                src.kill()
                raise SystemExit(f"bench: {n} messages not delivered in {RUN_TIMEOUT:.0f} s")
            if src.poll() is not None and self.queued() == 0:
                idle_since = idle_since or now
                if now - idle_since > 3.0:
                    raise SystemExit(
                        f"bench: smtp-source finished (exit {src.returncode}) but the sink "
                        f"counted {self.sink_count() - start_count} of {n}: "
                        f"{stderr_tail(800)}")
            time.sleep(0.02)
        src.wait()
        if src.returncode != 0:
            log(f"smtp-source exit {src.returncode}: {stderr_tail(400)}")
        errors.close()
        return elapsed

    def component_cpu(self) -> dict[str, float]:
        return {"machine": machine_busy_seconds(), "minio": cpu_seconds(self.minio_pid),
                "storage": cpu_seconds(self.storage_pid) if self.storage_pid else 0.0,
                "postgres": tree_cpu_seconds(self.postgres_pid)}

    def measured_run(self, config: str, size_name: str, rep: int, n: int) -> Run:
        size = SIZES[size_name]
        self.drain()
        pid = {"B": self.dkim_pid, "C": self.milter_pid, "D": self.null_pid,
               "E": self.milter_pid, "T": self.milter_pid, "U": self.milter_pid,
               "J": self.journal_pid, "K": self.journal_pid}.get(config)
        journaled = config in "JK"
        metrics_url = self.journal_metrics if journaled else self.env["POSTKEEP_MILTER_METRICS"]
        capturing = config in ("C", "E", "T", "U", "J", "K")
        before = scrape(metrics_url) if capturing else {}
        cpu0 = cpu_seconds(pid) if pid else 0.0
        comp0 = self.component_cpu()
        sender = sender_for(config)
        storage_url = self.env.get("POSTKEEP_STORAGE_METRICS", "")
        lag_before = scrape(storage_url) if config == "T" or journaled else {}
        since = time.time() - 0.5
        t0 = time.monotonic()
        seconds = self.send(n, size, sender=sender)
        if config == "T":  # done when every outcome is recorded too
            self.await_outcomes(since, n, "T")
            seconds = time.monotonic() - t0
        if config == "U":  # done when every notice is made and discarded too
            self.drain()
            seconds = time.monotonic() - t0
        if journaled:  # done when the drain has stored every message too
            self.drain_spool()
            seconds = time.monotonic() - t0
        run = Run(config, size_name, rep, n, seconds, n / seconds)
        if config == "T":
            run.lag = self.lag_since(since)
            run.dsn_lag = self.dsn_lag_since(lag_before)
        run.cpu = {k: v - comp0[k] for k, v in self.component_cpu().items()}
        if pid:
            run.milter_cpu = cpu_seconds(pid) - cpu0
        if capturing:
            after = scrape(metrics_url)
            b, a = eom_buckets(before), eom_buckets(after)
            run.p50 = histogram_quantile(0.50, b, a)
            run.p99 = histogram_quantile(0.99, b, a)
            key = ('postkeep_milter_messages_total{outcome="journaled"}' if journaled
                   else 'postkeep_milter_messages_total{outcome="captured"}')
            run.captured = int(after.get(key, 0) - before.get(key, 0))
            run.packs = int(after.get("postkeep_milter_packs_total", 0)
                            - before.get("postkeep_milter_packs_total", 0))
            if journaled:  # fdatasyncs in the milter; the drain's PUTs, in postkeep-storage
                run.syncs = int(after.get("postkeep_journal_fdatasyncs_total", 0)
                                - before.get("postkeep_journal_fdatasyncs_total", 0))
                stored = scrape(storage_url)
                run.packs = int(stored.get("postkeep_spool_packs_total", 0)
                                - lag_before.get("postkeep_spool_packs_total", 0))
            key = 'postkeep_milter_commit_linger_total{decision="waited"}'
            run.lingered = int(after.get(key, 0) - before.get(key, 0))
            run.signed = int(sum(v - before.get(k, 0) for k, v in after.items()
                                 if k.startswith("postkeep_milter_dkim_signatures_total")))
            if run.captured != n:
                raise SystemExit(f"bench: {config} delivered {n} but the milter captured "
                                 f"{run.captured}: is {sender} an organisation's domain?")
            if config in "ETK" and run.signed:
                raise SystemExit(f"bench: E (capture only) made {run.signed} signatures")
        self.runs.append(run)
        extra = f" cpu {run.milter_cpu:.2f}s" if run.milter_cpu is not None else ""
        if run.signed is not None:
            extra += f" signed {run.signed}"
        if run.packs is not None:
            extra += f" packs {run.packs} lingered {run.lingered}"
        if run.syncs is not None:
            extra += f" fdatasyncs {run.syncs}"
        if run.p50 is not None and run.p99 is not None:
            extra += f" eom p50 {run.p50 * 1000:.1f}ms p99 {run.p99 * 1000:.1f}ms"
        if run.lag is not None:
            extra += f" outcome lag p50 {run.lag[0]:.2f}s p99 {run.lag[1]:.2f}s"
        log(f"{config} {size_name:>6} rep {rep}: {n} msgs in {seconds:.2f}s = "
            f"{run.rate:.0f} msg/s{extra}")
        return run

    def offered_load_lag(self, rate: float, seconds: float, size: int) -> LagPass:
        """T at a fixed offered RATE (open loop) for SECONDS; lag per recipient.

        smtp-source is closed loop: it sends as fast as Postfix accepts, so on a
        saturated host the notices queue up and their lag grows with the run's
        length.  Here messages start on a fixed schedule, one connection each,
        whatever Postfix's pace, as a platform's clients would send.
        """
        self.drain()
        before = scrape(self.env.get("POSTKEEP_STORAGE_METRICS", ""))
        since = time.time() - 0.5
        n = int(rate * seconds)
        started = time.monotonic()
        failed = open_loop(self.env["POSTKEEP_SMTP_HOST"], int(self.env["POSTKEEP_SMTP_PORT"]),
                           rate, n, size)
        sent_for = time.monotonic() - started
        self.await_outcomes(since, n - failed, "lag pass")
        lag = self.lag_since(since)
        lp = LagPass(rate, n, failed, n / sent_for, lag, self.dsn_lag_since(before))
        log(f"lag pass at {rate:.0f} msg/s offered ({lp.achieved:.0f} sent/s, {failed} "
            f"refused): accepted->row p50 {lag[0]:.2f}s p99 {lag[1]:.2f}s")
        return lp

    def rss_run(self, label: str, n: int, size: int, sessions: int,
                message_file: str | None = None) -> tuple[int, int, int]:
        """(baseline KiB, peak KiB, samples) of the capture milter over one run."""
        self.drain()
        base = rss_kib(self.milter_pid)
        sampler = RssSampler(self.milter_pid)
        sampler.start()
        seconds = self.send(n, size, sessions=sessions, message_file=message_file)
        time.sleep(0.3)
        peak = sampler.stop()
        log(f"RSS {label}: {n} msgs/{sessions} sessions in {seconds:.1f}s, "
            f"baseline {base / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB "
            f"({sampler.samples} samples)")
        return base, peak, sampler.samples


# ---------------------------------------------------------------- reporting
def fmt(v: float, digits: int = 0) -> str:
    return f"{v:,.{digits}f}"


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    osr = "?"
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            osr = line.split("=", 1)[1].strip('"')
    postfix = subprocess.run(["postconf", "-dh", "mail_version"], capture_output=True,
                             text=True).stdout.strip()
    load = Path("/proc/loadavg").read_text().split()[:3]
    return (f"{osr}; {os.cpu_count()} x {cpu}; {int(mem) // 1024} MiB RAM; "
            f"Postfix {postfix}; Python {sys.version.split()[0]}; "
            f"load average at start {' '.join(load)}")


def report(bench: Bench, configs: str, rss: list[tuple[str, int, int, int]],
           started: float, header: str, profile: list[str]) -> str:
    names = {"A": "A bare Postfix", "B": "B + OpenDKIM (RSA-2048)",
             "C": "C + postkeep-milter (capture + sign)", "D": "D + null pymilter",
             "E": "E + postkeep-milter (capture only)",
             "T": "T = E + outcome tracking (DSNs to postkeep-storage)",
             "U": "U = T with the DSNs discarded by Postfix",
             "J": "J = C through the journal (accept_after = journal)",
             "K": "K = E through the journal"}
    lines = [header, ""]
    lines += ["## Throughput (messages/s end to end, 20 smtp-source sessions)", "",
              "| size | configuration | median | min | max | reps | N |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for size in SIZES:
        for c in configs:
            rates = [r.rate for r in bench.runs if r.size == size and r.config == c]
            if rates:
                n = next(r.n for r in bench.runs if r.size == size and r.config == c)
                lines.append(f"| {size} | {names[c]} | {fmt(statistics.median(rates))} | "
                             f"{fmt(min(rates))} | {fmt(max(rates))} | {len(rates)} | {n} |")
    lines += ["", "## Paired ratios (median over reps of the ratio within each rep)", "",
              "| size | C/B | C/A | B/A | C/D | E/B | E/A | J/B | K/B |"
              " target C/B and E/B >= 1.0 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for size in SIZES:
        by = {(r.config, r.rep): r.rate for r in bench.runs if r.size == size}
        reps = sorted({rep for (_, rep) in by})

        def ratio(x: str, y: str, by: dict[tuple[str, int], float] = by,
                  reps: list[int] = reps) -> float | None:
            vals = [by[(x, k)] / by[(y, k)] for k in reps if (x, k) in by and (y, k) in by]
            return statistics.median(vals) if vals else None

        cb, ca, ba, cd = ratio("C", "B"), ratio("C", "A"), ratio("B", "A"), ratio("C", "D")
        eb, ea = ratio("E", "B"), ratio("E", "A")
        jb, kb = ratio("J", "B"), ratio("K", "B")
        show = [f"{v:.2f}" if v is not None else "-" for v in (cb, ca, ba, cd, eb, ea, jb, kb)]
        verdict = "-" if cb is None else ("met" if cb >= 1.0 else "NOT met") + (
            "" if eb is None else " / " + ("met" if eb >= 1.0 else "NOT met"))
        lines.append(f"| {size} | {' | '.join(show)} | {verdict} |")
    if "T" in configs:
        lines += ["", "## Outcome tracking: T (capture + DSNs) against E (capture only)", "",
                  "T's run ends when every outcome is recorded. Throughput cost = 1 - T/E "
                  "(median of the paired ratio within each rep; target at most 15%). Lag: "
                  "acceptance to outcome row (per recipient, over all runs' medians), and "
                  "the DSN's Date (1 s resolution) to the row from postkeep-storage's "
                  "histogram (target p99 under 2 s).", "",
                  "| size | T/E | cost | accepted->row p50 | p99 | DSN Date->row p50 | p99 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for size in SIZES:
            by = {(r.config, r.rep): r.rate for r in bench.runs if r.size == size}
            vals = [by[("T", k)] / by[("E", k)] for (c, k) in by if c == "T" and ("E", k) in by]
            ts = [r for r in bench.runs if r.size == size and r.config == "T" and r.lag]
            if not vals or not ts:
                continue
            te = statistics.median(vals)
            lag50 = statistics.median(r.lag[0] for r in ts if r.lag)
            lag99 = statistics.median(r.lag[1] for r in ts if r.lag)
            d50 = statistics.median(r.dsn_lag[0] for r in ts if r.dsn_lag)
            d99 = statistics.median(r.dsn_lag[1] for r in ts if r.dsn_lag)
            lines.append(f"| {size} | {te:.2f} | {(1 - te) * 100:.0f}% | {lag50:.2f} s | "
                         f"{lag99:.2f} s | {d50:.2f} s | {d99:.2f} s |")
    if bench.lag_passes:
        top = statistics.median(r.rate for r in bench.runs if r.config == "T"
                                and r.size == "5 KB")
        lines += ["", "## Outcome lag at a fixed offered load (T, 5 KB, open loop)", "",
                  "smtp-source above is closed loop: on a saturated host the success notices "
                  "queue in Postfix's active queue behind the LMTP deliveries, so the lag "
                  "of a saturated run grows with the run's length. Here messages start on a "
                  "fixed schedule (one connection each, bench/capture_bench.py open_loop) at "
                  f"a fraction of T's median 5 KB throughput in this run ({top:.0f} msg/s). "
                  "Accepted->row is an upper bound of Postfix's delivery->row (the target's "
                  "measure): it includes the message's own time in the queue.", "",
                  "| offered | msg/s offered | sent/s | N | refused | accepted->row p50 | "
                  "p99 | DSN Date->row p50 | p99 | p99 < 2 s |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for lp in bench.lag_passes:
            lines.append(
                f"| {lp.offered / top:.0%} | {lp.offered:.0f} | {lp.achieved:.0f} | {lp.n} | "
                f"{lp.failed} | {lp.lag[0]:.2f} s | {lp.lag[1]:.2f} s | {lp.dsn_lag[0]:.2f} s | "
                f"{lp.dsn_lag[1]:.2f} s | {'met' if lp.lag[1] < 2.0 else 'NOT met'} |")
    if "U" in configs:
        lines += ["", "## Postfix's own share: U (notices made, then discarded) against E", "",
                  "U makes the same success notices as T, but Postfix discards them instead "
                  "of delivering them to postkeep-storage over LMTP. 1 - U/E is what the "
                  "notices cost Postfix alone; the rest of T's cost is the LMTP delivery, "
                  "postkeep-storage and PostgreSQL.", "",
                  "| size | U/E | cost | T/U |", "|---|---:|---:|---:|"]
        for size in SIZES:
            by = {(r.config, r.rep): r.rate for r in bench.runs if r.size == size}
            ue = [by[("U", k)] / by[("E", k)] for (c, k) in by if c == "U" and ("E", k) in by]
            tu = [by[("T", k)] / by[("U", k)] for (c, k) in by if c == "T" and ("U", k) in by]
            if ue:
                u = statistics.median(ue)
                t = f"{statistics.median(tu):.2f}" if tu else "-"
                lines.append(f"| {size} | {u:.2f} | {(1 - u) * 100:.0f}% | {t} |")
    lines += ["", "## CPU per 1,000 messages (utime+stime from /proc/PID/stat, median over reps)",
              "", "| size | OpenDKIM (B) | null pymilter (D) | postkeep-milter (C) | "
              "postkeep minus null | postkeep capture only (E) | journal (J) |"
              " journal capture only (K) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for size in SIZES:
        per = {}
        for c in "BCDEJK":
            vals = [r.milter_cpu / r.n * 1000 for r in bench.runs
                    if r.size == size and r.config == c and r.milter_cpu is not None]
            per[c] = statistics.median(vals) if vals else None
        cells = [f"{per[c]:.2f} s" if per[c] is not None else "-" for c in "BDC"]
        diff = (f"{per['C'] - per['D']:.2f} s" if per["C"] is not None and per["D"] is not None
                else "-")
        only = [f"{per[c]:.2f} s" if per[c] is not None else "-" for c in "EJK"]
        lines.append(f"| {size} | {' | '.join(cells)} | {diff} | {' | '.join(only)} |")
    lines += ["", "## Where the CPU goes, whole machine (ms of CPU per message, median over reps)",
              "", "From /proc/stat (all cores busy time) and /proc/PID/stat of each component "
              "over each run. 'machine' also counts anything else running on this shared VM; "
              "'rest' is machine minus the named components: Postfix (smtpd, cleanup, qmgr, "
              "smtp), smtp-source, smtp-sink and the kernel's share.", "",
              "| size | config | machine | milter | MinIO | PostgreSQL | postkeep-storage | rest |"
              " msg/s at 2 cores if CPU-bound |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for size in SIZES:
        for c in configs:
            rs = [r for r in bench.runs if r.size == size and r.config == c and r.cpu]
            if not rs:
                continue

            def med(f: Callable[[Run], float], rs: list[Run] = rs) -> float:
                return statistics.median(f(r) for r in rs) * 1000

            mach = med(lambda r: r.cpu["machine"] / r.n)
            mil = med(lambda r: (r.milter_cpu or 0.0) / r.n)
            mio = med(lambda r: r.cpu["minio"] / r.n)
            pg = med(lambda r: r.cpu["postgres"] / r.n)
            sto = med(lambda r: r.cpu.get("storage", 0.0) / r.n)
            rest = med(lambda r: (r.cpu["machine"] - (r.milter_cpu or 0.0) - r.cpu["minio"]
                                  - r.cpu["postgres"] - r.cpu.get("storage", 0.0)) / r.n)
            lines.append(f"| {size} | {c} | {mach:.2f} | {mil:.2f} | {mio:.2f} | {pg:.2f} | "
                         f"{sto:.2f} | {rest:.2f} | {2000 / mach:.0f} |")
    lines += ["", "## Pack PUTs per 1,000 messages (postkeep_milter_packs_total deltas; J and K:"
              " the drain's postkeep_spool_packs_total; median over reps; every bench message"
              " is small and outbound, so packed)", "",
              "| size | config | pack PUTs per 1,000 messages | batches that lingered per 1,000 "
              "| J, K: journal fdatasyncs per 1,000 messages |",
              "|---|---|---:|---:|---:|"]
    for size in SIZES:
        for c in configs:
            rs = [r for r in bench.runs if r.size == size and r.config == c
                  and r.packs is not None]
            if rs:
                puts = statistics.median((r.packs or 0) / r.n * 1000 for r in rs)
                waited = statistics.median((r.lingered or 0) / r.n * 1000 for r in rs)
                syncs = ("-" if any(r.syncs is None for r in rs) else
                         f"{statistics.median((r.syncs or 0) / r.n * 1000 for r in rs):.0f}")
                lines.append(f"| {size} | {c} | {puts:.0f} | {waited:.0f} | {syncs} |")
    lines += ["", "## postkeep-milter end-of-message latency (C and J runs)", "",
              f"From `{EOM_METRIC}` bucket deltas before/after each run, linearly "
              "interpolated inside the bucket (buckets 1, 2.5, 5, 10, 25, 50, 100, 250 ms...), "
              "so the figures are only as fine as the buckets; median over reps.", "",
              "| size | config | p50 | p99 |", "|---|---|---:|---:|"]
    for size in SIZES:
        for c in "CJ":
            p50 = [r.p50 for r in bench.runs
                   if r.size == size and r.config == c and r.p50 is not None]
            p99 = [r.p99 for r in bench.runs
                   if r.size == size and r.config == c and r.p99 is not None]
            if p50 and p99:
                lines.append(f"| {size} | {c} | {statistics.median(p50) * 1000:.1f} ms | "
                             f"{statistics.median(p99) * 1000:.1f} ms |")
    if rss:
        lines += ["", "## postkeep-milter memory (VmRSS sampled every 50 ms during the run)", "",
                  "| messages | baseline | peak | peak - baseline | samples |",
                  "|---|---:|---:|---:|---:|"]
        for label, base, peak, samples in rss:
            lines.append(f"| {label} | {base / 1024:.0f} MiB | {peak / 1024:.0f} MiB | "
                         f"{(peak - base) / 1024:.0f} MiB | {samples} |")
    lines += ["", "## Every run", "", "| size | config | rep | N | seconds | msg/s | "
              "milter CPU s | eom p50 ms | eom p99 ms | DKIM-signed |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in bench.runs:
        cpu = f"{r.milter_cpu:.2f}" if r.milter_cpu is not None else "-"
        e50 = f"{r.p50 * 1000:.1f}" if r.p50 is not None else "-"
        e99 = f"{r.p99 * 1000:.1f}" if r.p99 is not None else "-"
        signed = str(r.signed) if r.signed is not None else "-"
        lines.append(f"| {r.size} | {r.config} | {r.rep} | {r.n} | {r.seconds:.2f} | "
                     f"{r.rate:.0f} | {cpu} | {e50} | {e99} | {signed} |")
    lines += profile
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    lines += ["", f"Wall time of the measurements: {(time.monotonic() - started) / 60:.1f} min; "
              f"load average at the end {load} (other work on this VM shows up here).", ""]
    return "\n".join(lines)


# Leaf-first: the first frame (from the innermost out) that matches names the category.
# py-spy names a frame "function (path/to/file.py:line)": "/file.py:" matches the file.
CATEGORIES = (
    ("S3 PUT: minio-py, urllib3, http.client, socket send/recv", (
        "minio/", "urllib3/", "http/client.py", "certifi/", "/socket.py:", "/ssl.py:")),
    ("PostgreSQL: psycopg, psycopg_pool", ("psycopg/", "psycopg_pool/", "/messages.py:")),
    ("sealing (AES-GCM, STREAM segments)", ("/sealing.py:", "/sealed_stream.py:",
                                            "/sealed_objects.py:")),
    ("journal / outage spool: write, read, drain", ("/spool.py:", "/journal.py:")),
    ("group commit, packs, linger", ("/committer.py:", "/packing.py:", "/packs.py:",
                                     "/linger.py:")),
    ("DKIM: relaxed body hash, header canonicalisation, RSA signing", (
        "/dkim.py:", "/signing.py:", "cryptography/")),
    ("capture: zstd, sha256, spool file", ("/capture.py:", "/tempfile.py:", "zstandard")),
    ("logging", ("logging/",)),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("ids, classify, directory cache, persist glue", (
        "/ids.py:", "/decide.py:", "/store.py:", "/directory.py:", "email/utils.py",
        "email/_parseaddr.py", "/uuid.py:")),
    ("service / adapter glue", ("/service.py:", "/adapter.py:")),
    ("pymilter dispatch (Milter/__init__.py)", ("Milter/",)),
)
NO_FRAME = "no Python frame (GIL held in C: pymilter's callback glue, thread hand-offs)"


def categorise(stack: list[str]) -> str:
    if not any(f.strip() for f in stack):
        return NO_FRAME
    for frame in reversed(stack):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other"


def _interrupt(proc: subprocess.Popen[str], timeout: float) -> None:
    """SIGINT a profiler (py-spy, perf: it writes its output and exits); killed
    if it has not within TIMEOUT seconds."""
    proc.send_signal(2)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def _summarise_pyspy(raw: Path) -> tuple[Counter[str], Counter[str], int]:
    """(samples by category, by innermost frame, total) of a py-spy raw file."""
    cats: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack_text.split(";")
        k = int(count)
        total += k
        cats[categorise(frames)] += k
        leaves[frames[-1].strip() or NO_FRAME] += k
    return cats, leaves, total


def pyspy_profile(bench: Bench, pyspy: str, n: int, out: Path, config: str = "C") -> list[str]:
    """py-spy over one CONFIG run (C or J: capture and sign) of N 5 KB messages:
    the milter's GIL-holding samples and, for J, postkeep-storage's (the drain)
    on-CPU samples of every thread."""
    bench.use(config)
    bench.drain()
    pid = bench.journal_pid if config in "JK" else bench.milter_pid
    targets = [("postkeep-milter", pid, ["--gil"], out.with_suffix(".pyspy.txt"))]
    if config in "JK" and bench.storage_pid:
        targets.append(("postkeep-storage (the drain)", bench.storage_pid, ["--gil"],
                        out.with_suffix(".storage.pyspy.txt")))
    spies = [(name, raw, subprocess.Popen(
        [pyspy, "record", *flags, "-r", "250", "-f", "raw", "-o", str(raw), "-p", str(p)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        for name, p, flags, raw in targets]
    time.sleep(1.0)
    seconds = bench.send(n, SIZES["5 KB"])
    if config in "JK":
        bench.drain_spool()
    lines: list[str] = []
    for name, raw, spy in spies:
        _interrupt(spy, 30)
        if not raw.exists():
            err = spy.stderr.read() if spy.stderr else ""
            lines += ["", f"py-spy produced no profile of {name}: {err[-300:]}"]
            continue
        cats, leaves, total = _summarise_pyspy(raw)
        raw.unlink()
        if not total:
            lines += ["", f"py-spy recorded no samples of {name}."]
            continue
        lines += ["", f"## py-spy profile of {name} (one {config} run, 5 KB)", "",
                  f"`py-spy record --gil -r 250` over {n} messages ({n / seconds:.0f} msg/s,"
                  " slowed by py-spy): only samples of the thread holding the GIL. In the"
                  " milter py-spy counts most of them with no Python frame; `BENCH_PERF=1`"
                  " (perf) shows where that CPU really goes. Samples are grouped by the"
                  f" innermost frame that belongs to a known part. {total} samples.", "",
                  "| part | share of samples | share of those with a Python frame |",
                  "|---|---:|---:|"]
        framed = max(total - cats.get(NO_FRAME, 0), 1)
        for part, k in cats.most_common():
            second = "-" if part == NO_FRAME else f"{100 * k / framed:.0f}%"
            lines.append(f"| {part} | {100 * k / total:.0f}% | {second} |")
        lines += ["", "Top functions by own samples:", "", "| function | share |",
                  "|---|---:|"]
        for frame, k in leaves.most_common(12):
            lines.append(f"| `{frame.replace('|', '/')}` | {100 * k / total:.1f}% |")
    return lines


PERF_PARTS = (  # (label, test on perf's dso name), first match wins
    ("kernel", lambda d: d.startswith("[kernel")),
    ("libcrypto (RSA, AES-GCM, SHA-256)", lambda d: d.startswith("libcrypto")),
    ("Python interpreter (libpython / python3)", lambda d: d.startswith(("libpython", "python3"))),
    ("zstd", lambda d: "zstd" in d),
    ("libc (malloc, memcpy, pthread)", lambda d: d.startswith(("libc.so", "libc-", "ld-linux"))),
    ("libmilter + pymilter's C module", lambda d: "milter" in d),
)


def perf_part(dso: str) -> str:
    for label, match in PERF_PARTS:
        if match(dso):
            return label
    return "other (" + dso + ")"


def perf_profile(bench: Bench, perf: str, n: int, out: Path, configs: str) -> list[str]:
    """perf (on-CPU samples of every thread, native code and kernel included) over
    one 5 KB run per configuration in CONFIGS: where the filter's CPU goes, by
    shared object, beside OpenDKIM's.  Unlike py-spy it sees libmilter's threads,
    the GIL's futex hand-offs and C extensions as what they are."""
    pids = {"B": bench.dkim_pid, "C": bench.milter_pid, "D": bench.null_pid,
            "E": bench.milter_pid, "J": bench.journal_pid, "K": bench.journal_pid}
    lines = ["", "## perf profile: where each filter's CPU goes (one run each, 5 KB)", "",
             f"`perf record -F 997 -p PID` over {n} messages per configuration; "
             "`perf report --no-children --sort dso`. ms/message = the share times the "
             "process's utime+stime over the run, divided by N.", ""]
    table: dict[str, dict[str, float]] = {}
    kernel_top: dict[str, list[tuple[str, float]]] = {}
    python_top: dict[str, list[tuple[str, float]]] = {}
    for config in configs:
        pid = pids.get(config)
        if not pid:
            continue
        bench.use(config)
        bench.drain()
        data = out.with_suffix(f".{config}.perf.data")
        rec = subprocess.Popen([perf, "record", "-F", "997", "-o", str(data), "-p", str(pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        cpu0 = cpu_seconds(pid)
        bench.send(n, SIZES["5 KB"], sender=sender_for(config))
        if config in "JK":
            bench.drain_spool()
        cpu = cpu_seconds(pid) - cpu0
        _interrupt(rec, 60)
        if not data.exists():
            err = rec.stderr.read() if rec.stderr else ""
            lines.append(f"perf produced no profile for {config}: {err[-300:]}")
            continue

        def report_rows(*sort: str, dso: str = "", data: Path = data
                        ) -> list[tuple[float, list[str]]]:
            cmd = [perf, "report", "-i", str(data), "--stdio", "--no-children",
                   "--sort", ",".join(sort), "-q", "--percent-limit", "0.5"]
            if dso:
                cmd += ["--dsos", dso]
            text = subprocess.run(cmd, capture_output=True, text=True).stdout
            rows = []
            for row in text.splitlines():
                fields = row.split()
                if fields and fields[0].endswith("%"):
                    rows.append((float(fields[0][:-1]), fields[1:]))
            return rows

        parts: Counter[str] = Counter()
        for share, fields in report_rows("dso"):
            parts[perf_part(fields[0] if fields else "?")] += share
        table[config] = {k: v * cpu / 100 / n * 1000 for k, v in parts.items()}
        table[config]["total"] = cpu / n * 1000
        kernel_top[config] = [(" ".join(f[1:]), s) for s, f in
                              report_rows("sym", dso="[kernel.kallsyms]")[:8]]
        python_top[config] = [(" ".join(f[1:]), s) for s, f in
                              report_rows("dso,sym")
                              if f and f[0].startswith(("libpython", "python3"))][:8]
        data.unlink()
    if not table:
        return [*lines, "perf recorded nothing."]
    names = sorted({k for t in table.values() for k in t if k != "total"},
                   key=lambda k: -max(t.get(k, 0.0) for t in table.values()))
    cols = list(table)
    lines += ["| CPU ms per message | " + " | ".join(cols) + " |",
              "|---|" + "---:|" * len(cols)]
    for name in [*names, "total"]:
        lines.append(f"| {name} | " + " | ".join(f"{table[c].get(name, 0.0):.2f}" for c in cols)
                     + " |")
    for title, tops in (("kernel symbols", kernel_top), ("Python interpreter symbols",
                                                         python_top)):
        for c in cols:
            if tops.get(c):
                lines += ["", f"{c}: top {title} (share of all the filter's samples): "
                          + ", ".join(f"`{sym}` {s:.1f}%" for sym, s in tops[c])]
    return lines


def base64_message(path: Path, total: int) -> None:
    """A message of about TOTAL bytes whose body is base64 of random bytes
    (an incompressible attachment, unlike smtp-source's repeated 'X' lines)."""
    import base64
    head = (b"From: <sender@bench.example>\nTo: <rcpt@sink.example>\n"
            b"Subject: bench attachment\nMIME-Version: 1.0\n"
            b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n")
    raw = os.urandom((total - len(head)) * 76 // 78 * 3 // 4)
    b64 = base64.b64encode(raw)
    body = b"\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
    path.write_bytes(head + body + b"\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--env", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sink-out", required=True)
    ap.add_argument("--sink-port", type=int, required=True)
    ap.add_argument("--milter-pidfile", required=True)
    ap.add_argument("--dkim-milter", required=True)
    ap.add_argument("--dkim-pid", type=int, required=True)
    ap.add_argument("--null-milter", required=True)
    ap.add_argument("--null-milter-pidfile", required=True)
    ap.add_argument("--journal-milter", default="",
                    help="J, K: the journaling postkeep-milter's socket (inet:HOST:PORT)")
    ap.add_argument("--journal-milter-pidfile", default="")
    ap.add_argument("--journal-metrics", default="", help="its /metrics URL")
    ap.add_argument("--reuse-connections", action="store_true",
                    help="smtp-source -d: each session sends its messages over one SMTP"
                         " (and so one milter) connection, instead of one per message")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-small", type=int, default=2500)
    ap.add_argument("--n-large", type=int, default=1500)
    ap.add_argument("--configs", default="ABCD")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--lag-loads", default="0.5,0.8,0.9",
                    help="T's lag passes: offered loads as fractions of T's 5 KB median "
                         "throughput (comma-separated; empty: none)")
    ap.add_argument("--lag-seconds", type=float, default=30.0)
    ap.add_argument("--code", default="?", help="which tree the milter runs (for the record)")
    ap.add_argument("--py-spy", default="", help="py-spy binary; profile one run if given")
    ap.add_argument("--perf", default="", help="perf binary; a native profile if given")
    ap.add_argument("--perf-configs", default="BJ",
                    help="which configurations perf profiles, one 5 KB run each")
    ap.add_argument("--profile-config", default="C", choices=["C", "J"],
                    help="which configuration py-spy profiles (J: the journaling milter)")
    args = ap.parse_args()

    env = read_env(args.env)
    stack = Path(env["POSTKEEP_STACK_DIR"])
    minio_pid = int((stack / "minio" / "minio.pid").read_text().split()[0])
    postgres_pid = int((stack / "pg" / "data" / "postmaster.pid").read_text().split()[0])
    milter_pid = int(Path(args.milter_pidfile).read_text().split()[0])
    null_pid = int(Path(args.null_milter_pidfile).read_text().split()[0])
    capture_milter = subprocess.run(
        ["postconf", "-c", env["POSTKEEP_POSTFIX_CONFIG_DIR"], "-h", "smtpd_milters"],
        check=True, capture_output=True, text=True).stdout.strip()
    if not capture_milter:
        raise SystemExit("bench: the stack's smtpd_milters is empty: no postkeep-milter wired")
    command_filter = subprocess.run(
        ["postconf", "-c", env["POSTKEEP_POSTFIX_CONFIG_DIR"], "-h", "smtpd_command_filter"],
        check=True, capture_output=True, text=True).stdout.strip()
    if ("T" in args.configs or "U" in args.configs) and not command_filter:
        raise SystemExit("bench: T and U need the bundle's smtpd_command_filter; the stack"
                         " has none")
    transport_maps = subprocess.run(
        ["postconf", "-c", env["POSTKEEP_POSTFIX_CONFIG_DIR"], "-h", "transport_maps"],
        check=True, capture_output=True, text=True).stdout.strip()
    if ("J" in args.configs or "K" in args.configs) and not args.journal_milter:
        raise SystemExit("bench: J and K need --journal-milter (bench/run.sh starts one)")
    for key, value in env.items():  # psql-style variables for psycopg (T's queries)
        if key.startswith("PG"):
            os.environ[key] = value
    bench = Bench(env, Path(args.sink_out), args.sink_port, milter_pid, args.dkim_pid, null_pid,
                  {"A": "", "B": args.dkim_milter, "C": capture_milter, "D": args.null_milter,
                   "E": capture_milter, "T": capture_milter, "U": capture_milter,
                   "J": args.journal_milter, "K": args.journal_milter},
                  minio_pid, postgres_pid, command_filter,
                  int((stack / "storage" / "storage.pid").read_text().split()[0])
                  if (stack / "storage" / "storage.pid").exists() else 0,
                  transport_maps,
                  int(Path(args.journal_milter_pidfile).read_text().split()[0])
                  if args.journal_milter_pidfile else 0, args.journal_metrics,
                  args.reuse_connections)
    header = "\n".join([
        f"# postkeep capture benchmark, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        "",
        f"- Machine: {machine()}",
        "- Command: `make bench` (bench/run.sh)",
        f"- postkeep code under test: {args.code}",
        f"- Load: `smtp-source {'-d ' if args.reuse_connections else ''}-s {SESSIONS} -m N"
        " -l SIZE -f sender@bench.example "
        f"-t rcpt@sink.example 127.0.0.1:{env['POSTKEEP_SMTP_PORT']}` into the bench stack's "
        f"Postfix, relaying to `smtp-sink -c` on 127.0.0.1:{args.sink_port}.",
        f"- Alternation: {' '.join(args.configs)} repeated {args.reps} times per size; "
        "queue drained before every run; throughput = N / (start of smtp-source until "
        "smtp-sink has counted N).",
        "- smtp-source bodies are repeated 'X' lines: zstd compresses them ~100x, so "
        "compression cost here is a lower bound for real mail.",
    ])
    started = time.monotonic()

    # Warm-up: every configuration once, small, unmeasured (connections, caches).
    for c in args.configs:
        bench.use(c)
        bench.send(200, SIZES["5 KB"])
    bench.runs.clear()

    for size_name, n in (("5 KB", args.n_small), ("100 KB", args.n_large)):
        for rep in range(1, args.reps + 1):
            for c in args.configs:
                bench.use(c)
                bench.measured_run(c, size_name, rep, n)

    t_rates = [r.rate for r in bench.runs if r.config == "T" and r.size == "5 KB"]
    if t_rates and args.lag_loads:
        bench.use("T")
        top = statistics.median(t_rates)
        for frac in (float(f) for f in args.lag_loads.split(",")):
            bench.lag_passes.append(
                bench.offered_load_lag(frac * top, args.lag_seconds, SIZES["5 KB"]))

    rss: list[tuple[str, int, int, int]] = []
    if not args.skip_rss:
        bench.use("C")
        big = 9_500_000
        rss.append(("300 x 10 KB, 5 sessions", *bench.rss_run("10 KB", 300, 10 * 1024, 5)))
        rss.append(("30 x 9.5 MB smtp-source 'X' body, 5 sessions",
                    *bench.rss_run("9.5 MB X", 30, big, 5)))
        msg = Path(args.out).with_suffix(".b64.eml")
        base64_message(msg, big)
        try:
            rss.append(("30 x 9.5 MB base64 random body (incompressible), 5 sessions",
                        *bench.rss_run("9.5 MB b64", 30, big, 5, message_file=str(msg))))
        finally:
            msg.unlink()
    profile: list[str] = []
    if args.py_spy:
        profile = pyspy_profile(bench, args.py_spy, args.n_small, Path(args.out),
                                args.profile_config)
    if args.perf:
        profile += perf_profile(bench, args.perf, args.n_small, Path(args.out),
                                args.perf_configs)
    bench.use("T")  # leave the stack as `stack.sh up` wired it (command filter on)

    text = report(bench, args.configs, rss, started, header, profile)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
