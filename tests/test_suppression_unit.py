"""Suppression without services: addresses, the reply, the CLI's pure parts, and
postkeep-policyd's RCPT check with a fake backend and an injected clock (issue 17).

Through the real stack: tests/test_suppression_stack.py.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta, timezone

import click
import psycopg
import pytest

from postkeep.cli.suppression import Days, format_entries, to_csv
from postkeep.config import parse
from postkeep.policyd.decide import DUNNO
from postkeep.policyd.service import PolicyService
from postkeep.storage.metadata import suppression
from postkeep.storage.metadata.limits import Grant, OrgLimits, Outcome, Unspent, Want
from postkeep.storage.metadata.suppression import Hit, Suppression, normalise, reply

pytestmark = pytest.mark.unit

ORG = OrgLimits(uuid.uuid4(), "acme", "free", None, None, None)
WHEN = datetime(2026, 12, 4, 23, 30, tzinfo=UTC)


def test_domain_folds_local_part_does_not() -> None:
    assert normalise("Bob.Smith@Example.COM") == "Bob.Smith@example.com"
    assert normalise(" <Bob@Example.com.> ") == "Bob@example.com"
    assert normalise("a@b@C.Example") == "a@b@c.example"
    assert normalise("postmaster") == "postmaster"
    assert normalise("bob@example.com") != normalise("Bob@example.com")


def test_reply_names_reason_day_in_utc_and_detail() -> None:
    # 01:30 the next day in UTC+2: the day shown is UTC's.
    hit = Hit("hard_bounce", "5.1.1", WHEN.astimezone(timezone(timedelta(hours=2))), "enforce")
    assert reply(hit) == "550 5.7.1 suppressed: hard bounce on 2026-12-04 (5.1.1)"
    assert reply(Hit("unsubscribe", None, WHEN, "enforce")) == (
        "550 5.7.1 suppressed: unsubscribe on 2026-12-04")
    odd = reply(Hit("manual", "bad\r\nline" + "x" * 100, WHEN, "enforce"))
    assert "\r" not in odd and "\n" not in odd and odd.endswith("...)")


def test_suppress_refuses_unknown_reasons_before_any_sql() -> None:
    with pytest.raises(ValueError, match="reason 'bounce'"):
        suppression.suppress(None, ORG.org_id, "a@b.example", "bounce", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="days -1"):
        suppression.suppress(None, ORG.org_id, "a@b.example", "manual", "x",  # type: ignore[arg-type]
                             days=-1)


def test_cli_pure_parts() -> None:
    e = Suppression(ORG.org_id, "a@b.example", "hard_bounce", "outcome", "5.1.1", None, WHEN,
                    None)
    assert "a@b.example  hard_bounce (5.1.1)  since 2026-12-04 23:30 UTC  never expires" in (
        format_entries([e]))
    assert format_entries([]) == "no suppressed addresses"
    assert to_csv([e]).splitlines() == [
        "address,reason,source,detail,message_id,suppressed_at,expires_at",
        "a@b.example,hard_bounce,outcome,5.1.1,,2026-12-04T23:30:00+00:00,"]
    d = Days()
    assert (d.convert("30", None, None), d.convert("never", None, None)) == (30, 0)
    with pytest.raises(click.BadParameter):
        d.convert("0", None, None)


class Backend:
    """Organisations and counters that always admit; a suppression list in a dict."""

    def __init__(self) -> None:
        self.entries: dict[tuple[uuid.UUID, str], Hit] = {}
        self.asked = 0
        self.down = False
        self.consumed = 0

    async def recover(self) -> None:
        pass

    async def find(self, lookup: str, key: str) -> OrgLimits | None:
        return ORG if key == "acme.example" else None

    async def consume(self, stage: str, org: OrgLimits, instance: str, recipients: int,
                      size: int, ttl_seconds: int) -> Outcome:
        self.consumed += 1
        return Outcome("ok")

    async def lease(self, org: OrgLimits, wants: list[Want]) -> list[Grant]:
        raise AssertionError("not in lease mode")

    async def release(self, org_id: uuid.UUID, unspent: list[Unspent]) -> None:
        raise AssertionError("not in lease mode")

    async def suppressed(self, org_id: uuid.UUID, address: str) -> Hit | None:
        self.asked += 1
        if self.down:
            raise psycopg.OperationalError("connection refused")
        return self.entries.get((org_id, address))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _service(backend: Backend, clock: Clock, **policyd: object) -> PolicyService:
    cfg = parse({"policyd": {"decision_timeout_ms": 200, "suppression_cache_seconds": 5,
                             "degraded_retry_seconds": 1, "directory_cache_seconds": 3600,
                             **policyd}})
    return PolicyService(cfg, backend, clock=clock, wallclock=lambda: WHEN,
                         suppressions=backend)


def _rcpt(rcpt: str, state: str = "RCPT") -> dict[str, str]:
    return {"request": "smtpd_access_policy", "protocol_state": state,
            "sender": "app@acme.example", "recipient": rcpt, "instance": "i1",
            "recipient_count": "0" if state == "RCPT" else "1"}


def test_policyd_refuses_at_rcpt_in_enforce() -> None:
    backend, clock = Backend(), Clock()
    backend.entries[(ORG.org_id, "gone@x.example")] = Hit("hard_bounce", "5.1.1", WHEN,
                                                          "enforce")
    service = _service(backend, clock)

    async def run() -> list[str]:
        return [await service.decide(_rcpt("gone@X.Example")),
                await service.decide(_rcpt("gone@x.example")),
                await service.decide(_rcpt("Gone@x.example")),
                await service.decide(_rcpt("gone@x.example", "DATA"))]

    refused, again, other, data = asyncio.run(run())
    assert refused == again == "550 5.7.1 suppressed: hard bounce on 2026-12-04 (5.1.1)"
    assert (other, data) == (DUNNO, DUNNO)  # another local part; DATA is not checked
    assert backend.asked == 2  # gone@x.example once (then cached), Gone@x.example once
    # The first lookup ran beside the RCPT rate check (a read); the cached
    # refusal asked the counters nothing.
    assert backend.consumed == 3


def test_policyd_shadow_logs_and_admits(caplog: pytest.LogCaptureFixture) -> None:
    backend, clock = Backend(), Clock()
    backend.entries[(ORG.org_id, "gone@x.example")] = Hit("complaint", None, WHEN, "shadow")
    service = _service(backend, clock)
    with caplog.at_level(logging.INFO, "postkeep.policyd"):
        assert asyncio.run(service.decide(_rcpt("gone@x.example"))) == DUNNO
    assert "suppression shadow (not refused) RCPT" in caplog.text
    assert "recipient=gone@x.example: 550 5.7.1 suppressed: complaint on 2026-12-04" in (
        caplog.text)


def test_policyd_caches_answers_for_the_cache_period_only() -> None:
    backend, clock = Backend(), Clock()
    service = _service(backend, clock)
    key = (ORG.org_id, "new@x.example")

    async def ask() -> str:
        return await service.decide(_rcpt("new@x.example"))

    assert asyncio.run(ask()) == DUNNO
    backend.entries[key] = Hit("manual", None, WHEN, "enforce")
    clock.now += 4.9
    assert asyncio.run(ask()) == DUNNO  # the cached "not suppressed"
    assert backend.asked == 1
    clock.now += 0.2  # the cache period has passed: refused from now on
    assert asyncio.run(ask()).startswith("550 5.7.1 suppressed: added by the operator")
    assert backend.asked == 2


def test_policyd_without_postgres_uses_a_stale_answer_or_lets_through() -> None:
    backend, clock = Backend(), Clock()
    backend.entries[(ORG.org_id, "gone@x.example")] = Hit("manual", None, WHEN, "enforce")
    service = _service(backend, clock)
    assert asyncio.run(service.decide(_rcpt("gone@x.example"))).startswith("550 ")
    backend.down = True
    clock.now += 60
    # PostgreSQL down: the stale entry still refuses; an address never seen passes.
    assert asyncio.run(service.decide(_rcpt("gone@x.example"))).startswith("550 ")
    assert asyncio.run(service.decide(_rcpt("other@x.example"))) == DUNNO


def test_policyd_without_a_suppression_backend_checks_nothing() -> None:
    backend, clock = Backend(), Clock()
    backend.entries[(ORG.org_id, "gone@x.example")] = Hit("manual", None, WHEN, "enforce")
    cfg = parse({"policyd": {}})
    service = PolicyService(cfg, backend, clock=clock, wallclock=lambda: WHEN)
    assert asyncio.run(service.decide(_rcpt("gone@x.example"))) == DUNNO
    assert backend.asked == 0
