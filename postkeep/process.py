"""What every postkeep daemon does as a process: systemd readiness, addresses.

Shared by postkeep-milter and postkeep-policyd so both behave the same under
systemd (Type=notify) and refuse a bad HOST:PORT the same way, naming the key.
"""

from __future__ import annotations

import os
import socket

from postkeep.config import ConfigError


def notify_systemd(state: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET, if set."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(path)
        sock.sendall(state.encode())


def split_hostport(key: str, value: str) -> tuple[str, int]:
    """HOST:PORT → (host, port); ConfigError naming KEY otherwise."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key} = {value!r}: expected HOST:PORT, e.g. 127.0.0.1:9361")
    return host, int(port)
