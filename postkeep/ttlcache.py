"""A bounded cache of values that each carry their own expiry time.

Organisation lookups in the milter and in the policy daemon, and the milter's
memory of keyless DKIM domains, all keep "this answer holds until T".  An
entry past its time is still returned (with its expiry) so a caller may fall
back on it while its backend is down; the caller decides.  Single dict
operations are atomic under the GIL, so threads can share one without a lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class Cached(Generic[V]):
    value: V
    expires: float

    def fresh(self, now: float) -> bool:
        return self.expires > now


class TtlCache(Generic[K, V]):
    """KEY → (value, expiry); emptied whole when it reaches MAX_ENTRIES."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._entries: dict[K, Cached[V]] = {}
        self._max = max_entries

    def get(self, key: K) -> Cached[V] | None:
        """The entry for KEY, fresh or not, or None."""
        return self._entries.get(key)

    def put(self, key: K, value: V, expires: float) -> None:
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[key] = Cached(value, expires)
