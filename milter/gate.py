"""Failing fast while a backend is known to be down.

Without this, every message arriving during a PostgreSQL outage waits out
the pool's connect timeout (twice, with db.run's retry) before it can be
spooled or tempfailed: a few seconds each, so an outage that the spool could
absorb at full speed crawls.  `BackendGate` remembers the last failure; while
it stands, one caller at a time goes through to find out whether the backend
is back (and pays the wait), and every other caller gets a BackendError at
once.  The first success clears it.  Nothing here changes what is decided,
only how long it takes to learn that the backend is still down.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from postkeep.storage.metadata.db import BackendError


class BackendGate:
    """Remembers a backend's last failure; lets one caller probe while it stands."""

    def __init__(self) -> None:
        self._down: BackendError | None = None
        self._probe = threading.Lock()

    @property
    def down(self) -> BackendError | None:
        return self._down

    @contextmanager
    def attempt(self) -> Iterator[None]:
        """Run the block unless the backend is down and another caller is probing
        it (then BackendError at once); record how the block went."""
        down = self._down
        if down is not None and not self._probe.acquire(blocking=False):
            raise BackendError(down.backend, f"still unavailable ({down.reason})")
        try:
            yield
        except BackendError as exc:
            self._down = exc
            raise
        else:
            self._down = None
        finally:
            if down is not None:
                self._probe.release()
