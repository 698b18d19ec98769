"""Real postkeep-policyd processes on loopback ports, and a policy client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 15) -> None:
    """Return once 127.0.0.1:PORT accepts connections; TimeoutError after TIMEOUT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@contextmanager
def policyds(config_path: str, count: int) -> Iterator[list[tuple[int, int]]]:
    """COUNT postkeep-policyd processes; yields (policy port, metrics port) each."""
    ports = [(free_port(), free_port()) for _ in range(count)]
    binary = str(Path(sys.executable).with_name("postkeep-policyd"))
    procs = []
    try:
        for port, mport in ports:
            procs.append(subprocess.Popen(
                [binary, "--config", config_path, "--listen", f"127.0.0.1:{port}",
                 "--metrics", f"127.0.0.1:{mport}"], cwd="/tmp", env=os.environ.copy()))
        for port, _ in ports:
            wait_listening(port)
        yield ports
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def request(state: str, sender: str, instance: str, recipients: int = 1, size: int = 0,
            sasl_username: str = "") -> bytes:
    """A policy request as Postfix 3.7 sends it (the attributes policyd reads)."""
    return (f"request=smtpd_access_policy\nprotocol_state={state}\nprotocol_name=ESMTP\n"
            f"client_address=127.0.0.1\nsender={sender}\nrecipient=\n"
            f"recipient_count={recipients}\ninstance={instance}\nsize={size}\n"
            f"sasl_username={sasl_username}\n\n").encode()


class PolicyClient:
    """One connection, one request at a time (as Postfix's smtpd talks)."""

    def __init__(self, port: int, timeout: float = 30) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.buf = b""

    def ask(self, raw: bytes) -> str:
        self.sock.sendall(raw)
        while b"\n\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("policyd closed the connection")
            self.buf += chunk
        reply, _, self.buf = self.buf.partition(b"\n\n")
        return reply.decode().removeprefix("action=")

    def close(self) -> None:
        self.sock.close()
