"""postkeep-policyd's pure layer and its asyncio adapter, without services.

Protocol framing with golden requests as Postfix 3.7 sends them and hostile
input; decisions and local (degraded) counting with an injected clock across
window roll-over; the server on loopback with a fake backend that can stall.
Lease mode, which needs the real rate_lease(), is tested on the stack
(tests/test_policyd_lease_windows.py), as is LocalCounters against rate_consume().
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from postkeep.config import parse
from postkeep.policyd.decide import (
    DUNNO,
    LocalCounters,
    plan,
    verdict,
    window_end,
)
from postkeep.policyd.protocol import Limits, ProtocolError, RequestBuilder, format_reply
from postkeep.policyd.server import PolicyServer
from postkeep.policyd.service import PolicyService
from postkeep.storage.metadata.limits import Grant, OrgLimits, Outcome, Unspent, Want
from postkeep.windows import Windows

pytestmark = pytest.mark.unit

# A DATA request as Postfix 3.7.11 sends it (SMTPD_POLICY_README).
GOLDEN_DATA = (
    b"request=smtpd_access_policy\nprotocol_state=DATA\nprotocol_name=ESMTP\n"
    b"client_address=127.0.0.1\nclient_name=localhost\nclient_port=40312\n"
    b"reverse_client_name=localhost\nserver_address=127.0.0.1\nserver_port=25\n"
    b"helo_name=app.example\nsender=noreply@acme.example\nrecipient=\n"
    b"recipient_count=3\nqueue_id=4Xb2Lq1Y8Bz3\ninstance=1b2e.6755a3f1.5f1e.0\n"
    b"size=0\netrn_domain=\nstress=\nsasl_method=\nsasl_username=\nsasl_sender=\n"
    b"ccert_subject=\nccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\n"
    b"encryption_protocol=\nencryption_cipher=\nencryption_keysize=0\n"
    b"policy_context=\ncompatibility_level=3.6\nmail_version=3.7.11\n\n"
)

ORG = OrgLimits(uuid.uuid4(), "acme", "free", 100, 300, None)
T0 = datetime(2026, 11, 25, 10, 59, 30, tzinfo=UTC)


def feed(raw: bytes, limits: Limits | None = None) -> list[dict[str, str]]:
    b = RequestBuilder(limits or Limits())
    out = []
    for line in raw.splitlines(keepends=True):
        req = b.add_line(line)
        if req is not None:
            out.append(req)
    return out


def test_golden_request_parses_every_attribute() -> None:
    [req] = feed(GOLDEN_DATA)
    assert req["protocol_state"] == "DATA"
    assert req["recipient_count"] == "3"
    assert req["instance"] == "1b2e.6755a3f1.5f1e.0"
    assert req["recipient"] == ""
    assert len(req) == 31


def test_two_requests_on_one_connection() -> None:
    assert len(feed(GOLDEN_DATA + GOLDEN_DATA.replace(b"DATA", b"END-OF-MESSAGE"))) == 2


def test_feed_frames_requests_however_the_bytes_arrive() -> None:
    two = GOLDEN_DATA + GOLDEN_DATA.replace(b"DATA", b"END-OF-MESSAGE")
    whole = RequestBuilder().feed(two)
    b = RequestBuilder()
    bytewise = [r for i in range(len(two)) for r in b.feed(two[i:i + 1])]
    assert whole == bytewise == feed(two) and len(whole) == 2
    assert not b.started
    b.feed(b"sender=x@y")
    assert b.started and b.mid_line
    # a line that never ends is refused once it is too long, not buffered forever
    with pytest.raises(ProtocolError, match="line longer"):
        RequestBuilder(Limits(max_line_bytes=64)).feed(b"sender=" + b"a" * 100)
    with pytest.raises(ProtocolError, match="request larger"):
        RequestBuilder(Limits(max_request_bytes=300)).feed(b"a=" + b"x" * 100 + b"\n" * 1
                                                           + b"b=" + b"y" * 100 + b"\n"
                                                           + b"c=" + b"z" * 100)


def test_reply_format() -> None:
    assert format_reply("DUNNO") == b"action=DUNNO\n\n"
    with pytest.raises(ValueError):
        format_reply("DUNNO\naction=OK")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"garbage without equals\n", "without '='"),
        (b"=value\n", "bad attribute name"),
        (b"na\xffme=x\n", "bad attribute name"),
        (b"sender=a\x00b\n", "control byte"),
        (b"\n", "empty request"),
        (b"sender=" + b"a" * 5000 + b"\n", "line longer"),
        (b"".join(b"a%d=x\n" % i for i in range(200)), "more than 128 attributes"),
        (b"".join(b"attr=" + b"x" * 4000 + b"\n" for _ in range(5)), "request larger"),
    ],
)
def test_hostile_input_is_refused_with_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        feed(raw)


def test_utf8_addresses_kept() -> None:
    [req] = feed("sender=jörg@bücher.example\n\n".encode())
    assert req["sender"] == "jörg@bücher.example"


def attrs(state: str, instance: str = "i1", **kw: str) -> dict[str, str]:
    base = {"protocol_state": state, "sender": "a@acme.example", "instance": instance,
            "recipient_count": "0", "size": "0", "sasl_username": ""}
    base.update(kw)
    return base


def test_plan_resolution_and_system_mail() -> None:
    p = plan(attrs("DATA", recipient_count="3"), ())
    assert (p.stage, p.lookup, p.key, p.recipients) == ("reserve", "domain", "acme.example", 3)
    p = plan(attrs("RCPT", sasl_username="app1"), ())
    assert (p.stage, p.lookup, p.key) == ("check", "submitter", "app1")
    p = plan(attrs("END-OF-MESSAGE", size="1234", sender="x@Sys.Example"), ("sys.example",))
    assert p.stage is None and "system mail" in p.why
    # A login is counted for its organisation whatever sender it names.
    p = plan(attrs("RCPT", sender="x@sys.example", sasl_username="app1"), ("sys.example",))
    assert (p.stage, p.lookup, p.key) == ("check", "submitter", "app1")
    assert plan(attrs("MAIL"), ()).stage is None
    assert plan(attrs("DATA", sender=""), ()).stage is None
    assert plan(attrs("END-OF-MESSAGE", size="77"), ()).size == 77


def test_verdict_names_kind_tier_limit_and_retry() -> None:
    d = verdict(Outcome("over", "messages", 100, 100), ORG, T0)
    assert d.action.startswith("DEFER_IF_PERMIT 4.7.1 ")
    assert "messages per hour" in d.action and "free tier" in d.action
    assert "100 of 100" in d.action and "2026-11-25 11:00 UTC" in d.action
    assert verdict(Outcome("ok"), ORG, T0).action == DUNNO
    assert verdict(Outcome("dup"), ORG, T0).action == DUNNO
    shadow = verdict(Outcome("over", "recipients", 300, 300), ORG, T0, shadow=True)
    assert shadow.action == DUNNO and shadow.shadowed and shadow.over == "recipients"
    assert "2026-11-26 00:00 UTC" in shadow.reason
    big = verdict(Outcome("over", "bytes", 900, 1000), ORG, T0, size=5000)
    assert "(900 of 1000, this message 5000)" in big.action


def test_window_end() -> None:
    assert window_end("messages", T0) == datetime(2026, 11, 25, 11, tzinfo=UTC)
    assert window_end("bytes", T0) == datetime(2026, 11, 26, tzinfo=UTC)
    # shortened windows (tests only) stay aligned to the epoch
    short = Windows(hour_seconds=7, day_seconds=60)
    assert short.start("messages", T0).timestamp() % 7 == 0
    assert window_end("messages", T0, short) - short.start("messages", T0) == timedelta(seconds=7)
    assert window_end("recipients", T0, short) == datetime(2026, 11, 25, 11, tzinfo=UTC)


def test_local_share_and_hour_roll_over() -> None:
    org = OrgLimits(uuid.uuid4(), "o", "free", 10, 1000, None)
    local = LocalCounters(processes=2)
    admitted = sum(
        local.consume("reserve", org, f"m{i}", 1, 0, T0).result == "ok" for i in range(20))
    assert admitted == 5  # this process's share of 10 with 2 processes
    over = local.consume("reserve", org, "late", 1, 0, T0)
    assert (over.result, over.kind, over.used, over.limit) == ("over", "messages", 5, 5)
    assert local.consume("check", org, "", 0, 0, T0).result == "over"
    later = T0 + timedelta(seconds=31)  # 11:00:01, a new hour
    assert local.consume("reserve", org, "next", 1, 0, later).result == "ok"


def test_local_counts_a_message_once_and_expires_reservations() -> None:
    org = OrgLimits(uuid.uuid4(), "o", "free", 2, 100, 1000)
    local = LocalCounters(processes=1, ttl=timedelta(minutes=15))
    assert local.consume("reserve", org, "a", 2, 0, T0).result == "ok"
    assert local.consume("reserve", org, "a", 2, 0, T0).result == "dup"
    assert local.consume("settle", org, "a", 2, 600, T0).result == "ok"
    assert local.consume("settle", org, "a", 2, 600, T0).result == "dup"
    # b reserves, never completes; its slot comes back after the ttl
    assert local.consume("reserve", org, "b", 1, 0, T0).result == "ok"
    assert local.consume("reserve", org, "c", 1, 0, T0).result == "over"
    # bytes over at END-OF-MESSAGE gives back the reservation
    t1 = T0 + timedelta(minutes=16)  # new hour; b expired
    assert local.consume("reserve", org, "d", 1, 0, t1).result == "ok"
    refused = local.consume("settle", org, "d", 1, 500, t1)
    assert (refused.result, refused.kind) == ("over", "bytes")


class FakeBackend:
    """A stand-in for PostgreSQL that counts messages by the plainest rule there is,
    so that these tests' expectations do not rest on LocalCounters (the code
    under test in degraded mode): each new instance at DATA or END-OF-MESSAGE is
    one message against messages_per_hour; nothing expires, no other kind counts.
    `stall` makes every call hang."""

    def __init__(self) -> None:
        self.messages: set[str] = set()
        self.stall = False
        self.broken = 0  # this many calls fail as on connections a restart broke
        self.orgs = {("domain", "acme.example"): ORG}

    async def recover(self) -> None:
        self.broken = 0

    async def find(self, lookup: str, key: str) -> OrgLimits | None:
        if self.broken:
            self.broken -= 1
            raise psycopg.OperationalError("terminating connection due to administrator command")
        if self.stall:
            await asyncio.sleep(3600)
        return self.orgs.get((lookup, key))

    async def consume(self, stage: str, org: OrgLimits, instance: str, recipients: int,
                      size: int, ttl_seconds: int) -> Outcome:
        if self.stall:
            await asyncio.sleep(3600)
        used, limit = len(self.messages), org.messages_per_hour
        assert limit is not None
        if stage != "check" and instance in self.messages:
            return Outcome("dup")
        if used + 1 > limit:
            return Outcome("over", "messages", used, limit)
        if stage != "check":
            self.messages.add(instance)
        return Outcome("ok")

    async def lease(self, org: OrgLimits, wants: list[Want]) -> list[Grant]:
        raise AssertionError("no organisation of this backend is in lease mode")

    async def release(self, org_id: uuid.UUID, unspent: list[Unspent]) -> None:
        raise AssertionError("no organisation of this backend is in lease mode")


def make_service(backend: FakeBackend, **policyd: object) -> PolicyService:
    cfg = parse({"policyd": {"decision_timeout_ms": 50, **policyd}})
    return PolicyService(cfg, backend, wallclock=lambda: T0)


async def ask(port: int, requests: list[bytes]) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    for raw in requests:
        writer.write(raw)
        await writer.drain()
        out.append(await reader.readuntil(b"\n\n"))
    writer.close()
    return out


def request(state: str, instance: str, **kw: str) -> bytes:
    return "".join(f"{k}={v}\n" for k, v in attrs(state, instance, **kw).items()
                   ).encode() + b"\n"


def test_server_many_requests_per_connection_and_limit() -> None:
    async def run() -> list[bytes]:
        server = PolicyServer(make_service(FakeBackend()).decide, Limits(), 5)
        port = await server.start("127.0.0.1", 0)
        try:
            reqs = [request("DATA", f"m{i}", recipient_count="1") for i in range(101)]
            return await ask(port, reqs)
        finally:
            await server.stop()

    replies = asyncio.run(run())
    assert replies[:100] == [b"action=DUNNO\n\n"] * 100
    assert replies[100].startswith(b"action=DEFER_IF_PERMIT 4.7.1 Rate limit: acme:")


def test_hostile_clients_are_closed_and_others_unaffected() -> None:
    async def run() -> tuple[list[bytes], list[bytes]]:
        server = PolicyServer(make_service(FakeBackend()).decide,
                              Limits(max_line_bytes=256), read_timeout=0.3)
        port = await server.start("127.0.0.1", 0)
        closed = []
        try:
            for hostile in (b"\x00\xff\xfe garbage\n", b"a" * 1000 + b"\n",
                            b"sender=x@y\n"):  # last one stalls: no empty line
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(hostile)
                await writer.drain()
                closed.append(await asyncio.wait_for(reader.read(), 30))
                writer.close()
            good = await ask(port, [request("RCPT", "x")])
        finally:
            await server.stop()
        return closed, good

    closed, good = asyncio.run(run())
    assert closed == [b"", b"", b""]  # each hostile client closed without a reply
    assert good == [b"action=DUNNO\n\n"]


def _backend_errors() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("postkeep_policyd_backend_errors_total") or 0.0


def test_stalled_backend_degrades_within_the_timeout() -> None:
    async def run() -> list[str]:
        backend = FakeBackend()
        # No retry of PostgreSQL during the test, however slow the host.
        service = make_service(backend, degraded_processes=4, degraded_retry_seconds=3600)
        # warm the org cache, then the database stalls
        assert await service.decide(attrs("RCPT", "w")) == DUNNO
        backend.stall = True
        return [await service.decide(attrs("DATA", f"d{i}", recipient_count="1"))
                for i in range(30)]

    before = _backend_errors()
    answers = asyncio.run(run())  # returns at all: the stall (an hour) was cut short
    # One decision waited out the timeout; the other 29 never asked the backend.
    assert _backend_errors() - before == 1
    assert answers.count(DUNNO) == 25  # 100 / 4 processes
    assert answers[25].startswith("DEFER_IF_PERMIT 4.7.1") and "host share" in answers[25]


def test_degraded_open_and_closed_modes() -> None:
    async def run(mode: str) -> str:
        backend = FakeBackend()
        service = make_service(backend, degraded_mode=mode)
        await service.decide(attrs("RCPT", "w"))
        backend.stall = True
        return await service.decide(attrs("DATA", "d", recipient_count="1"))

    assert asyncio.run(run("open")) == DUNNO
    assert asyncio.run(run("closed")).startswith("DEFER_IF_PERMIT 4.7.1")


def test_stop_closes_idle_connections_at_once() -> None:
    async def run() -> bytes:
        server = PolicyServer(make_service(FakeBackend()).decide, Limits(), read_timeout=300)
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("RCPT", "x"))
        await reader.readuntil(b"\n\n")
        # Neither the grace nor the client's read timeout (300 s) is waited out.
        await asyncio.wait_for(server.stop(grace=300), 30)
        return await asyncio.wait_for(reader.read(), 30)

    assert asyncio.run(run()) == b""


def test_connections_broken_by_a_restart_are_not_an_outage() -> None:
    async def run() -> tuple[str, bool]:
        backend = FakeBackend()
        service = make_service(backend)
        backend.broken = 5  # every idle pooled connection
        answer = await service.decide(attrs("DATA", "r1", recipient_count="1"))
        return answer, service.degraded

    answer, degraded = asyncio.run(run())
    assert answer == DUNNO and not degraded


def test_policyd_config_refusals_name_key_value_and_allowed() -> None:
    from postkeep.config import ConfigError

    with pytest.raises(ConfigError, match=r"policyd.degraded_mode = 'fail': expected one of"
                                          r" 'share', 'open', 'closed'"):
        parse({"policyd": {"degraded_mode": "fail"}})
    with pytest.raises(ConfigError, match=r"policyd.listen_port = 0: expected a int >= 1"):
        parse({"policyd": {"listen_port": 0}})
    cfg = parse({"policyd": {"synchronous_commit": "on", "degraded_processes": 3}})
    assert cfg.policyd.synchronous_commit == "on" and cfg.policyd.degraded_processes == 3


def test_local_expiry_gives_back_only_unsettled_reservations_in_order() -> None:
    org = OrgLimits(uuid.uuid4(), "o", "free", 3, 100, None)
    local = LocalCounters(processes=1, ttl=timedelta(minutes=10))
    t = T0 - timedelta(minutes=30)  # 10:29:30
    assert local.consume("reserve", org, "a", 1, 0, t).result == "ok"
    assert local.consume("reserve", org, "b", 1, 0, t + timedelta(minutes=1)).result == "ok"
    # a completes later: its expiry moves behind b's, and it stays counted
    assert local.consume("settle", org, "a", 1, 10, t + timedelta(minutes=5)).result == "ok"
    assert local.consume("reserve", org, "c", 1, 0, t + timedelta(minutes=6)).result == "ok"
    assert local.consume("reserve", org, "d", 1, 0, t + timedelta(minutes=6)).result == "over"
    # 10:41: b (unsettled, 10:40) expired and gave its slot back; a and c still count
    later = t + timedelta(minutes=11, seconds=30)
    assert local.consume("reserve", org, "d", 1, 0, later).result == "ok"
    assert local.consume("reserve", org, "e", 1, 0, later).result == "over"


def test_completed_messages_are_forgotten_after_settled_ttl_behind_a_stuck_one() -> None:
    org = OrgLimits(uuid.uuid4(), "o", "enterprise", 10**6, None, None)
    local = LocalCounters(1, ttl=timedelta(minutes=15), settled_ttl=timedelta(minutes=1))
    assert local.consume("reserve", org, "stuck", 1, 0, T0).result == "ok"  # never completes
    for i in range(100):
        assert local.consume("reserve", org, f"m{i}", 1, 0, T0).result == "ok"
        assert local.consume("settle", org, f"m{i}", 1, 10, T0).result == "ok"
    assert local.consume("settle", org, "m0", 1, 10, T0).result == "dup"
    later = T0 + timedelta(minutes=2)
    local.expire(later)
    # the 100 completed ones are gone although the stuck one (older) is still held
    assert local.held(org.org_id, "m0") is None and local.held(org.org_id, "stuck") is not None
    assert len(local._settled) == 0 and len(local._open) == 1
    local.expire(T0 + timedelta(minutes=16))
    assert local.held(org.org_id, "stuck") is None
    hour = Windows().start("messages", T0)
    assert local.used(org.org_id, "messages", hour) == 100  # the stuck one given back


def test_a_deferral_is_logged_with_the_postfix_queue_id(caplog: pytest.LogCaptureFixture) -> None:
    """policyd's lines name the message by Postfix's queue id, as the milter's and
    postkeep-storage's do (postkeep/logs.py), so one grep finds it in every log."""
    async def run() -> str:
        service = make_service(FakeBackend())
        answer = DUNNO
        for i in range(101):  # ORG allows 100 messages an hour
            answer = await service.decide(attrs("DATA", f"m{i}", recipient_count="1",
                                                queue_id=f"4QID{i}"))
        return answer

    with caplog.at_level(logging.INFO, logger="postkeep.policyd"):
        assert asyncio.run(run()).startswith("DEFER_IF_PERMIT")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("deferred")]
    assert len(lines) == 1 and lines[0].startswith("deferred DATA queue_id=4QID100 instance=m100")
