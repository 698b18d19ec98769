"""Retention decisions without servers: classes, keys, bounds, windows, addresses."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from postkeep.storage.content import layout
from postkeep.storage.content.objects import message_key
from postkeep.storage.lifecycle import rules
from postkeep.storage.lifecycle.erasure import pg_regex_literal
from postkeep.storage.lifecycle.holds import HELD_AT
from postkeep.storage.lifecycle.retention import (
    _RULED,
    Week,
    choose_mode,
    day_ranges,
    droppable,
    parse_bounds,
)
from postkeep.storage.metadata import messages
from postkeep.storage.metadata.db import BackendError
from postkeep.storage.metadata.legal_holds import involves, normalise_address
from postkeep.storage.metadata.migrate import PARTITION_BATCH_DAYS, partition_batches

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 4, 23, 59, 30, tzinfo=UTC)


def test_classes_round_up_and_never_expire_before_the_stamp() -> None:
    for days in range(1, 4000):
        label = layout.content_class(days)
        if days > layout.CONTENT_CLASSES[-1]:
            assert label == layout.KEEP
            continue
        class_days = int(label.removesuffix("d"))
        assert class_days >= days
        # The smallest such class: no needless extra storage.
        assert all(c < days for c in layout.CONTENT_CLASSES if c < class_days)
    assert layout.content_class(7) == "7d"
    assert layout.content_class(8) == "14d"
    assert layout.content_class(365) == "365d"
    with pytest.raises(ValueError, match="at least 1"):
        layout.content_class(0)


def test_rules_are_bounded_one_per_class_never_per_org() -> None:
    planned = rules.planned_rules()
    assert len(planned) == len(layout.CONTENT_CLASSES) <= 20
    assert len({r.prefix for r in planned}) == len(planned)
    for r in planned:
        assert r.rule_id == f"postkeep-content-{r.days}d"
        assert r.prefix == f"messages/{r.days}d/"
    # No rule's prefix is a prefix of another's (7d vs 730d): the slash ends it.
    for a in planned:
        assert not any(b.prefix.startswith(a.prefix) for b in planned if b is not a)


def test_message_keys_carry_the_class_or_hold() -> None:
    org, mid = str(uuid.uuid4()), str(uuid.uuid4())
    assert message_key(org, mid, T0, content_days=7) == (
        f"messages/7d/{org}/2026/03/04/{mid}.eml.zst")
    assert message_key(org, mid, T0, content_days=31) == (
        f"messages/60d/{org}/2026/03/04/{mid}.eml.zst")
    assert message_key(org, mid, T0, content_days=9000) == (
        f"messages/keep/{org}/2026/03/04/{mid}.eml.zst")
    assert message_key(org, mid, T0, content_days=7, held=True) == (
        f"messages/hold/{org}/2026/03/04/{mid}.eml.zst")
    assert message_key(org, mid, T0) == f"messages/{org}/2026/03/04/{mid}.eml.zst"


def test_which_keys_lifecycle_rules_cover() -> None:
    org = str(uuid.uuid4())
    assert layout.covered_by_rules(f"messages/30d/{org}/x.eml.zst")
    assert not layout.covered_by_rules(f"messages/hold/{org}/x.eml.zst")
    assert not layout.covered_by_rules(f"messages/keep/{org}/x.eml.zst")
    assert not layout.covered_by_rules(f"messages/{org}/2026/01/01/x.eml.zst")
    assert layout.held_key(f"messages/30d/{org}/2026/x.eml.zst") == (
        f"messages/hold/{org}/2026/x.eml.zst")
    assert layout.held_key(f"messages/{org}/2026/x.eml.zst") == (
        f"messages/hold/{org}/2026/x.eml.zst")
    assert layout.is_held_key(layout.held_key(f"messages/7d/{org}/a"))


def test_the_sweepers_sql_pattern_agrees_with_covered_by_rules() -> None:
    org = str(uuid.uuid4())
    for key in (f"messages/30d/{org}/a", f"messages/3650d/{org}/a", f"messages/hold/{org}/a",
                f"messages/keep/{org}/a", f"messages/{org}/2026/01/01/a", "messages/d/x",
                f"messages/7d{org}/a"):
        assert bool(re.match(_RULED, key)) == layout.covered_by_rules(key), key


def test_partition_bounds_as_postgres_prints_them() -> None:
    assert parse_bounds(
        "FOR VALUES FROM ('2026-11-23 00:00:00+00') TO ('2026-11-30 00:00:00+00')"
    ) == (datetime(2026, 11, 23, tzinfo=UTC), datetime(2026, 11, 30, tzinfo=UTC))
    lo, hi = parse_bounds("FOR VALUES FROM ('9999-12-31 00:00:00+00') TO (MAXVALUE)") or (
        None, None)
    assert lo == datetime(9999, 12, 31, tzinfo=UTC) and hi is None
    assert parse_bounds("DEFAULT") is None
    assert parse_bounds("FOR VALUES IN ('a')") is None


def _week(lo: datetime) -> Week:
    return Week(f"messages_{lo:%Y%m%d}", f"message_recipients_{lo:%Y%m%d}", lo,
                lo + timedelta(days=7))


def test_only_weeks_wholly_past_the_cutoff_drop_never_held() -> None:
    now = datetime(2026, 11, 25, 12, tzinfo=UTC)
    weeks = [_week(datetime(2026, 11, 16, tzinfo=UTC)),   # ends 11-23: gone
             _week(datetime(2026, 11, 9, tzinfo=UTC)),    # ends 11-16: gone
             _week(datetime(2026, 11, 23, tzinfo=UTC)),   # ends 11-30: still live
             Week("messages_held", "message_recipients_held", HELD_AT,
                  datetime(9999, 12, 31, tzinfo=UTC))]
    out = droppable(weeks, now)
    assert [w.lower.day for w in out] == [9, 16]  # oldest first
    # Exactly at the upper bound: every stamp in it is < upper <= now.
    assert droppable([_week(datetime(2026, 11, 18, 12, tzinfo=UTC))], now) == [
        _week(datetime(2026, 11, 18, 12, tzinfo=UTC))]
    assert droppable(weeks, datetime(2026, 11, 16, tzinfo=UTC)) == [weeks[1]]


def test_statistics_days_merge_into_few_ranges() -> None:
    today = date(2026, 11, 25)
    recent = date(2026, 11, 17)
    assert day_ranges([], recent, today) == [(recent, today)]
    assert day_ranges([date(2026, 10, 1), date(2026, 10, 2), date(2026, 10, 4),
                       date(2026, 11, 16), date(2026, 11, 20)], recent, today) == [
        (date(2026, 10, 1), date(2026, 10, 2)), (date(2026, 10, 4), date(2026, 10, 4)),
        (date(2026, 11, 16), today)]


def test_mode_follows_setting_and_server() -> None:
    assert choose_mode("auto", True) == "lifecycle"
    assert choose_mode("auto", False) == "sweep"
    assert choose_mode("sweep", True) == "sweep"
    assert choose_mode("lifecycle", True) == "lifecycle"
    with pytest.raises(BackendError, match="no lifecycle support"):
        choose_mode("lifecycle", False)


@pytest.mark.parametrize(("text", "want"), [
    ("Alice@Example.COM", "alice@example.com"),
    ("  <bob@x.example> ", "bob@x.example"),
    ('"odd local"@x.example'.replace(" ", "_"), '"odd_local"@x.example'),
])
def test_addresses_are_normalised(text: str, want: str) -> None:
    assert normalise_address(text) == want


@pytest.mark.parametrize("bad", ["", "alice", "@x.example", "alice@", "a b@x.example", "<>"])
def test_bad_addresses_are_refused_naming_them(bad: str) -> None:
    with pytest.raises(ValueError, match="expected local@domain"):
        normalise_address(bad)


def test_involves_matches_as_the_sql_does_sender_from_or_any_recipient() -> None:
    # legal_holds.involves_sql's rules, for a spool entry not in PostgreSQL yet.
    a = "alice@x.example"
    assert involves("Alice@X.example", None, (), a)
    assert involves("b@y", "Alice <ALICE@x.example>", (), a)
    assert involves("b@y", "alice@x.example", (), a)
    assert involves("b@y", None, ("c@z", "ALICE@x.example"), a)
    assert not involves("b@y", "Malice <malice@x.example.net>", ("c@z",), a)
    assert not involves("alice@x.example.org", "alice@x.example.org", (), a)


def test_regex_literal_matches_only_itself() -> None:
    addr = "a.b+c(d)*@x-y.example"
    pat = pg_regex_literal(addr)
    # Python's re shares the escaping rules used here (\ before non-alnum).
    assert re.fullmatch(pat, addr)
    assert not re.fullmatch(pat, "aXb+c(d)*@x-y.example")


def _row(**kw: object) -> messages.MessageRow:
    base: dict[str, object] = dict(
        id=uuid.uuid4(), org_id=uuid.uuid4(), domain="d.example", direction="outbound",
        queue_id="Q", message_id_header=None, envelope_from="s@d.example", header_from=None,
        subject=None, size=1, object_key="messages/7d/o/x.eml.zst", compressed_size=1,
        sha256=b"\0" * 32, content_expires_at=T0, metadata_expires_at=T0 + timedelta(days=30),
        status="queued", recipient_count=1, created_at=T0 - timedelta(days=7),
        accepted_at=None)
    base.update(kw)
    return messages.MessageRow(**base)  # type: ignore[arg-type]


def test_content_availability_is_derived_from_stamp_erasure_and_hold() -> None:
    before, after = T0 - timedelta(seconds=1), T0
    assert messages.content_unavailable_reason(_row(), before) is None
    assert messages.content_unavailable_reason(_row(), after) == messages.CONTENT_EXPIRED
    erased = _row(content_erased_at=T0 - timedelta(days=1))
    reason = messages.content_unavailable_reason(erased, before)
    assert reason is not None and reason.startswith(messages.CONTENT_ERASED)
    held = _row(object_key="messages/hold/o/x.eml.zst")
    assert messages.content_available(held, after + timedelta(days=400))
    # Erasure wins over a hold (a hold refuses erasure, so this only happens
    # for content erased before the hold was placed).
    assert not messages.content_available(
        _row(object_key="messages/hold/o/x.eml.zst", content_erased_at=T0), before)


def test_memory_store_reports_failed_deletes() -> None:
    store = rules.MemoryRetention({"a": b"1", "b": b"2"})
    store.fail_deletes.add("b")
    assert store.delete_many(["a", "b", "c"]) == ["b"]
    assert store.objects == {"b": b"2"}


def test_partition_batches_cover_the_horizon_in_bounded_steps() -> None:
    assert partition_batches(0) == [0]
    assert partition_batches(10) == [10]
    assert partition_batches(PARTITION_BATCH_DAYS) == [PARTITION_BATCH_DAYS]
    steps = partition_batches(3650 + 35)
    assert steps[-1] == 3685 and steps == sorted(steps)
    assert all(b - a <= PARTITION_BATCH_DAYS for a, b in zip([0, *steps], steps, strict=False))


def test_erase_warns_and_goes_on_when_it_cannot_read_the_spool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Root reads any directory, so the refusal is the spool's scandir raising.
    from postkeep.cli import retention as cli_retention
    from postkeep.config import parse
    from postkeep.storage.content import spool as spool_mod

    (tmp_path / "spool").mkdir()
    cfg = parse({"milter": {"outage_spool_directory": str(tmp_path / "spool")}})

    def unreadable(spool: object, match: object) -> list[object]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(spool_mod, "waiting", unreadable)
    left, where = cli_retention._still_spooled(cfg, uuid.uuid4(), "a@x.example", 5.0)
    assert (left, where) == (0, str(tmp_path / "spool"))
    err = capsys.readouterr().err
    assert "cannot read the spool" in err and "a@x.example" in err
