"""The search filter -> SQL builder (storage/metadata/search.py), without a database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from postkeep.storage.metadata import search
from postkeep.storage.metadata.search import MessageFilter

pytestmark = pytest.mark.unit

T0 = datetime(2026, 12, 1, tzinfo=UTC)
COLS = "m.id, m.created_at"


@pytest.mark.parametrize(("text", "pattern"), [
    ("100%", "100\\%"),
    ("a_b", "a\\_b"),
    ("back\\slash", "back\\\\slash"),
    ("%_\\", "\\%\\_\\\\"),
    ("plain Invoice", "plain Invoice"),
])
def test_escape_like_makes_wildcards_literal(text: str, pattern: str) -> None:
    assert search.escape_like(text) == pattern


def test_subject_is_a_parameter_escaped_and_wrapped_never_spliced() -> None:
    where, params = search.where(MessageFilter(subject="50%_off'; DROP TABLE messages; --"))
    assert where == " WHERE m.subject ILIKE %s ESCAPE '\\'"
    assert params == ["%50\\%\\_off'; DROP TABLE messages; --%"]


def test_every_criterion_is_one_clause_with_its_parameters() -> None:
    oid = uuid.uuid4()
    after = (T0, uuid.uuid4())
    where, params = search.where(MessageFilter(
        org_id=oid, sender="A@x.test", recipient="R@y.test", status="bounced", subject="inv",
        direction="inbound", message_type="complaint", since=T0, until=T0,
        tags=(("campaign_id", "c-1"), ("lead_id", "7")), after=after))
    assert where.count("%s") == len(params)
    assert params == [oid, "A@x.test", "R@y.test", "bounced", "%inv%", "inbound",
                      "complaint", T0, T0, T0, '{"campaign_id": "c-1", "lead_id": "7"}',
                      "c-1", *after]
    # case-insensitive through the collation (an index condition under RLS), not lower()
    assert "lower(" not in where and where.count("COLLATE postkeep_ci") == 2
    # the recipient and its status on the same recipient row
    assert "r.recipient COLLATE postkeep_ci) = %s AND r.status = %s)" in where


def test_status_alone_is_any_recipients_status() -> None:
    where, params = search.where(MessageFilter(status="complained"))
    assert "EXISTS (SELECT 1 FROM message_recipients r" in where and "recipient" not in (
        where.split("r.metadata_expires_at")[1])
    assert params == ["complained"]


def test_no_criterion_no_where() -> None:
    assert search.where(MessageFilter()) == ("", [])
    sql, params = search.select(MessageFilter(limit=7), COLS)
    assert sql == f"SELECT {COLS} FROM messages m ORDER BY m.created_at DESC, m.id DESC LIMIT %s"
    assert params == [7]


def test_recipient_search_starts_from_the_recipient_rows() -> None:
    oid = uuid.uuid4()
    sql, params = search.select(MessageFilter(org_id=oid, recipient="R@y.test", status="bounced",
                                              subject="x", since=T0, limit=3), COLS)
    assert sql.startswith("SELECT m.* FROM (SELECT DISTINCT r.message_id,")
    assert "LATERAL (" in sql and "OFFSET 0) AS m" in sql and "EXISTS" not in sql
    assert sql.count("%s") == len(params)
    assert params == ["R@y.test", oid, "bounced", T0, oid, "%x%", T0, T0, 3]


@pytest.mark.parametrize("bad", [{"direction": "sideways"}, {"message_type": "spam"},
                                 {"status": "read"}])
def test_unknown_choices_are_refused(bad: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="one of"):
        MessageFilter(**bad)  # type: ignore[arg-type]
