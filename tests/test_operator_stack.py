"""The operator's surface on the running stack: what the daemons' /metrics and
logs show (issue 16, Monitoring and Logs).

- every error counter is on /metrics at zero from start, with its known labels;
- `postkeep_build_info{version, daemon}` on every daemon;
- the outage spool's gauges come from one daemon only (a sum() counts once);
- every series the alert rules name, and every metric the dashboard names, is
  exported by a daemon (tests/test_monitoring.py checks the same on the code);
- one message is found by its pk id and its Postfix queue id in the milter's
  capture line, postkeep-storage's outcome line and Postfix's own log, with no
  flufl.bounce chatter in postkeep-storage's log.
"""

from __future__ import annotations

import re
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.sidecar import LogWatch, deliver, log_path, relayed_message
from support.stack import Stack

from postkeep import __version__

pytestmark = pytest.mark.stack

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
DAEMONS = {"milter": "POSTKEEP_MILTER_METRICS", "policyd": "POSTKEEP_POLICYD_METRICS",
           "storage": "POSTKEEP_STORAGE_METRICS"}
ERROR_SAMPLE = re.compile(r"_(errors|failures|timeouts|refused|unsigned)_total$")
# Selectors of the alert rules: a name, and its exact label matchers if any.
SELECTOR = re.compile(r"\b(postkeep_[a-z0-9_]+)(?:\{([^}]*)\})?")
# Labelled error counters a daemon must show at zero before the first failure,
# so that rate() and increase() in the alert rules see it.
AT_ZERO = {
    "milter": [
        'postkeep_milter_backend_errors_total{backend="s3"}',
        'postkeep_milter_backend_errors_total{backend="postgres"}',
        'postkeep_milter_commit_timeouts_total{backend="s3"}',
        'postkeep_milter_dkim_unsigned_total{reason="no_key"}',
        'postkeep_milter_dkim_unsigned_total{reason="foreign_from"}',
        'postkeep_milter_messages_total{outcome="tempfailed"}',
        'postkeep_milter_messages_total{outcome="report"}',
        'postkeep_milter_unknown_login_total{outcome="refused"}',
        "postkeep_milter_spool_refused_total",
    ],
    "policyd": [
        "postkeep_policyd_backend_errors_total",
        "postkeep_policyd_protocol_errors_total",
        'postkeep_policyd_degraded_decisions_total{mode="share"}',
        'postkeep_policyd_requests_total{action="defer",stage="RCPT"}',
    ],
    "storage": [
        'postkeep_storage_report_errors_total{backend="postgres"}',
        'postkeep_storage_report_errors_total{backend="s3"}',
        'postkeep_storage_report_errors_total{backend="forward_relay"}',
        'postkeep_storage_report_errors_total{backend="parser"}',
        'postkeep_storage_forwarded_total{result="failed"}',
        'postkeep_spool_drain_failures_total{reason="rejected"}',
        'postkeep_retention_runs_total{result="failed"}',
        'postkeep_retention_runs_total{result="errors"}',
        'postkeep_storage_upkeep_runs_total{job="orphans",result="failed"}',
    ],
}


