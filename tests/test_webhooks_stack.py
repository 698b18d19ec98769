"""Webhooks through the running postkeep-storage and a real HTTP receiver (issue 18).

Events are written into event_outbox as the status writer does; the worker
must deliver each at least once, signed, in order per message, through
failures and dropped connections, dead-letter what stays undeliverable, and
never let one organisation's slow endpoint hold up another's.
"""

from __future__ import annotations

import json
import threading
import uuid

import psycopg
import pytest
from support.sidecar import metric
from support.stack import Stack
from support.wait import until
from support.webhook_receiver import Behaviour, receiver
from support.webhooks import add_endpoint, check_arrivals, cli, emit

from postkeep import webhooks as signing

pytestmark = pytest.mark.stack


def _deliveries(stack: Stack, endpoint: str, *state: str) -> list[dict[str, object]]:
    rows = json.loads(cli(stack, "webhook", "deliveries", endpoint, *state, "--json").stdout)
    assert isinstance(rows, list)
    return rows


def test_every_event_arrives_signed_in_order_through_failures(stack: Stack) -> None:
    org, _ = stack.new_org(dkim=False)
    with receiver() as rx:
        # The first request is dropped unanswered, the next two get 500.
        rx.behave("/a", Behaviour(drop_first=1, fail_first=2))
        endpoint, secret = add_endpoint(stack, org, rx.url("/a"))
        ids = []
        messages = [uuid.uuid4() for _ in range(3)]
        for seq, kind in enumerate(("accepted", "deferred", "delivered")):
            for m in messages:  # interleaved: three messages' events one after another
                ids.append(emit(stack, org, m, kind, seq))
        until(lambda: {int(r.headers["postkeep-event-id"]) for r in rx.got("/a")} >= set(ids),
              "all nine events delivered", timeout=90)
        check_arrivals(rx.got("/a"), secret, ids)
        assert len(rx.seen_at("/a")) >= len(ids) + 3  # the failed attempts came too
        first = min(ids)
        tried = [int(r.headers["postkeep-event-id"]) for r in rx.seen_at("/a")][:4]
        assert tried == [first] * 4, f"the head event is retried before any later one: {tried}"
        rows = until(lambda: [r for r in _deliveries(stack, endpoint)
                              if r["state"] == "delivered"] if len(
                                  _deliveries(stack, endpoint, "--state", "delivered"))
                              == len(ids) else None, "deliveries recorded", timeout=30)
        head = next(r for r in rows if r["event_id"] == first)
        assert head["attempts"] == 4 and head["last_status"] == 200
        # A tampered body fails the documented check.
        r = rx.got("/a")[0]
        assert not signing.verify(secret, r.headers["postkeep-signature"],
                                  r.body.replace(b"accepted", b"bounced"))
    url = stack.env["POSTKEEP_STORAGE_METRICS"]
    assert metric(url, 'postkeep_webhook_events_delivered_total{type="delivered"}') >= 3
    assert metric(url, 'postkeep_webhook_attempts_total{result="http_5xx"}') >= 2
    assert metric(url, 'postkeep_webhook_attempts_total{result="connection"}') >= 1


def test_event_filter_and_secret_rotation(stack: Stack) -> None:
    org, _ = stack.new_org(dkim=False)
    with receiver() as rx:
        endpoint, old = add_endpoint(stack, org, rx.url("/f"), "bounced")
        skipped = emit(stack, org, uuid.uuid4(), "delivered", 0)
        out = json.loads(cli(stack, "webhook", "rotate-secret", endpoint, "--overlap", "1",
                             "--json").stdout)
        new = out["secret"]
        assert new != old and new.startswith("whsec_")
        wanted = emit(stack, org, uuid.uuid4(), "bounced", 0)
        until(lambda: rx.got("/f"), "the bounced event", timeout=60)
        got = rx.got("/f")
        assert [int(r.headers["postkeep-event-id"]) for r in got] == [wanted]
        assert skipped not in [int(r.headers["postkeep-event-id"]) for r in got]
        header = got[0].headers["postkeep-signature"]
        assert header.count("v1=") == 2
        assert signing.verify(old, header, got[0].body)
        assert signing.verify(new, header, got[0].body)
        # The secret is stored sealed: not in the clear anywhere in its row.
        with stack.connect() as conn:
            row = conn.execute("SELECT row_to_json(e)::text FROM webhook_endpoints e"
                               " WHERE id = %s", (endpoint,)).fetchone()
        assert row is not None and old not in row[0] and new not in row[0]
        listed = json.loads(cli(stack, "webhook", "list", "--org", str(org), "--json").stdout)
        assert [e["id"] for e in listed] == [endpoint] and "secret" not in listed[0]


