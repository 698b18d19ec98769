"""Which key signs and which records are published, as pure functions of time.

`select_active` and `key_states` are what the milter and `postkeep dkim list`
decide with; here they run over hand-built rows, no database, including the
cases rotation gets wrong: dual RSA + Ed25519, a key scheduled in the future,
retiring the newest key, two keys activated at the same instant.  Also the
CLI's pure parsers.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from postkeep.cli.dkim import check_selector, parse_duration, parse_time
from postkeep.signing_keys import Algorithm
from postkeep.storage.metadata.dkim_keys import DkimKey, key_states, published, select_active

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)
ORG = uuid.uuid4()
_ids = iter(range(1, 1000))


def key(
    selector: str,
    active_from: datetime | None,
    retire_after: datetime | None = None,
    algorithm: Algorithm = "rsa-sha256",
    domain: str = "example.org",
) -> DkimKey:
    return DkimKey(next(_ids), ORG, domain, selector, algorithm, b"pub", T0 - 10 * DAY,
                   active_from, retire_after, T0)


def states(keys: list[DkimKey], at: datetime) -> dict[str, str]:
    return {k.selector: s for k, s in key_states(keys, at)}


def active(keys: list[DkimKey], at: datetime) -> list[str]:
    return sorted(k.selector for k in select_active(keys, at).values())


def test_rotation_with_grace() -> None:
    old = key("old", T0, retire_after=T0 + 14 * DAY)
    new = key("new", T0 + 7 * DAY)
    keys = [old, new]
    assert states(keys, T0 - DAY) == {"old": "staged", "new": "staged"}
    assert states(keys, T0) == {"old": "active", "new": "staged"}
    assert states(keys, T0 + 7 * DAY) == {"old": "grace", "new": "active"}
    assert states(keys, T0 + 14 * DAY) == {"old": "retired", "new": "active"}
    assert [k.selector for k in published(keys, T0 + 8 * DAY)] == ["old", "new"]
    assert [k.selector for k in published(keys, T0 + 14 * DAY)] == ["new"]


def test_one_active_key_per_algorithm_dual_signs() -> None:
    keys = [key("r1", T0), key("e1", T0, algorithm="ed25519-sha256"), key("r0", T0 - DAY)]
    assert active(keys, T0) == ["e1", "r1"]
    assert states(keys, T0)["r0"] == "grace"  # superseded, never retired: still published


def test_domains_are_independent() -> None:
    keys = [key("a", T0, domain="a.example"), key("b", T0, domain="b.example")]
    assert active(keys, T0) == ["a", "b"]


def test_retiring_the_newest_falls_back_to_the_previous_unretired_key() -> None:
    keys = [key("old", T0), key("new", T0 + DAY, retire_after=T0 + 2 * DAY)]
    assert active(keys, T0 + DAY) == ["new"]
    assert active(keys, T0 + 2 * DAY) == ["old"]


def test_never_activated_key_is_staged_and_a_tie_goes_to_the_later_row() -> None:
    first, second = key("first", T0), key("second", T0)
    staged = key("staged", None)
    assert active([first, second, staged], T0) == ["second"]
    assert states([staged], T0 + 1000 * DAY) == {"staged": "staged"}


def test_cli_time_and_duration_parsing() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_time("--at", "now", now) == now
    assert parse_time("--at", "2026-04-01T00:00:00", now) == datetime(2026, 4, 1, tzinfo=UTC)
    assert parse_time("--at", "2026-04-01T02:00:00+02:00", now) == datetime(
        2026, 4, 1, tzinfo=UTC
    )
    with pytest.raises(ValueError, match=r"--at 'soon': expected 'now' or ISO 8601"):
        parse_time("--at", "soon", now)
    assert parse_duration("--grace", "7d") == timedelta(days=7)
    assert parse_duration("--grace", "12h") == timedelta(hours=12)
    assert parse_duration("--grace", "0") == timedelta(0)
    with pytest.raises(ValueError, match="--grace '-1d'"):
        parse_duration("--grace", "-1d")


def test_selector_must_be_dns_labels() -> None:
    assert check_selector("S2026") == "s2026"
    assert check_selector("mail.2026-03") == "mail.2026-03"
    for bad in ("", "a_b", "-x", "a..b", "x" * 64):
        with pytest.raises(ValueError, match="selector"):
            check_selector(bad)