def scrape(stack: Stack, daemon: str) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    """Sample name -> {label set: value} on DAEMON's /metrics."""
    with urllib.request.urlopen(stack.env[DAEMONS[daemon]], timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    for family in text_string_to_metric_families(text):
        # A family with no sample yet (a labelled counter never used) is listed
        # under its sample names with no series.
        for suffix in {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")
                       }.get(family.type, ("",)):
            out.setdefault(family.name + suffix, {})
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def has(samples: dict[str, dict[frozenset[tuple[str, str]], float]], selector: str) -> bool:
    """A sample matching SELECTOR (`name` or `name{a="x",b="y"}`, exact label values)."""
    m = SELECTOR.fullmatch(selector)
    assert m, selector
    want = set(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
    return any(want <= set(labels) for labels in samples.get(m.group(1), {}))


@pytest.fixture(scope="module")
def metrics(stack: Stack) -> dict[str, dict[str, dict[frozenset[tuple[str, str]], float]]]:
    return {d: scrape(stack, d) for d in DAEMONS}


def test_every_error_counter_is_exported_at_zero_from_start(
        metrics: dict[str, dict[str, dict[frozenset[tuple[str, str]], float]]]) -> None:
    for daemon, selectors in AT_ZERO.items():
        missing = [s for s in selectors if not has(metrics[daemon], s)]
        assert not missing, f"postkeep-{daemon} lacks {missing}"
    for daemon, samples in metrics.items():
        empty = [n for n, series in samples.items() if ERROR_SAMPLE.search(n) and not series]
        assert not empty, f"postkeep-{daemon}: error counters without a sample: {empty}"


def test_every_daemon_exports_its_build_info(
        metrics: dict[str, dict[str, dict[frozenset[tuple[str, str]], float]]]) -> None:
    for daemon, samples in metrics.items():
        series = samples.get("postkeep_build_info", {})
        want = frozenset({("version", __version__), ("daemon", daemon)})
        assert series.get(want) == 1.0, f"postkeep-{daemon}: build info {series}"


def test_spool_gauges_come_from_one_daemon(
        metrics: dict[str, dict[str, dict[frozenset[tuple[str, str]], float]]]) -> None:
    """The milter and postkeep-storage both read the same spool directory; only the
    drain (storage) serves its gauges, so sum(postkeep_spool_entries) counts once."""
    for gauge in ("postkeep_spool_entries", "postkeep_spool_bytes",
                  "postkeep_spool_oldest_entry_age_seconds"):
        serving = [d for d, samples in metrics.items() if gauge in samples]
        assert serving == ["storage"], (gauge, serving)


def test_every_series_the_alerts_and_dashboard_name_is_exported(
        metrics: dict[str, dict[str, dict[frozenset[tuple[str, str]], float]]]) -> None:
    merged: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    for samples in metrics.values():
        for name, series in samples.items():
            merged.setdefault(name, {}).update(series)
    # The expressions only, not the annotations' prose or comments.
    rules = "\n".join(
        line for line in (MONITORING / "postkeep-alerts.yml").read_text().splitlines()
        if not line.strip().startswith(("#", "summary:", "description:")))
    # Alerts: the exact series (equality matchers) exist, or rate() would miss
    # the first event.  Regex matchers (=~) are checked by name only.
    selectors = {m.group(0) if m.group(2) and "~" not in m.group(2) else m.group(1)
                 for m in SELECTOR.finditer(rules)}
    missing = sorted(s for s in selectors if not has(merged, s))
    assert not missing, f"alert rules name series no daemon exports: {missing}"
    # The dashboard: names only (some labels appear with traffic, e.g. a tier).
    names = set(re.findall(r"\bpostkeep_[a-z0-9_]+",
                           (MONITORING / "postkeep-dashboard.json").read_text()))
    absent = sorted(n for n in names if n not in merged)
    assert not absent, f"dashboard names metrics no daemon exports: {absent}"


def test_one_message_is_found_by_pk_id_and_queue_id_in_every_log(stack: Stack) -> None:
    milter_log = LogWatch(log_path(stack, "milter"))
    storage_log = LogWatch(log_path(stack, "storage"))
    postfix_log = LogWatch(Path(stack.env["POSTKEEP_POSTFIX_LOG"]))
    _, domain = stack.new_org("basic")
    tag = uuid.uuid4().hex[:8]
    # Through Postfix; returns once Postfix's success notice was recorded.
    mid, path = relayed_message(stack, domain, [f"logs-{tag}@sink.test"])
    with stack.connect() as conn:
        row = conn.execute("SELECT queue_id FROM messages WHERE id = %s", (mid,)).fetchone()
    assert row is not None
    qid, pk = str(row[0]), mid.hex

    capture = milter_log.wait_for(rf"(?m)^[^\n]* INFO captured pk_id={pk} queue_id={qid} [^\n]*")
    outcome = storage_log.wait_for(
        rf"(?m)^[^\n]* INFO report recorded report=\w+ pk_id={pk} queue_id={qid} kind=dsn"
        rf" outcomes=logs-{tag}@sink\.test:relayed[^\n]*")
    # Postfix's log names the message by queue id, and pk id in the return path.
    postfix_log.wait_for(rf"{qid}: from=<pk-{pk}-[^>]+>")
    for line in (capture.group(0), outcome.group(0)):
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z postkeep-\w+\[\d+\] ", line), line

    # A bounce in no standard format goes through flufl.bounce's detectors,
    # which log a line per detector at INFO: none may reach the log.
    bounce = (f"From: MAILER-DAEMON@remote.example\r\nTo: {path}\r\n"
              "Subject: failure notice\r\n\r\n"
              "Hi. This is the qmail-send program at remote.example.\r\n"
              "I'm afraid I wasn't able to deliver your message to the following addresses.\r\n"
              "This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n"
              f"<logs-{tag}@sink.test>:\r\nSorry, no mailbox here by that name.\r\n").encode()
    reply = deliver(stack, path, bounce)
    assert reply.code == 250, reply
    storage_log.wait_for(rf"report (recorded|unmatched) report=\w+ pk_id={pk} queue_id=- "
                         r"kind=async_bounce")
    text = storage_log.text()
    assert "Running detector" not in text and "flufl" not in text, text[-2000:]
    for line in text.splitlines() + milter_log.text().splitlines():
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z postkeep-\w+\[\d+\] [A-Z]+ ",
                        line), f"not one line per event: {line!r}"