def test_dead_letter_then_replay(stack: Stack) -> None:
    org, _ = stack.new_org(dkim=False)
    with receiver() as rx:
        rx.behave("/d", Behaviour(fail_first=10**6))
        endpoint, secret = add_endpoint(stack, org, rx.url("/d"))
        # Written 25 hours ago: past the 24 h of retries at its first failure.
        old = emit(stack, org, uuid.uuid4(), "bounced", 0, age_hours=25)
        dead = until(lambda: _deliveries(stack, endpoint, "--state", "dead"),
                     "the event dead-lettered", timeout=60)
        assert [d["event_id"] for d in dead] == [old] and dead[0]["last_status"] == 500
        rx.behave("/d", Behaviour())
        out = json.loads(cli(stack, "webhook", "replay", endpoint, "--json").stdout)
        assert out["requeued"] == 1
        until(lambda: rx.got("/d"), "the replayed event", timeout=60)
        check_arrivals(rx.got("/d"), secret, [old])


def test_slow_org_does_not_delay_another(stack: Stack) -> None:
    slow_org, _ = stack.new_org(dkim=False)
    fast_org, _ = stack.new_org(dkim=False)
    with receiver() as rx:
        gate = threading.Event()
        slow = Behaviour(gate=gate)
        rx.behave("/slow", slow)
        slow_endpoint, _ = add_endpoint(stack, slow_org, rx.url("/slow"))
        _, fast_secret = add_endpoint(stack, fast_org, rx.url("/fast"))
        emit(stack, slow_org, uuid.uuid4(), "accepted", 0)
        until(slow.held.is_set, "the slow endpoint holding a request", timeout=60)
        ids = [emit(stack, fast_org, uuid.uuid4(), "delivered", i) for i in range(3)]
        # While the slow organisation's request is still held, the fast one's arrive.
        until(lambda: len(rx.got("/fast")) >= 3, "the fast organisation's events", timeout=60)
        assert not gate.is_set() and not rx.got("/slow")
        # ... and the slow one's first attempt has not ended yet (no timeout, no retry:
        # the stack's request_timeout_seconds is 30): they never queued behind it.
        assert len(rx.seen_at("/slow")) == 1
        with stack.connect() as conn:
            tried = conn.execute("SELECT attempts FROM webhook_deliveries WHERE endpoint_id = %s",
                                 (slow_endpoint,)).fetchall()
        assert tried == [(0,)], tried
        check_arrivals(rx.got("/fast"), fast_secret, ids)
        gate.set()


def test_cli_test_event_and_errors(stack: Stack) -> None:
    org, _ = stack.new_org(dkim=False)
    with receiver() as rx:
        endpoint, secret = add_endpoint(stack, org, rx.url("/t"))
        out = json.loads(cli(stack, "webhook", "test", endpoint, "--json").stdout)
        assert out["ok"] and out["status"] == 200
        got = rx.got("/t")
        assert got[0].event["type"] == "test"
        assert signing.verify(secret, got[0].headers["postkeep-signature"], got[0].body)
        rx.behave("/t", Behaviour(fail_first=1))
        failed = cli(stack, "webhook", "test", endpoint, check=False)
        assert failed.returncode == 1 and "not accepted (500)" in failed.stderr
    bad = cli(stack, "webhook", "add", str(org), "ftp://x", check=False)
    assert bad.returncode == 1 and "URL 'ftp://x'" in bad.stderr
    bad = cli(stack, "webhook", "add", str(org), "https://x.test", "--events", "nope",
              check=False)
    assert bad.returncode == 1 and "--events 'nope'" in bad.stderr
    missing = cli(stack, "webhook", "deliveries", str(uuid.uuid4()), check=False)
    assert missing.returncode == 1 and "no webhook endpoint" in missing.stderr
    removed = cli(stack, "webhook", "remove", endpoint, "--yes")
    assert endpoint in removed.stdout


