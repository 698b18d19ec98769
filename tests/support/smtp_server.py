"""An aiosmtpd server on loopback in a thread of its own, for the tests' fake
remote MXs and relays."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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


@dataclass
class RemoteMX:
    """A remote MX on loopback (mx.test): 550 5.1.1 for unknown-*, 550 5.2.2 for
    full-*, 250 for the rest; remembers the envelope sender of every copy it
    took or refused."""

    senders: dict[str, str] = field(default_factory=dict)  # recipient -> MAIL FROM

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        self.senders[address.lower()] = envelope.mail_from
        local = address.split("@")[0].lower()
        if local.startswith("unknown-"):
            return f"550 5.1.1 <{address}>: user unknown here"
        if local.startswith("full-"):
            return f"550 5.2.2 <{address}>: mailbox full"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 Ok: queued"


@contextmanager
def serve_remote_mx(port: int) -> Iterator[RemoteMX]:
    """RemoteMX served on 127.0.0.1:PORT (the stack's POSTKEEP_FAKE_MX_PORT)."""
    mx = RemoteMX()
    with smtp_server(mx, port, "mx.test", "remote-mx"):
        yield mx
