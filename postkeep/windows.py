"""Rate-limit windows: how long an 'hour' and a 'day' are, and where each starts.

Configuration ([policyd] window lengths), the limit counters in PostgreSQL
(storage/metadata/limits.py) and policyd's decisions all speak of the same
windows, so the type lives here, on the ground floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


@dataclass(frozen=True)
class Windows:
    """How long the 'hour' (messages) and 'day' (recipients, bytes) windows are."""

    hour_seconds: int = 3600
    day_seconds: int = 86400

    def length(self, kind: str) -> int:
        return self.hour_seconds if kind == "messages" else self.day_seconds

    def start(self, kind: str, now: datetime) -> datetime:
        """The start of the window of KIND that holds NOW (aligned to the epoch)."""
        seconds = math.floor(now.timestamp())
        return datetime.fromtimestamp(seconds - seconds % self.length(kind), UTC)

    def end(self, kind: str, now: datetime) -> datetime:
        return self.start(kind, now) + timedelta(seconds=self.length(kind))


HOURS_AND_DAYS = Windows()  # UTC hours and days: what tier limits mean
