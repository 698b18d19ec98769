"""Webhooks across crashes and outages (issue 18): postkeep-storage killed with
kill -9 in the middle of a delivery, and PostgreSQL restarted, while a real
receiver holds a request: every event still arrives at least once, signed,
in order per message, a re-sent one with the same idempotency key."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from pathlib import Path

import pytest
from support.stack import Stack
from support.wait import until
from support.webhook_receiver import Behaviour, Receiver, receiver
from support.webhooks import add_endpoint, check_arrivals, emit

pytestmark = pytest.mark.outage


def _all_arrived(rx: Receiver, path: str, ids: list[int]) -> bool:
    return {int(r.headers["postkeep-event-id"]) for r in rx.got(path)} >= set(ids)


def _dead(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_storage_killed_mid_delivery(stack: Stack) -> None:
    org, _ = stack.new_org(dkim=False)
    pid_file = Path(stack.env["POSTKEEP_STACK_DIR"]) / "storage" / "storage.pid"
    with receiver() as rx:
        gate = threading.Event()
        slow = Behaviour(gate=gate)
        rx.behave("/k", slow)
        _, secret = add_endpoint(stack, org, rx.url("/k"))
        message = uuid.uuid4()
        ids = [emit(stack, org, message, kind, i)
               for i, kind in enumerate(("accepted", "relayed", "delivered"))]
        until(slow.held.is_set, "the first delivery in flight", timeout=60)
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGKILL)
        try:
            # Gone, or a zombie nobody reaps (PID 1 here is no init): either way dead,
            # and the pid file must go or stack.sh takes it for running.
            until(lambda: _dead(pid), "postkeep-storage dead after kill -9", timeout=30)
            pid_file.unlink()
            gate.set()  # answered 2xx, but nobody is left to record it
            rx.behave("/k", Behaviour())
        finally:
            stack.stack_ctl("start", "storage")
        until(lambda: _all_arrived(rx, "/k", ids), "every event after the restart",
              timeout=90)
        got = rx.got("/k")
        check_arrivals(got, secret, ids)
        first = [r for r in got if int(r.headers["postkeep-event-id"]) == ids[0]]
        assert len(first) == 2, "the event in flight at the kill is sent again"
        assert first[0].headers["idempotency-key"] == first[1].headers["idempotency-key"]
        assert first[0].body == first[1].body


def test_postgres_restarted_mid_delivery(stack: Stack) -> None:
    org, _ = stack.new_org(dkim=False)
    with receiver() as rx:
        gate = threading.Event()
        slow = Behaviour(gate=gate)
        rx.behave("/p", slow)
        _, secret = add_endpoint(stack, org, rx.url("/p"))
        message = uuid.uuid4()
        ids = [emit(stack, org, message, kind, i)
               for i, kind in enumerate(("accepted", "deferred", "delivered"))]
        until(slow.held.is_set, "the first delivery in flight", timeout=60)
        stack.stack_ctl("stop", "postgres")
        try:
            gate.set()  # its 2xx cannot be recorded while PostgreSQL is down
        finally:
            stack.stack_ctl("start", "postgres")
        ids += [emit(stack, org, message, "complained", 3)]
        until(lambda: _all_arrived(rx, "/p", ids), "every event after the restart",
              timeout=120)
        check_arrivals(rx.got("/p"), secret, ids)
