"""sink.py - the dev stack's "next hop": an SMTP server that keeps every message.

Postfix relays everything to this server.  Each message is written as the exact
bytes received (CRLF kept, dot-unstuffed) to DIR/<n>.eml, and its envelope to
DIR/<n>.json (mail_from, rcpt_tos, mail_options, rcpt_options).  Both files are
written to a temporary name and renamed, so a reader never sees half a message;
the .json is renamed last, so its presence means the .eml is complete.

Usage: python sink.py --host 127.0.0.1 --port 10026 --dir /path/to/sink
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import re
import signal
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger("sink")


def _next_number(directory: Path) -> int:
    """First message number not used yet, so a restarted sink never overwrites."""
    used = [
        int(m.group(1)) for p in directory.iterdir() if (m := re.match(r"(\d+)\.json$", p.name))
    ]
    return max(used, default=0) + 1


def _write_atomic(path: Path, data: bytes) -> None:
    """Write DATA to PATH through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class SinkHandler:
    """aiosmtpd handler: accept every message and keep it on disk."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.counter = itertools.count(_next_number(directory))

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(rcpt_options)  # type: ignore[arg-type]
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        n = next(self.counter)
        content = envelope.original_content or b""
        meta: dict[str, Any] = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "mail_options": envelope.mail_options,
            "rcpt_options": envelope.rcpt_options,
            "size": len(content),
            "peer": list(session.peer) if session.peer else None,
        }
        await asyncio.to_thread(self._save, n, content, meta)
        log.info(
            "message %d: %d bytes from %s to %d recipients",
            n,
            len(content),
            envelope.mail_from,
            len(envelope.rcpt_tos),
        )
        return f"250 2.0.0 OK sink message {n}"

    def _save(self, n: int, content: bytes, meta: dict[str, Any]) -> None:
        _write_atomic(self.directory / f"{n}.eml", content)
        _write_atomic(self.directory / f"{n}.json", json.dumps(meta, indent=1).encode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True, type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sink %(message)s")
    args.dir.mkdir(parents=True, exist_ok=True)
    handler = SinkHandler(args.dir)

    def factory() -> SMTP:
        return SMTP(
            handler,
            decode_data=False,
            enable_SMTPUTF8=True,
            hostname="sink.postkeep.test",
            ident="postkeep-sink",
            data_size_limit=64 * 1024 * 1024,  # well above message_size_limit
            command_call_limit=None,  # 100+ RCPT commands per message are fine
            timeout=600,
        )

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(loop.create_server(factory, host=args.host, port=args.port))
    log.info("listening on %s:%d, writing to %s", args.host, args.port, args.dir)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.run_until_complete(stop.wait())
    server.close()
    loop.run_until_complete(server.wait_closed())
    log.info("stopped")


if __name__ == "__main__":
    main()
