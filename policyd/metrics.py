"""Prometheus metrics of postkeep-policyd (served on [policyd].metrics_listen)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from postkeep import build_info

REQUESTS = Counter(
    "postkeep_policyd_requests_total",
    "Policy requests answered, by protocol_state (RCPT, DATA, END-OF-MESSAGE, other)"
    " and action (dunno, defer, refuse: a 5xx for an invalid request).",
    ["stage", "action"],
)
DECISION_SECONDS = Histogram(
    "postkeep_policyd_decision_duration_seconds",
    "Time from a complete request to its answer (lookup + counters).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
DEFERRALS = Counter(
    "postkeep_policyd_deferrals_total",
    "Requests over a limit, by tier, limit kind (messages, recipients, bytes) and"
    " whether they were deferred or only logged (shadow).",
    ["tier", "kind", "mode"],
)
DEGRADED = Counter(
    "postkeep_policyd_degraded_decisions_total",
    "Decisions taken without PostgreSQL, by degraded mode (share, open, closed, unknown_org).",
    ["mode"],
)
PROTOCOL_ERRORS = Counter(
    "postkeep_policyd_protocol_errors_total",
    "Connections closed for hostile or malformed input, or a stalled client.",
)
INVALID_REQUESTS = Counter(
    "postkeep_policyd_invalid_requests_total",
    "Requests refused alone for an attribute value no Postfix sends (a number out of"
    " range, text that is not UTF-8), by attribute.",
    ["attribute"],
)
BACKEND_ERRORS = Counter(
    "postkeep_policyd_backend_errors_total",
    "PostgreSQL failures or timeouts that sent a decision to degraded mode.",
)
LEASES = Counter(
    "postkeep_policyd_lease_requests_total",
    "Round trips to PostgreSQL for lease-mode blocks (policyd.lease_tiers).",
)
LEASED_UNITS = Counter(
    "postkeep_policyd_leased_units_total",
    "Lease-mode units taken from (granted) or given back to (returned) the shared counters,"
    " by kind (messages, recipients, bytes).",
    ["kind", "action"],
)
SUPPRESSED = Counter(
    "postkeep_policyd_suppressed_total",
    "Recipients on their organisation's suppression list, by reason and whether they were"
    " refused (enforce) or only logged (shadow).",
    ["reason", "mode"],
)
SUPPRESSION_UNCHECKED = Counter(
    "postkeep_policyd_suppression_unchecked_total",
    "Recipients let through without a suppression check because PostgreSQL could not answer.",
)

for _stage in ("RCPT", "DATA", "END-OF-MESSAGE", "other"):
    for _action in ("dunno", "defer", "refuse"):
        REQUESTS.labels(_stage, _action)
for _mode in ("share", "open", "closed", "unknown_org"):
    DEGRADED.labels(_mode)

build_info.export("policyd")
