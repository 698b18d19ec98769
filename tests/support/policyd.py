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


def config_with(source: str, target: Path, section: str, **values: object) -> str:
    """A copy of the TOML config at SOURCE, written to TARGET, with VALUES set in [SECTION].

    The keys must not be in SOURCE's section already (TOML refuses duplicates).
    """
    import json
    import tomllib

    text = Path(source).read_text()
    header = f"[{section}]\n"
    if header not in text:
        raise ValueError(f"{source} has no {header.strip()} section")
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    text = text.replace(header, header + lines, 1)
    tomllib.loads(text)  # fail here, not in the daemon, if it is not TOML
    target.touch(0o600)  # it holds the stack's inline S3 secret: owner-only, or refused
    target.write_text(text)
    return str(target)


async def hammer(ports: list[int], domain: str, clients: int, per_client: int) -> list[bytes]:
    """CLIENTS concurrent connections spread over PORTS, each sending PER_CLIENT DATA
    requests for new messages from DOMAIN one after another; every reply, raw."""
    import asyncio
    import uuid

    async def client(n: int) -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[n % len(ports)])
        out = []
        for i in range(per_client):
            writer.write(request("DATA", f"app@{domain}", f"{n}.{i}.{uuid.uuid4().hex[:6]}"))
            await writer.drain()
            out.append(await reader.readuntil(b"\n\n"))
        writer.close()
        return out

    results = await asyncio.gather(*(client(n) for n in range(clients)))
    return [r for rs in results for r in rs]
