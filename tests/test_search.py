"""The search filter -> SQL builder (storage/metadata/search.py), without a database."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from postkeep.storage.metadata import search
from postkeep.storage.metadata.search import MessageFilter

pytestmark = pytest.mark.unit

T0 = datetime(2026, 12, 1, tzinfo=UTC)
COLS = "m.id, m.created_at"


def test_the_filter_is_json_with_only_the_criteria_given() -> None:
    oid = uuid.uuid4()
    after = (T0, uuid.uuid4())
    doc = json.loads(search.to_json(MessageFilter(
        org_id=oid, sender="A@x.test", recipient="R@y.test", status="bounced",
        subject="50%_off'; DROP TABLE messages; --", direction="inbound",
        message_type="complaint", since=T0, until=T0,
        tags=(("campaign_id", "c-1"), ("lead_id", "7")), after=after, limit=3)))
    assert doc == {"org_id": str(oid), "sender": "A@x.test", "recipient": "R@y.test",
                   "status": "bounced", "subject": "50%_off'; DROP TABLE messages; --",
                   "direction": "inbound", "message_type": "complaint",
                   "since": T0.isoformat(), "until": T0.isoformat(),
                   "tags": {"campaign_id": "c-1", "lead_id": "7"},
                   "after_at": T0.isoformat(), "after_id": str(after[1]), "limit": 3}
    assert json.loads(search.to_json(MessageFilter())) == {"limit": 50}


def test_the_query_passes_the_filter_as_one_parameter_never_spliced() -> None:
    sql, params = search.select(MessageFilter(subject="x'); DROP TABLE messages; --"), COLS)
    assert sql == (f"SELECT {COLS} FROM search_messages(%s::jsonb) m"
                   " ORDER BY m.created_at DESC, m.id DESC")
    assert "DROP" not in sql and len(params) == 1 and "DROP" in str(params[0])


@pytest.mark.parametrize("bad", [{"direction": "sideways"}, {"message_type": "spam"},
                                 {"status": "read"}])
def test_unknown_choices_are_refused(bad: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="one of"):
        MessageFilter(**bad)  # type: ignore[arg-type]
