"""Time-ordered message ids (UUIDv7, RFC 9562 section 5.7).

Ids sort by creation time, so the primary-key index stays append-mostly and
ids in logs read in order.  Python gains uuid.uuid7 only in 3.14; this is the
RFC's layout with a per-process counter in rand_a (method 1 of section 6.2)
so ids minted in the same millisecond by one process still sort in order.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import UTC, datetime

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7(now_ns: int | None = None) -> uuid.UUID:
    """A new UUIDv7: 48-bit Unix ms, version, 12-bit counter, variant, 62 random bits."""
    global _last_ms, _counter
    ms = (now_ns if now_ns is not None else time.time_ns()) // 1_000_000
    with _lock:
        if ms > _last_ms:
            _last_ms, _counter = ms, int.from_bytes(os.urandom(2)) & 0x3FF
        else:
            ms = _last_ms  # clock went back or same ms: keep order
            _counter += 1
            if _counter > 0xFFF:  # 4096 ids in one ms: borrow the next ms
                _last_ms = ms = ms + 1
                _counter = 0
        counter = _counter
    rand_b = int.from_bytes(os.urandom(8)) & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)


def uuid7_time(u: uuid.UUID) -> datetime:
    """The creation time carried by a UUIDv7 (millisecond precision, UTC)."""
    return datetime.fromtimestamp((u.int >> 80) / 1000, tz=UTC)
