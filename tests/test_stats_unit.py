"""`postkeep stats` without services: the table, the rates, the options."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from postkeep import cli
from postkeep.cli.stats import format_groups
from postkeep.storage.lifecycle.stats import Group

pytestmark = pytest.mark.unit


def _group(key: str, sent: int, delivered: int, bounced: int, complained: int,
           replied: int) -> Group:
    return Group(key=key, messages=sent, bytes=100 * sent, sent=sent, queued=0,
                 delivered=delivered, deferred=0, bounced=bounced, expired=0,
                 complained=complained, replied=replied, auto_replied=0)


def test_rates_are_per_recipient_sent_and_none_without_any() -> None:
    g = _group("spring", 4, 3, 1, 1, 1)
    d = g.as_dict()
    assert (d["delivery_rate"], d["bounce_rate"], d["complaint_rate"], d["reply_rate"]) == (
        0.75, 0.25, 0.25, 0.25)
    empty = _group("inbound-only", 0, 0, 0, 0, 0).as_dict()
    assert empty["delivery_rate"] is None and empty["reply_rate"] is None


def test_table_shows_counts_and_percentages() -> None:
    text = format_groups("campaign", [_group("spring", 4, 3, 1, 1, 1)])
    head, row = text.splitlines()
    assert head.split()[:3] == ["CAMPAIGN", "MESSAGES", "SENT"]
    assert row.split() == ["spring", "4", "4", "3", "1", "1", "1", "0", "75.0%", "25.0%",
                           "25.0%", "25.0%"]
    assert format_groups("day", []) == "no mail in this period"


def test_help_names_the_options() -> None:
    cli._register()
    result = CliRunner().invoke(cli.cli, ["stats", "--help"])
    assert result.exit_code == 0
    for option in ("--org", "--since", "--until", "--by", "--direction", "--json"):
        assert option in result.output
    assert "[campaign|day|direction|type]" in result.output
