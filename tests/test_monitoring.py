"""monitoring/: the alert rules pass promtool, each alert is shown to fire and to
stay quiet on a healthy fleet, and every metric the rules and the dashboard name
is one the daemons' code registers (tests/test_operator_stack.py checks the same
names on the running daemons' /metrics).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.unit

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
RULES = MONITORING / "postkeep-alerts.yml"
RULE_TESTS = MONITORING / "postkeep-alerts.test.yml"
DASHBOARD = MONITORING / "postkeep-dashboard.json"
METRIC_NAME = re.compile(r"\bpostkeep_[a-z0-9_]+")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: devstack/stack.sh install installs Debian's prometheus"
    return subprocess.run([exe, *args], cwd=MONITORING, capture_output=True, text=True,
                          timeout=120)


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\S+)$", RULES.read_text(), re.MULTILINE)


def rule_exprs() -> list[str]:
    """Every expr of the rules file: inline, or a `|` block (its more-indented lines)."""
    exprs: list[str] = []
    lines = RULES.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr: (.*)$", line)
        if not m:
            continue
        if m.group(2).strip() != "|":
            exprs.append(m.group(2))
            continue
        indent, body = len(m.group(1)), []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            body.append(nxt.strip())
        exprs.append(" ".join(body))
    return exprs


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    out = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    out += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return out


def registered_samples() -> set[str]:
    """Sample names the daemons' metric modules register (as /metrics shows them)."""
    from prometheus_client import REGISTRY

    import postkeep.milter.metrics
    import postkeep.policyd.metrics
    import postkeep.storage.content.spool
    import postkeep.storage.sidecar.lmtp
    import postkeep.storage.sidecar.retention_job
    import postkeep.storage.sidecar.upkeep  # (each registers its metrics on import)

    # The spool's gauges are read from the directory at scrape time.
    spool_registry = CollectorRegistry()
    spool_registry.register(postkeep.storage.content.spool.SpoolCollector(
        postkeep.storage.content.spool.Spool(str(Path("/nonexistent-postkeep-spool")))))
    names: set[str] = set()
    for registry in (REGISTRY, spool_registry):
        for family in registry.collect():
            # A labelled family has no sample until a label is used: its names
            # are those of its type (the stack test checks the samples).
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                        "gauge": ("",)}.get(family.type, ("",))
            names |= {family.name + s for s in suffixes}
            names |= {s.name for s in family.samples}
    return {n for n in names if n.startswith("postkeep_")}


def test_promtool_checks_the_rules() -> None:
    res = promtool("check", "rules", RULES.name)
    assert res.returncode == 0, res.stdout + res.stderr
    # The rules this test file reads are the rules promtool found.
    assert f"SUCCESS: {len(alert_names())} rules found" in res.stdout, res.stdout


def test_promtool_unit_tests_pass() -> None:
    res = promtool("test", "rules", RULE_TESTS.name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_each_alert_is_shown_firing_and_quiet_when_healthy() -> None:
    text = RULE_TESTS.read_text()
    healthy, _, firing = text.partition("  - name: daemon missing\n")
    quiet = set(re.findall(r"alertname: (\S+), exp_alerts: \[\]", healthy))
    fires = set(re.findall(r"alertname: (\S+)\n\s+exp_alerts:\n\s+- exp_labels", firing))
    names = set(alert_names())
    assert len(names) == len(alert_names()), "an alert name is used twice"
    assert names - quiet == set(), "alerts with no healthy-fleet case"
    assert names - fires == set(), "alerts no test shows firing"


def test_every_metric_named_in_rules_and_dashboard_is_exported() -> None:
    exported = registered_samples()
    named = {n for e in rule_exprs() + dashboard_exprs() for n in METRIC_NAME.findall(e)}
    assert len(rule_exprs()) == len(alert_names())
    assert named - exported == set(), f"not exported by any daemon: {named - exported}"
    assert {"postkeep_build_info", "postkeep_spool_entries",
            "postkeep_milter_backend_errors_total"} <= named


def test_the_dashboard_is_grafana_json() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "postkeep-overview" and doc["panels"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in doc["panels"]:
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel's query, Grafana's variables filled in, parses as PromQL: promtool
    checks it as the expression of a recording rule."""
    grafana = {"$__rate_interval": "5m", "$instance": ".*"}
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    doc = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for i, q in enumerate(queries):
        for var, value in grafana.items():
            q = q.replace(var, value)
        assert "$" not in q, q
        lines += [f"      - record: dashboard:query{i}", f"        expr: {json.dumps(q)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    exe = shutil.which("promtool")
    assert exe
    res = subprocess.run([exe, "check", "rules", str(rules)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(queries)} rules found" in res.stdout