def test_tenants_read_their_endpoints_never_the_sealed_secrets(stack: Stack) -> None:
    org_a, _ = stack.new_org(dkim=False)
    org_b, _ = stack.new_org(dkim=False)
    ep_a, _ = add_endpoint(stack, org_a, "https://a.example/hook")
    add_endpoint(stack, org_b, "https://b.example/hook")
    role = f"dash_{uuid.uuid4().hex[:12]}"
    with stack.connect() as conn:
        conn.execute(f'CREATE ROLE "{role}" NOLOGIN IN ROLE postkeep_tenant')
        try:
            with conn.transaction():
                conn.execute("INSERT INTO tenant_roles (role_name, org_id) VALUES (%s, %s)",
                             (role, org_a))
                conn.execute(f'SET LOCAL ROLE "{role}"')
                seen = conn.execute("SELECT id::text, url FROM webhook_endpoints").fetchall()
                assert seen == [(ep_a, "https://a.example/hook")]
                conn.execute("SAVEPOINT s")
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("SELECT secret_sealed FROM webhook_endpoints")
                conn.execute("ROLLBACK TO SAVEPOINT s")
                conn.execute("RESET ROLE")
                conn.execute("DELETE FROM tenant_roles WHERE role_name = %s", (role,))
        finally:
            conn.execute(f'DROP ROLE "{role}"')


