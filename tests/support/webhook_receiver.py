"""A real HTTP webhook receiver on 127.0.0.1 for the webhook tests.

Each path (one per endpoint a test registers) has its own behaviour: fail the
first N requests with 500, drop the connection of the first N (no answer at
all), or hold every request until the test releases it (`gate`).  Every
request that got a 2xx is recorded with its headers and body; so is every
request seen at all (`seen`).
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class Behaviour:
    fail_first: int = 0          # answer 500 to the first N requests
    drop_first: int = 0          # close the connection without answering the first N
    gate: threading.Event | None = None  # hold each request until set
    held: threading.Event = field(default_factory=threading.Event)  # set while one is held
    count: int = 0


class Receiver:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.behaviours: dict[str, Behaviour] = {}
        self.received: list[Received] = []
        self.seen: list[Received] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                got = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with receiver.lock:
                    b = receiver.behaviours.setdefault(self.path, Behaviour())
                    b.count += 1
                    count = b.count
                    receiver.seen.append(got)
                if b.gate is not None:
                    b.held.set()
                    b.gate.wait(120)
                if count <= b.drop_first:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status = 500 if count <= b.drop_first + b.fail_first else 200
                if status == 200:
                    with receiver.lock:
                        receiver.received.append(got)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def behave(self, path: str, b: Behaviour) -> None:
        with self.lock:
            self.behaviours[path] = b

    def got(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def seen_at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.seen if r.path == path]


@contextmanager
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    try:
        yield r
    finally:
        for b in r.behaviours.values():
            if b.gate is not None:
                b.gate.set()
        r.server.shutdown()
        r.server.server_close()
