"""Unit tests of the milter's pure decisions (organisation, replies)."""

from __future__ import annotations

import uuid

import pytest

from postkeep.milter.decide import (
    Action,
    address_domain,
    classify,
    header_from_address,
    refusal_reply,
    tempfail_reply,
)
from postkeep.storage.metadata.directory import Organisation

pytestmark = pytest.mark.unit

ACME = Organisation(uuid.uuid4(), "acme", "pro", 90, 365)
BETA = Organisation(uuid.uuid4(), "beta", "free", 7, 30)


def _classify(auth: str | None, env_from: str, header_from: str | None = None,
              unknown: str = "reject"):  # type: ignore[no-untyped-def]
    return classify(
        auth_user=auth, envelope_from=env_from, header_from=header_from,
        by_submitter={"beta-app": BETA}.get, by_domain={"acme.example": ACME}.get,
        unknown_sender=unknown,
    )


@pytest.mark.parametrize("addr,domain", [
    ("<a@Acme.Example>", "acme.example"),
    ("a@acme.example.", "acme.example"),
    ("<>", ""),
    ("no-at-sign", ""),
    ("a@bad_domain!", ""),
    ('"odd@local"@acme.example', "acme.example"),
    ("a@\udcff.example", ""),
])
def test_address_domain(addr: str, domain: str) -> None:
    assert address_domain(addr) == domain


def test_sasl_user_wins_over_sender_domain() -> None:
    d = _classify("beta-app", "<x@acme.example>")
    assert d.action is Action.CAPTURE and d.org is BETA and d.via_login
    assert not _classify(None, "<x@acme.example>").via_login


def test_unknown_sasl_login_is_never_attributed_by_the_domain_it_claims() -> None:
    d = _classify("stranger", "<x@acme.example>", "x@acme.example")
    assert d.action is Action.REJECT and d.org is None
    r = refusal_reply(d)
    assert (r.code, r.enhanced) == ("550", "5.7.1")
    assert "SASL login stranger is not a registered submitter" in r.text
    passed = classify(auth_user="stranger", envelope_from="<x@acme.example>", header_from=None,
                      by_submitter={}.get, by_domain={"acme.example": ACME}.get,
                      unknown_sender="reject", unknown_login="pass")
    assert passed.action is Action.PASS and passed.org is None


def test_null_sender_uses_header_from() -> None:
    d = _classify(None, "<>", "Bounce Robot <robot@acme.example>")
    assert d.action is Action.CAPTURE and d.org is ACME


def test_unknown_domain_rejected_or_passed_by_configuration() -> None:
    d = _classify(None, "<x@other.example>")
    assert d.action is Action.REJECT
    r = refusal_reply(d)
    assert (r.code, r.enhanced) == ("550", "5.7.1") and "other.example" in r.text
    assert _classify(None, "<x@other.example>", unknown="pass").action is Action.PASS


def test_garbage_from_header_never_raises() -> None:
    for value in ["", "<<<>>>", "\x00\x01", "a@", "=?x?q?broken", "a" * 5000, "@@@,,,;;"]:
        header_from_address(value)
        assert _classify(None, "<>", value).action is Action.REJECT


def test_tempfail_reply_names_backend() -> None:
    r = tempfail_reply("s3")
    assert (r.code, r.enhanced) == ("451", "4.3.0") and "s3" in r.text
    assert "postgres" in tempfail_reply("postgres").text


def test_bounce_domain_prefers_the_from_domains_own() -> None:
    import uuid

    from postkeep.milter.decide import choose_bounce_domain
    from postkeep.storage.metadata.directory import Organisation

    org = Organisation(uuid.uuid4(), "o", "pro", 90, 365,
                       bounce_domains=(("brand.example", "bounces.brand.example"),
                                       ("mail.example", "b.mail.example")))
    assert choose_bounce_domain(org, "brand.example", "mail.example", "pf.example") == (
        "bounces.brand.example")
    assert choose_bounce_domain(org, "other.example", "mail.example", "pf.example") == (
        "b.mail.example")
    assert choose_bounce_domain(org, "", "x.example", "pf.example") == "pf.example"
