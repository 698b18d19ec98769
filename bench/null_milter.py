"""A do-nothing pymilter: the floor any Python milter pays per message.

Same callbacks and negotiation as postkeep-milter's adapter (noreply on
envfrom/envrcpt/header/eoh/body, leading-space headers, a reply at end of
message) but no work at all.  The benchmark runs it as configuration D so
the milter's CPU per message can be split into "pymilter + libmilter +
Postfix's milter protocol" and "what postkeep does on top".

Usage: null_milter.py SOCKET PIDFILE   (SOCKET as libmilter spells it)
"""

from __future__ import annotations

import os
import sys
from typing import Any

import Milter


@Milter.header_leading_space
class NullMilter(Milter.Base):  # type: ignore[misc]
    """Accepts everything; touches nothing."""

    @Milter.noreply
    def envfrom(self, mailfrom: str, *params: str) -> Any:
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, to: str, *params: str) -> Any:
        return Milter.CONTINUE

    @Milter.noreply
    @Milter.decode("bytes")
    def header(self, name: str | bytes, value: bytes) -> Any:
        return Milter.CONTINUE

    @Milter.noreply
    def eoh(self) -> Any:
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk: bytes) -> Any:
        return Milter.CONTINUE

    def eom(self) -> Any:
        return Milter.CONTINUE


def main() -> None:
    socket, pidfile = sys.argv[1], sys.argv[2]
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()}\n")
    Milter.factory = NullMilter
    Milter.runmilter("postkeep-bench-null", socket, timeout=600)


if __name__ == "__main__":
    main()
