"""An aiosmtpd server on loopback in a thread of its own, for the tests' fake
remote MXs and relays."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def smtp_server(handler: Any, port: int, hostname: str, ident: str,
                protocol: Callable[..., Any] | None = None,
                join_seconds: float = 5) -> Iterator[asyncio.AbstractEventLoop]:
    """Serve HANDLER on 127.0.0.1:PORT until the block ends; yields the
    server's event loop (for a caller that must act in it before the close)."""
    from aiosmtpd.smtp import SMTP

    make = protocol or SMTP
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(
        lambda: make(handler, hostname=hostname, ident=ident), "127.0.0.1", port))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(join_seconds)
