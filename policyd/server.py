"""The policy protocol over asyncio TCP: framing only, decisions elsewhere.

Postfix keeps a connection open and sends one request after another, waiting
for each reply, so each connection is served in order.  Hostile input (a
line without `=`, binary garbage, an oversized line or request, a request
cut off by EOF, a client that stalls past `policyd.read_timeout_seconds`)
is logged with the reason and the connection closed; nothing it sends can
reach the other connections.  A well-framed request with an invalid value
(a number out of range, bytes that are not UTF-8) is answered, refused by
the service, and the connection goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from postkeep.policyd import metrics
from postkeep.policyd.protocol import Limits, ProtocolError, RequestBuilder, format_reply

log = logging.getLogger("postkeep.policyd")

# (request, "host:port" of the policy client) -> action
Decide = Callable[[dict[str, str], str], Awaitable[str]]


class PolicyServer:
    def __init__(self, decide: Decide, limits: Limits, read_timeout: float) -> None:
        self.decide = decide
        self.limits = limits
        self.read_timeout = read_timeout
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._idle: set[asyncio.Task[None]] = set()  # waiting for a new request

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> int:
        """Listen on HOST:PORT, or on SOCK if given (a listening socket passed in by
        systemd's socket activation); returns the port (0 picks a free one)."""
        if sock is not None:
            self._server = await asyncio.start_server(self._serve, sock=sock, backlog=1024)
        else:
            self._server = await asyncio.start_server(self._serve, host, port, backlog=1024)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; close idle connections now, let busy ones finish their request."""
        if self._server is not None:
            self._server.close()
        for task in list(self._idle):
            task.cancel()
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        peer = _hostport(writer.get_extra_info("peername"))
        builder = RequestBuilder(self.limits)
        try:
            while True:
                if not builder.started and task is not None:
                    self._idle.add(task)
                try:
                    async with asyncio.timeout(self.read_timeout):
                        data = await reader.read(65536)
                except TimeoutError as exc:
                    if builder.started:
                        raise ProtocolError(
                            f"client stalled mid-request for {self.read_timeout:g}s") from exc
                    log.debug("idle connection from %s closed after %gs", peer,
                              self.read_timeout)
                    return
                finally:
                    if task is not None:
                        self._idle.discard(task)
                if not data:
                    if builder.mid_line:
                        raise ProtocolError("connection closed mid-line")
                    if builder.started:
                        raise ProtocolError("connection closed mid-request (no empty line)")
                    return
                for request in builder.feed(data):
                    started = time.perf_counter()
                    action = await self.decide(request, peer)
                    metrics.DECISION_SECONDS.observe(time.perf_counter() - started)
                    stage = request.get("protocol_state", "")
                    metrics.REQUESTS.labels(
                        stage if stage in ("RCPT", "DATA", "END-OF-MESSAGE") else "other",
                        _kind(action)).inc()
                    writer.write(format_reply(action))
                await writer.drain()
        except ProtocolError as exc:
            metrics.PROTOCOL_ERRORS.inc()
            log.warning("policy client %s: %s; connection closed", peer, exc.reason)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or we are stopping and it was idle
        except Exception:
            log.exception("policy client %s: unexpected error; connection closed", peer)
        finally:
            if task is not None:
                self._connections.discard(task)
                self._idle.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


def _hostport(peer: object) -> str:
    """'host:port' for an asyncio peername (a tuple for TCP), else its str."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _kind(action: str) -> str:
    """The REQUESTS metric's action label."""
    if action == "DUNNO":
        return "dunno"
    return "refuse" if action.startswith("5") else "defer"
