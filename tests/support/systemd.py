"""A postkeep daemon run as systemd runs it: NOTIFY_SOCKET, WATCHDOG_USEC,
CREDENTIALS_DIRECTORY, signals; what it tells systemd and writes on stderr.

The notify socket is a datagram socket in a short temporary directory (a
unix socket path has at most 107 bytes), as systemd's own is.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# What the daemons must not inherit from `make test`'s environment: the stack's
# secrets would fill keys a test leaves empty on purpose.
_SCRUBBED = ("POSTKEEP_", "PG", "NOTIFY_SOCKET", "WATCHDOG_", "CREDENTIALS_DIRECTORY")


def binary(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}
    env.update(extra)
    return env


def run(name: str, *args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """DAEMON ARGS to its end (--version, --check-config, a refused start)."""
    return subprocess.run([binary(name), *args], cwd="/tmp", env=env or clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def one_line(stderr: str) -> str:
    """STDERR's only line; AssertionError showing it otherwise (or a traceback)."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


class Notifications:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pkn-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def next(self, timeout: float) -> str | None:
        """The next datagram, or None if none comes within TIMEOUT."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode()
        except TimeoutError:
            return None

    def wait_for(self, state: str, timeout: float = 60) -> list[str]:
        """Every datagram up to and including STATE; AssertionError if it never comes."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.next(left)
            if got is None:
                break
            seen.append(got)
            if got == state:
                return seen
        raise AssertionError(f"no {state} within {timeout}s; received {seen}")

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Daemon:
    """One daemon process under a fake systemd; stderr collected as it comes."""

    def __init__(self, name: str, config: str, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.notify = Notifications()
        full = clean_env(NOTIFY_SOCKET=self.notify.path, **(env or {}))
        self.proc = subprocess.Popen([binary(name), "--config", config, *args], cwd="/tmp",
                                     env=full, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def stderr(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_line(self, text: str, timeout: float = 30) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: any(text in x for x in self.lines), timeout):
                raise AssertionError(f"no {text!r} on stderr within {timeout}s:\n"
                                     + "\n".join(self.lines))

    def signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGTERM:
            self.terminated = True
        self.proc.send_signal(sig)

    terminated = False

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (once, as systemd sends it); the exit status."""
        if not self.terminated and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.notify.close()
