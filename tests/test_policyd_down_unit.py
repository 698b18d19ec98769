"""Socket activation as sd_listen_fds(3) defines it: `inherited_socket` takes fd 3
only when LISTEN_PID names this process, removes the variables so children do
not inherit them, and refuses anything but one listening stream socket.

fd 3 of the pytest process is not ours to take, so the cases that use it run
in a child that puts the socket there first (as systemd does before exec).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from postkeep.config import ConfigError
from postkeep.policyd.daemon import inherited_socket

pytestmark = pytest.mark.unit

CHILD = """
import os, sys
from postkeep.config import ConfigError
from postkeep.policyd.daemon import inherited_socket
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_FDS=sys.argv[2], LISTEN_PID=str(os.getpid()))
try:
    sock = inherited_socket()
except ConfigError as exc:
    print("error", exc)
else:
    assert sock is not None
    print("port", sock.getsockname()[1], "LISTEN_FDS" in os.environ,
          "LISTEN_PID" in os.environ, os.get_inheritable(3))
"""


def child(sock: socket.socket, count: str = "1") -> str:
    return subprocess.run([sys.executable, "-c", CHILD, str(sock.fileno()), count],
                          pass_fds=(sock.fileno(),), capture_output=True, text=True,
                          check=True, cwd="/tmp", timeout=60).stdout.strip()


def test_not_for_us_without_listen_pid_or_for_another_process() -> None:
    assert inherited_socket({"LISTEN_FDS": "1"}) is None
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1)}
    assert inherited_socket(env) is None
    assert env["LISTEN_FDS"] == "1"  # left alone: not ours


def test_more_than_one_socket_is_a_configuration_error() -> None:
    env = {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid())}
    with pytest.raises(ConfigError, match="exactly one socket"):
        inherited_socket(env)


def test_takes_the_listening_socket_on_fd_3_and_clears_the_variables() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        port = sock.getsockname()[1]
        assert child(sock) == f"port {port} False False False"


def test_a_socket_that_does_not_listen_is_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert child(sock).startswith("error fd 3 passed by LISTEN_FDS is not a listening")
    with socket.socket(type=socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        assert child(sock).startswith("error fd 3 passed by LISTEN_FDS is not a listening")
