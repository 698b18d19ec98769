"""Invalid attribute values in policy requests, without services.

`decide.invalid` names the first value policyd reads that no Postfix sends;
the service refuses that request alone.  A value PostgreSQL refuses anyway
(a data error) is that request's problem, not an outage: no degraded mode.
The server answers a request with undecodable bytes and keeps the
connection.  The same over a real TCP connection to the stack's policyd:
tests/test_policyd_malformed_stack.py.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from prometheus_client import REGISTRY

from postkeep.config import parse
from postkeep.policyd.decide import DUNNO, MAX_RECIPIENTS, MAX_SIZE, LocalCounters, invalid
from postkeep.policyd.protocol import Limits
from postkeep.policyd.server import PolicyServer
from postkeep.policyd.service import PolicyService
from postkeep.storage.metadata.limits import Grant, OrgLimits, Outcome, Unspent, Want

pytestmark = pytest.mark.unit

ORG = OrgLimits(uuid.uuid4(), "acme", "free", 100, 300, None)
T0 = datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
BAD_BYTE = b"\xff".decode("utf-8", "surrogateescape")  # as protocol.parse_attribute keeps it


def attrs(state: str = "DATA", instance: str = "i1", **kw: str) -> dict[str, str]:
    base = {"protocol_state": state, "sender": "a@acme.example", "instance": instance,
            "recipient_count": "1", "size": "0", "sasl_username": "",
            "client_address": "192.0.2.7"}
    base.update(kw)
    return base


@pytest.mark.parametrize(
    ("kw", "attribute", "code"),
    [
        ({"recipient_count": str(MAX_RECIPIENTS + 1)}, "recipient_count", "550 5.5.4"),
        ({"recipient_count": "9" * 40}, "recipient_count", "550 5.5.4"),
        ({"recipient_count": "-1"}, "recipient_count", "550 5.5.4"),
        ({"recipient_count": "+1"}, "recipient_count", "550 5.5.4"),
        ({"recipient_count": " 1"}, "recipient_count", "550 5.5.4"),
        ({"recipient_count": "1_000"}, "recipient_count", "550 5.5.4"),
        ({"recipient_count": "\u0661"}, "recipient_count", "550 5.5.4"),  # Arabic-Indic 1
        ({"size": str(MAX_SIZE + 1)}, "size", "552 5.3.4"),
        ({"size": "0x10"}, "size", "550 5.5.4"),
        ({"sender": f"a@acme{BAD_BYTE}.example"}, "sender", "550 5.1.7"),
        ({"sasl_username": f"u{BAD_BYTE}"}, "sasl_username", "550 5.5.4"),
        ({"instance": f"i{BAD_BYTE}"}, "instance", "550 5.5.4"),
        ({"queue_id": BAD_BYTE}, "queue_id", "550 5.5.4"),
    ],
)
def test_invalid_values_are_named(kw: dict[str, str], attribute: str, code: str) -> None:
    bad = invalid(attrs(**kw))
    assert bad is not None and bad.attribute == attribute
    assert bad.action.startswith(code + " ") and attribute in bad.action
    assert bad.action.isascii() and bad.action.isprintable()  # safe in an SMTP reply


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"recipient_count": str(MAX_RECIPIENTS), "size": str(MAX_SIZE)},
        {"recipient_count": "", "size": ""},  # empty: as absent
        {"sender": "jörg@bücher.example", "sasl_username": "zoë"},
        {"helo_name": BAD_BYTE, "recipient": BAD_BYTE, "ccert_subject": BAD_BYTE},  # unread
    ],
)
def test_values_postfix_sends_are_valid(kw: dict[str, str]) -> None:
    assert invalid(attrs(**kw)) is None


class RefusingBackend:
    """Counts like the database; `refuse` makes consume fail as PostgreSQL refusing a value."""

    def __init__(self) -> None:
        self.local = LocalCounters(processes=1)
        self.refuse = False

    async def recover(self) -> None:
        pass

    async def find(self, lookup: str, key: str) -> OrgLimits | None:
        return ORG if (lookup, key) == ("domain", "acme.example") else None

    async def consume(self, stage: str, org: OrgLimits, instance: str, recipients: int,
                      size: int, ttl_seconds: int) -> Outcome:
        if self.refuse:
            self.refuse = False
            raise psycopg.errors.NumericValueOutOfRange("integer out of range")
        return self.local.consume(stage, org, instance, recipients, size, T0)

    async def lease(self, org: OrgLimits, wants: list[Want]) -> list[Grant]:
        raise AssertionError("not in lease mode")

    async def release(self, org_id: uuid.UUID, unspent: list[Unspent]) -> None:
        raise AssertionError("not in lease mode")


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_value_postgres_refuses_is_that_requests_problem_not_an_outage() -> None:
    async def run() -> tuple[list[str], bool]:
        backend = RefusingBackend()
        service = PolicyService(parse({"policyd": {"degraded_retry_seconds": 3600}}), backend,
                                wallclock=lambda: T0)
        answers = [await service.decide(attrs(instance=f"m{i}")) for i in range(100)]
        backend.refuse = True
        answers.append(await service.decide(attrs(instance="odd")))
        # still decided by the backend, which knows the 100 messages
        answers.append(await service.decide(attrs(instance="m101")))
        return answers, service.degraded

    errors = _sample("postkeep_policyd_backend_errors_total")
    degraded = _sample("postkeep_policyd_degraded_decisions_total", mode="share")
    answers, was_degraded = asyncio.run(run())
    assert answers[:100] == [DUNNO] * 100
    assert answers[100].startswith("450 4.3.0 ")
    assert answers[101].startswith("DEFER_IF_PERMIT 4.7.1") and "host share" not in answers[101]
    assert not was_degraded
    assert _sample("postkeep_policyd_backend_errors_total") == errors
    assert _sample("postkeep_policyd_degraded_decisions_total", mode="share") == degraded


def test_the_server_answers_undecodable_bytes_and_keeps_the_connection() -> None:
    def raw(instance: bytes) -> bytes:
        return (b"protocol_state=DATA\nsender=a@acme.example\nrecipient_count=1\nsize=0\n"
                b"instance=" + instance + b"\n\n")

    async def run() -> list[bytes]:
        service = PolicyService(parse({}), RefusingBackend(), wallclock=lambda: T0)
        server = PolicyServer(service.decide, Limits(), 30)
        port = await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            out = []
            for instance in (b"\xff\xfe", b"fine"):
                writer.write(raw(instance))
                await writer.drain()
                out.append(await asyncio.wait_for(reader.readuntil(b"\n\n"), 30))
            writer.close()
            return out
        finally:
            await server.stop()

    refused, fine = asyncio.run(run())
    assert refused.startswith(b"action=550 5.5.4 ") and b"instance" in refused
    assert fine == b"action=DUNNO\n\n"
