"""Shared steps of the webhook stack and outage tests: endpoints through the real
`postkeep webhook` CLI, events written straight into event_outbox (the
worker's input), and what a receiver must see."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from postkeep import webhooks as signing
from support.stack import Stack
from support.webhook_receiver import Received


def cli(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = Path(stack.env.get("POSTKEEP_STACK_VENV", ".venv")) / "bin" / "postkeep"
    if not exe.exists():
        exe = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "postkeep"
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "POSTKEEP_CONFIG": stack.env["POSTKEEP_CONFIG"]})
    if check:
        assert proc.returncode == 0, f"postkeep {' '.join(args)}: {proc.stderr}"
    return proc


def add_endpoint(stack: Stack, org: uuid.UUID, url: str, *events: str) -> tuple[str, str]:
    """(endpoint id, secret) of a new endpoint of ORG at URL."""
    extra = ["--events", ",".join(events)] if events else []
    out = json.loads(cli(stack, "webhook", "add", str(org), url, *extra, "--json").stdout)
    return out["id"], out["secret"]


def emit(stack: Stack, org: uuid.UUID, message: uuid.UUID, kind: str, seq: int,
         age_hours: float = 0) -> int:
    """Write one event into the outbox as the status writer does; its outbox id."""
    payload = {"id": f"evt-{uuid.uuid4()}", "type": kind, "message_id": str(message),
               "org_id": str(org), "seq": seq, "schema_version": 1}
    with stack.connect() as conn:
        row = conn.execute(
            "INSERT INTO event_outbox (org_id, message_id, recipient, event_type, payload,"
            " created_at) VALUES (%s, %s, 'r@mx.test', %s, %s,"
            " clock_timestamp() - make_interval(hours => %s)) RETURNING id",
            (org, message, kind, json.dumps(payload), age_hours)).fetchone()
    assert row is not None
    return int(row[0])


def check_arrivals(got: list[Received], secret: str, want_ids: list[int]) -> None:
    """Every event of WANT_IDS arrived at least once, signed with SECRET, and each
    message's events in the order they were written (by first arrival)."""
    first: dict[int, int] = {}
    for i, r in enumerate(got):
        assert signing.verify(secret, r.headers["postkeep-signature"], r.body), r.headers
        ev = int(r.headers["postkeep-event-id"])
        assert r.headers["idempotency-key"] == f"evt-{ev}"
        first.setdefault(ev, i)
    missing = set(want_ids) - set(first)
    assert not missing, f"events never delivered: {sorted(missing)}"
    per_message: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in got:
        ev = int(r.headers["postkeep-event-id"])
        e: dict[str, Any] = r.event
        if first[ev] == got.index(r):
            per_message[e["message_id"]].append((first[ev], e["seq"]))
    for mid, seqs in per_message.items():
        order = [s for _, s in sorted(seqs)]
        assert order == sorted(order), f"message {mid}: events arrived as {order}"
