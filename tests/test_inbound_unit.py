"""Inbound mail without services: the milter's decision and the Postfix maps.

`decide.inbound` says whether a message is an organisation's inbound mail
(no login, an untrusted client, every recipient at an inbound domain of one
organisation); `inbound_maps` is what `postkeep domain set-inbound` writes
for Postfix (relay domains, and a transport per domain).
"""

from __future__ import annotations

import uuid

import pytest

from postkeep.cli.directory import inbound_maps, relay_transport
from postkeep.milter.decide import Action, inbound
from postkeep.storage.metadata.directory import Organisation
from postkeep.storage.metadata.inbound import InboundDomain

pytestmark = pytest.mark.unit

ACME = Organisation(uuid.uuid4(), "acme", "pro", 90, 365)
BETA = Organisation(uuid.uuid4(), "beta", "free", 7, 30)
INBOUND = {"acme.example": ACME, "mail.acme.example": ACME, "beta.example": BETA}


def _decide(recipients: list[str], *, login: str | None = None, trusted: bool = False
            ) -> tuple[Action, str, str] | None:
    d = inbound(auth_user=login, trusted=trusted, recipients=recipients,
                by_inbound_domain=INBOUND.get)
    return None if d is None else (d.action, d.org.name if d.org else "", d.domain)


def test_untrusted_client_to_an_inbound_domain_is_inbound() -> None:
    assert _decide(["<Sales@ACME.example>", "x@mail.acme.example"]) == (
        Action.CAPTURE, "acme", "acme.example")


@pytest.mark.parametrize(("recipients", "login", "trusted"), [
    (["sales@acme.example"], "alice", False),  # a submission
    (["sales@acme.example"], None, True),  # our own client (trusted network, local)
    (["sales@acme.example", "x@beta.example"], None, False),  # two organisations
    (["sales@acme.example", "x@elsewhere.example"], None, False),  # not only ours
    (["x@elsewhere.example"], None, False),
    ([], None, False),
])
def test_anything_else_is_not_inbound(recipients: list[str], login: str | None,
                                      trusted: bool) -> None:
    assert _decide(recipients, login=login, trusted=trusted) is None


def test_relay_transport() -> None:
    assert relay_transport("mx.acme.example") == "smtp:[mx.acme.example]"
    assert relay_transport("10.0.0.5:2525") == "smtp:[10.0.0.5]:2525"
    assert relay_transport("[mx.acme.example]:25") == "smtp:[mx.acme.example]:25"
    for bad in ("", "mx acme", "a:b:c", "mx.example:99999", "x;rm"):
        with pytest.raises(ValueError):
            relay_transport(bad)


def test_inbound_maps() -> None:
    domains, transport = inbound_maps([InboundDomain("acme.example", "relay", "mx.acme.example:25"),
                                       InboundDomain("beta.example", "archive", None)])
    assert [ln for ln in domains.splitlines() if not ln.startswith("#")] == [
        "acme.example\tinbound", "beta.example\tinbound"]
    assert [ln for ln in transport.splitlines() if not ln.startswith("#")] == [
        "acme.example\tsmtp:[mx.acme.example]:25", "beta.example\tdiscard:archived by postkeep"]


def test_inbound_message_survives_the_outage_spool_format() -> None:
    """An inbound message spooled during an outage keeps its type and clues."""
    from datetime import UTC, datetime

    from postkeep.storage.content.spool import decode_metadata, encode_metadata
    from postkeep.storage.metadata.inbound import ParentClues
    from postkeep.storage.metadata.messages import CapturedMessage

    now = datetime.now(UTC)
    clues = ParentClues(((uuid.uuid4(), now),), (uuid.uuid4(),), ("<a@b>",), "r@x.example",
                        "abuse")
    m = CapturedMessage(uuid.uuid4(), uuid.uuid4(), "acme.example", "Q1", "", ("s@acme.example",),
                        10, b"\0" * 32, "k", 5, now, now, now, direction="inbound",
                        message_type="complaint", clues=clues)
    back, _, _ = decode_metadata(encode_metadata(m, spooled_at=now, reason="s3 down"))
    assert back == m
