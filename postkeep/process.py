"""What every postkeep daemon does as a process: systemd readiness, addresses.

Shared by postkeep-milter, postkeep-policyd and postkeep-storage so all three
behave the same under systemd (Type=notify, WatchdogSec=, ExecReload=) and
refuse a bad HOST:PORT or a busy port the same way, in one line naming the key.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from postkeep.config import ConfigError, load


def notify_systemd(state: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET, if set.

    Never raises: a daemon must not die because its supervisor's socket went away.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError:
        pass


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when
    systemd asked for none (no WatchdogSec=, or the variables name another process)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class WatchdogPinger:
    """WATCHDOG=1 at most once per interval, called from the loop doing the work:
    when that loop hangs the pings stop and systemd restarts the daemon."""

    def __init__(self, interval: float | None) -> None:
        self.interval = interval
        self._last = 0.0

    def __call__(self) -> None:
        if self.interval is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            notify_systemd("WATCHDOG=1")


# Test hook, off unless POSTKEEP_TEST_HOOKS=1: SIGUSR2 makes the daemon's work
# loop hang for $POSTKEEP_TEST_HANG_SECONDS (default 30), as a wedged backend
# call would, after telling the notify socket STATUS=test hook: hanging (tests
# of the watchdog: the pings must stop, then resume).  SIGSTOP would freeze
# every thread, the pinging one included, and prove nothing about where the
# pings come from.
def test_hooks_enabled() -> bool:
    return os.environ.get("POSTKEEP_TEST_HOOKS") == "1"


def test_hang_seconds() -> float:
    notify_systemd("STATUS=test hook: hanging")
    return float(os.environ.get("POSTKEEP_TEST_HANG_SECONDS", "30"))


def _hang() -> None:
    time.sleep(test_hang_seconds())


def fail(daemon: str, message: str, status: int = 2) -> NoReturn:
    """One line on stderr (what systemd puts in the journal and `status` shows), exit."""
    print(f"{daemon}: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def bind_error(key: str, value: str, exc: OSError) -> str:
    """A listening socket that could not be opened, as one line naming the key."""
    if exc.errno == errno.EADDRINUSE:
        why = "the port is already in use (another process listens there)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = "no such local address"
    elif exc.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need privileges)"
    else:
        why = exc.strerror or str(exc)
    return f"{key} = {value!r}: cannot listen: {why}"


def ensure_port_free(key: str, host: str, port: int) -> None:
    """ConfigError naming KEY if HOST:PORT cannot be listened on: checked before
    anything starts, so a busy port is the one line the daemon prints."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{key} = {f'{host}:{port}'!r}: cannot resolve {host!r}"
                          f" ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(bind_error(key, f"{host}:{port}", exc)) from exc


def block_stop_signals() -> None:
    """Block SIGTERM, SIGINT, SIGHUP and SIGUSR1 in this thread and so in every
    thread started from it, before any is started.

    Threads inherit their creator's mask: a thread that left SIGTERM unblocked
    would take it with the default action (the process dies at once, no drain).
    With all of them blocked, only a thread waiting for the signal on purpose
    (libmilter's signal thread, `sigwait`) receives it."""
    blocked = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
    if test_hooks_enabled():
        blocked.add(signal.SIGUSR2)
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)


def reload_log_level(config_path: str | None, section: str, log: logging.Logger) -> None:
    """SIGHUP: re-read the configuration file and apply SECTION.log_level.

    A file that no longer loads is refused in one line and changes nothing."""
    try:
        level = str(getattr(load(config_path), section).log_level)
    except ConfigError as exc:
        log.error("reload refused, configuration unchanged: %s", exc)
        return
    logging.getLogger().setLevel(level.upper())
    log.info("reloaded: %s.log_level = %s", section, level)


async def _watchdog_pings(interval: float) -> None:
    # On the event loop itself: a loop that hangs (a blocking call, a callback
    # that never yields) stops the pings, and systemd restarts the daemon.
    while True:
        notify_systemd("WATCHDOG=1")
        await asyncio.sleep(interval)


def supervise(stop: asyncio.Event, reload: Callable[[], None]) -> asyncio.Task[None] | None:
    """On the running loop: SIGTERM/SIGINT set STOP, SIGHUP calls RELOAD, and
    WATCHDOG=1 pings when systemd asked for them (the task; cancel it at stop)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    if test_hooks_enabled():
        loop.add_signal_handler(signal.SIGUSR2, _hang)
    interval = watchdog_interval()
    if interval is None:
        return None
    return asyncio.create_task(_watchdog_pings(interval), name="watchdog")


def split_hostport(key: str, value: str) -> tuple[str, int]:
    """HOST:PORT → (host, port); ConfigError naming KEY otherwise."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key} = {value!r}: expected HOST:PORT, e.g. 127.0.0.1:9361")
    return host, int(port)