def test_erasure_writes_an_erased_event_naming_no_address_and_it_is_delivered(
        stack: Stack, make_org, store_message) -> None:  # type: ignore[no-untyped-def]
    target = f"Target-{uuid.uuid4().hex[:8]}@Example.net"
    addr = target.lower()
    org = make_org()
    with receiver() as rx:
        _, secret = add_endpoint(stack, org.id, rx.url("/erase"))
        # An endpoint that is down: the erased messages' events wait there.
        rx.behave("/down", Behaviour(fail_first=10**6))
        down, _ = add_endpoint(stack, org.id, rx.url("/down"))
        to_it = store_message(org, recipients=(target, "other@example.net"),
                              subject=f"for {target}")
        from_it = store_message(org, envelope_from=addr, recipients=("desk@example.net",))
        # Not to or from it, but its subject quotes the address.
        quoting = store_message(org, recipients=("x@example.net",), subject=f"re {addr}")
        unrelated = store_message(org, recipients=("other@example.net",))
        # Suppressed by hand: an event about no message that names the address.
        cli(stack, "suppression", "add", str(org.id), target, "--note", f"asked by {addr}")
        until(lambda: len(rx.got("/erase")) >= 5, "the five events before the erasure",
              timeout=60)
        until(lambda: len(_deliveries(stack, down)) >= 5, "the five queued at the down one",
              timeout=60)
        out = json.loads(cli(stack, "erase", "--org", str(org.id), "--address", target, "--yes",
                             "--json").stdout)
        assert out["messages"] == 2 and out["suppressions_kept"] == 1, out
        with stack.connect() as conn:
            rows = conn.execute(
                "SELECT event_type, message_id, recipient, payload FROM event_outbox"
                " WHERE org_id = %s ORDER BY id", (org.id,)).fetchall()
            pseudonym = conn.execute("SELECT suppression_erased_key(%s, %s)",
                                     (org.id, addr)).fetchone()
        assert pseudonym is not None
        # Not a trace of the address in any row of the organisation's outbox.
        named = [r for r in rows if addr in json.dumps(r[3]).lower()
                 or addr in str(r[2]).lower()]
        assert named == [], named
        # The unrelated message's event stays; the erased ones' go.
        kept = {r[1] for r in rows if r[0] == "accepted"}
        assert kept == {unrelated.id}, (kept, to_it.id, from_it.id, quoting.id)
        erased = [r for r in rows if r[0] == "erased"]
        assert len(erased) == 1, rows
        _, mid, recipient, p = erased[0]
        assert mid is None and recipient == pseudonym[0] and recipient.startswith("sha256:")
        assert p["type"] == "erased" and p["org_id"] == str(org.id)
        assert (p["messages"], p["batch"], p["batches"]) == (2, 1, 1)
        assert sorted(p["postkeep_ids"]) == sorted([str(to_it.id), str(from_it.id)])
        assert p["recipient"] == pseudonym[0] and p["postkeep_id"] is None
        # Delivered, signed, to the organisation's endpoint.
        got = until(lambda: [r for r in rx.got("/erase") if r.event["type"] == "erased"],
                    "the erased event at the receiver", timeout=60)
        assert got[0].event == p
        assert signing.verify(secret, got[0].headers["postkeep-signature"], got[0].body)
        assert addr.encode() not in got[0].body.lower()
        # The down endpoint's queue drops the deleted events (no failure to
        # dead-letter, nothing to replay); it still has the erased event.
        def queued() -> list[tuple[int, uuid.UUID | None, str, bool]]:
            with stack.connect() as conn:
                return conn.execute(  # type: ignore[return-value]
                    "SELECT d.event_id, d.message_id, d.event_type, o.id IS NOT NULL"
                    " FROM webhook_deliveries d LEFT JOIN event_outbox o"
                    " ON o.id = d.event_id WHERE d.endpoint_id = %s", (down,)).fetchall()

        def erased_queued() -> list[tuple[int, uuid.UUID | None, str, bool]] | None:
            q = queued()
            return q if "erased" in {r[2] for r in q} else None

        rows_down = until(erased_queued, "the erased event queued at the down endpoint",
                          timeout=60)
        assert all(in_outbox for *_, in_outbox in rows_down), rows_down
        assert not {to_it.id, from_it.id, quoting.id} & {r[1] for r in rows_down}, rows_down
        assert _deliveries(stack, down, "--state", "dead") == []
        # An erasure that finds nothing says so too: one event with no messages.
        cli(stack, "erase", "--org", str(org.id), "--address", "nobody@example.net", "--yes")
        with stack.connect() as conn:
            last = conn.execute("SELECT payload FROM event_outbox WHERE org_id = %s"
                                " AND event_type = 'erased' ORDER BY id DESC LIMIT 1",
                                (org.id,)).fetchone()
        assert last is not None and (last[0]["messages"], last[0]["postkeep_ids"]) == (0, [])
        assert last[0]["erasure_id"] != p["erasure_id"]


def test_an_event_committed_after_a_later_one_is_still_delivered(stack: Stack) -> None:
    """Outbox ids are taken at INSERT, so an event can commit after a later id has
    been fanned out and delivered: the pass that moves the horizon past it
    catches it (storage/metadata/webhooks.py, fan_out)."""
    org, _ = stack.new_org(dkim=False)
    with receiver() as rx:
        _, secret = add_endpoint(stack, org, rx.url("/late"))
        slow = stack.connect()
        try:
            with slow.transaction():
                row = slow.execute(
                    "INSERT INTO event_outbox (org_id, message_id, event_type, payload)"
                    " VALUES (%s, %s, 'bounced', %s) RETURNING id",
                    (org, uuid.uuid4(), json.dumps({"type": "bounced", "seq": 0,
                                                    "message_id": "late"}))).fetchone()
                assert row is not None
                late = int(row[0])
                early = emit(stack, org, uuid.uuid4(), "delivered", 0)
                assert early > late
                until(lambda: [int(r.headers["postkeep-event-id"]) for r in rx.got("/late")]
                      == [early], "the later id, committed first, delivered", timeout=60)
        finally:
            slow.close()
        until(lambda: len(rx.got("/late")) >= 2, "the earlier id, committed last", timeout=60)
        check_arrivals(rx.got("/late"), secret, [early, late])
