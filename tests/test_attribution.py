"""Unit tests of attribution (issue 21: 2, 4, 12): who vouches for a client.

Pure decisions (classify, is_trusted, the client address macro, policyd's
plan and answer for an unknown login) and the two services with in-memory
lookups: a login that is no registered submitter is never attributed or
signed by the domain it claims, and a client with no address is untrusted.
The real-stack versions are in test_attribution_stack.py.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest

from postkeep.config import Config, MilterConfig
from postkeep.milter.adapter import client_address
from postkeep.milter.decide import Action, classify, shown_login, system_mail, system_mix_reply
from postkeep.milter.signing import is_trusted, parse_networks
from postkeep.policyd.decide import DUNNO, plan, unknown_login_action
from postkeep.policyd.service import PolicyService
from postkeep.storage.metadata.directory import Organisation
from postkeep.storage.metadata.limits import OrgLimits, Outcome

pytestmark = pytest.mark.unit

ACME = Organisation(uuid.uuid4(), "acme", "pro", 90, 365)
NETS = parse_networks("t", ["127.0.0.0/8", "2001:db8::/32"])


def test_a_login_decides_alone() -> None:
    def run(login: str | None, mode: str = "reject"):  # type: ignore[no-untyped-def]
        return classify(auth_user=login, envelope_from="<billing@acme.example>",
                        header_from="billing@acme.example",
                        by_submitter={"acme-app": ACME}.get,
                        by_domain={"acme.example": ACME}.get,
                        unknown_sender="pass", unknown_login=mode)

    known = run("acme-app")
    assert (known.action, known.org, known.via_login) == (Action.CAPTURE, ACME, True)
    refused = run("mallory")
    assert (refused.action, refused.org) == (Action.REJECT, None)
    assert refused.reason == "SASL login mallory is not a registered submitter"
    assert (run("mallory", "pass").action, run("mallory", "pass").org) == (Action.PASS, None)
    by_domain = run(None)
    assert (by_domain.org, by_domain.via_login) == (ACME, False)


def test_shown_login_is_printable_and_bounded() -> None:
    assert shown_login("a b\r\n\x00é") == "a?b????"
    assert shown_login("x" * 200) == "x" * 64 + "..."


@pytest.mark.parametrize("addr,local,trusted", [
    ("127.0.0.1", False, True),
    ("IPv6:2001:db8::5", False, True),
    ("203.0.113.9", False, False),
    (None, False, False),  # no address: untrusted, never local
    ("unknown", False, False),
    ("garbage", False, False),
    (None, True, True),  # local submission, as {daemon_name} says
])
def test_trust_is_the_client_address_or_local_never_a_login(
        addr: str | None, local: bool, trusted: bool) -> None:
    assert is_trusted(addr, local, NETS) is trusted


def test_client_address_macro() -> None:
    assert client_address("192.0.2.1") == "192.0.2.1"
    assert client_address("IPv6:::1") == "IPv6:::1"
    assert client_address("unknown") is None  # XCLIENT ADDR=[UNAVAILABLE]
    assert client_address(None) is None and client_address("") is None


def _attrs(**kw: str) -> dict[str, str]:
    base = {"protocol_state": "RCPT", "sender": "billing@acme.example", "instance": "i1",
            "recipient_count": "0", "size": "0", "sasl_username": ""}
    base.update(kw)
    return base


def test_policyd_plans_a_login_before_system_domains() -> None:
    p = plan(_attrs(sender="noreply@sys.example", sasl_username="mallory"), ("sys.example",))
    assert (p.stage, p.lookup, p.key) == ("check", "submitter", "mallory")
    assert plan(_attrs(sender="noreply@sys.example"), ("sys.example",)).stage is None


SYS = frozenset({"sys.example"})


@pytest.mark.parametrize(("trusted", "login", "envelope", "from_", "want"), [
    (True, None, "sys.example", "sys.example", "system"),
    (True, None, "sys.example", "", "system"),
    (True, None, "", "sys.example", "system"),            # <> decided by From:
    (True, None, "sys.example", "acme.example", "mixed"),  # priority lane, customer From:
    (True, None, "acme.example", "sys.example", "mixed"),  # storage skipped, counted: no
    (True, "alice", "sys.example", "sys.example", "mixed"),  # a submitter is a customer
    (False, "alice", "sys.example", "sys.example", "mixed"),
    (True, "alice", "acme.example", "sys.example", "customer"),
    (False, None, "sys.example", "sys.example", "customer"),  # outsiders: attributed or refused
    (False, None, "acme.example", "sys.example", "customer"),
    (True, None, "acme.example", "acme.example", "customer"),
])
def test_system_mail_is_chosen_by_the_envelope_like_the_lane_and_policyd(
        trusted: bool, login: str | None, envelope: str, from_: str, want: str) -> None:
    assert system_mail(trusted=trusted, login=login, envelope_domain=envelope,
                       from_domain=from_, system_domains=SYS) == want
    # Whatever the milter calls system mail, policyd leaves uncounted.
    if want == "system" and envelope:
        assert plan(_attrs(sender=f"noreply@{envelope}"), tuple(SYS)).stage is None


def test_a_mix_of_system_and_customer_domains_gets_a_permanent_reply() -> None:
    reply = system_mix_reply("sys.example", "acme.example")
    assert (reply.code, reply.enhanced) == ("550", "5.7.1")
    assert "sys.example" in reply.text and "acme.example" in reply.text


def test_policyd_answer_for_an_unknown_login() -> None:
    action = unknown_login_action("mal\nlory", "reject")
    assert action == "550 5.7.1 postkeep: SASL login mal?lory is not a registered submitter"
    assert unknown_login_action("mallory", "pass") == DUNNO


LIMITS = OrgLimits(uuid.uuid4(), "acme", "free", 100, 300, None)


class Backend:
    """Submitters and domains in memory; every consume is recorded."""

    def __init__(self) -> None:
        self.orgs = {("domain", "acme.example"): LIMITS, ("submitter", "acme-app"): LIMITS}
        self.consumed: list[str] = []

    async def recover(self) -> None:
        return None

    async def find(self, lookup: str, key: str) -> OrgLimits | None:
        return self.orgs.get((lookup, key))

    async def consume(self, stage: str, org: OrgLimits, instance: str, recipients: int,
                      size: int, ttl_seconds: int) -> Outcome:
        self.consumed.append(org.name)
        return Outcome("ok")

    async def lease(self, org: OrgLimits, wants: list[object]) -> list[object]:
        raise AssertionError("no lease tiers here")

    async def release(self, org_id: uuid.UUID, unspent: list[object]) -> None:
        return None


@pytest.mark.parametrize("mode,expected", [
    ("reject", "550 5.7.1 postkeep: SASL login mallory is not a registered submitter"),
    ("pass", DUNNO),
])
def test_policyd_never_counts_an_unknown_login_for_the_domain_it_claims(
        mode: str, expected: str) -> None:
    backend = Backend()
    cfg = replace(Config(), milter=MilterConfig(unknown_login=mode))
    service = PolicyService(cfg, backend)  # type: ignore[arg-type]
    assert asyncio.run(service.decide(_attrs(sasl_username="mallory"))) == expected
    assert backend.consumed == []
    assert asyncio.run(service.decide(_attrs(sasl_username="acme-app"))) == DUNNO
    assert asyncio.run(service.decide(_attrs())) == DUNNO
    assert backend.consumed == ["acme", "acme"]
