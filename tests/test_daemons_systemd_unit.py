"""The three daemons as systemd sees them, without the stack (issue 16).

Each daemon runs as its unit would run it (the installed binary, a
configuration file, NOTIFY_SOCKET and WATCHDOG_USEC in its environment) with
PostgreSQL and S3 at loopback ports where nothing listens: the daemons start
anyway (degraded, tempfailing) and so show what systemd sees: READY=1 only
once they listen, WATCHDOG=1 from the loop that works (and none while it
hangs: the POSTKEEP_TEST_HOOKS=1 SIGUSR2 hook wedges that loop), reload,
--version, and every refused start as one line naming the key and value.
The units themselves are scored by `systemd-analyze security --offline=true`,
which needs no systemd running.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.policyd import free_port
from support.systemd import Daemon, clean_env, one_line, run

from postkeep import __version__, config

pytestmark = pytest.mark.unit

DAEMONS = ("postkeep-milter", "postkeep-policyd", "postkeep-storage")
UNITS = Path(__file__).resolve().parents[1] / "systemd"
# The listening port each daemon's READY=1 promises, by its key.
LISTEN_KEY = {"postkeep-milter": "milter.listen", "postkeep-policyd": "policyd.listen_port",
              "postkeep-storage": "storage.lmtp_port"}


@dataclasses.dataclass
class Setup:
    path: Path
    ports: dict[str, int]

    def listen_port(self, daemon: str) -> int:
        return self.ports[daemon]


def write_config(tmp_path: Path, extra: str = "", mode: int = 0o600,
                 secret: str = 'secret_key = "s3-secret-of-the-test"') -> Setup:
    """A complete configuration for every daemon, backends at closed ports."""
    ports = {d: free_port() for d in DAEMONS}
    metrics = {d: free_port() for d in DAEMONS}
    for d in ("spool", "outage"):
        (tmp_path / d).mkdir(exist_ok=True)
    path = tmp_path / "postkeep.toml"
    path.touch(mode)
    path.write_text(f"""
[postgres]
host = "127.0.0.1"
port = {free_port()}
connect_timeout_seconds = 1
[s3]
endpoint = "127.0.0.1:{free_port()}"
access_key = "test"
{secret}
timeout_seconds = 1
[milter]
listen = "inet:{ports['postkeep-milter']}@127.0.0.1"
metrics_listen = "127.0.0.1:{metrics['postkeep-milter']}"
spool_directory = "{tmp_path / 'spool'}"
outage_spool_directory = "{tmp_path / 'outage'}"
[policyd]
listen_host = "127.0.0.1"
listen_port = {ports['postkeep-policyd']}
metrics_listen = "127.0.0.1:{metrics['postkeep-policyd']}"
[storage]
lmtp_host = "127.0.0.1"
lmtp_port = {ports['postkeep-storage']}
metrics_listen = "127.0.0.1:{metrics['postkeep-storage']}"
{extra}""")
    path.chmod(mode)
    return Setup(path, ports)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return write_config(tmp_path)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.close()


def start(daemons: list[Daemon], name: str, setup: Setup, **env: str) -> Daemon:
    d = Daemon(name, str(setup.path), env)
    daemons.append(d)
    return d


# ------------------------------------------------------------------ --version


@pytest.mark.parametrize("daemon", DAEMONS)
def test_version(daemon: str) -> None:
    done = run(daemon, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{daemon}, version {__version__}"


# ----------------------------------------------------------- READY, STOPPING


@pytest.mark.parametrize("daemon", DAEMONS)
def test_ready_only_once_listening_then_stopping_and_exit_0(
        daemon: str, setup: Setup, daemons: list[Daemon]) -> None:
    d = start(daemons, daemon, setup)
    d.notify.wait_for("READY=1")
    # At once: READY=1 promises that the socket is open.
    socket.create_connection(("127.0.0.1", setup.listen_port(daemon)), timeout=5).close()
    d.signal(signal.SIGTERM)
    d.notify.wait_for("STOPPING=1")
    assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("daemon", DAEMONS)
def test_port_in_use_is_one_line_and_no_ready(daemon: str, setup: Setup,
                                              daemons: list[Daemon]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", setup.listen_port(daemon)))
        holder.listen()
        d = start(daemons, daemon, setup)
        assert d.proc.wait(60) == 2
        d.stop()  # collects the rest of stderr
        line = one_line(d.stderr())
        assert line == (f"{daemon}: start-up refused: {LISTEN_KEY[daemon]} ="
                        f" '127.0.0.1:{setup.listen_port(daemon)}': cannot listen: the port is"
                        " already in use (another process listens there)"), line
        # The milter used to say READY=1 before libmilter tried the socket.
        assert d.notify.next(0.2) is None


# ------------------------------------------------------------------ watchdog


@pytest.mark.parametrize("daemon", DAEMONS)
def test_watchdog_pings_from_the_work_loop_stop_while_it_hangs(
        daemon: str, setup: Setup, daemons: list[Daemon]) -> None:
    """WATCHDOG_USEC=1 s: a ping every 0.5 s; the SIGUSR2 test hook wedges the
    loop that does the work (policyd/storage: the event loop; milter: the
    lookup threads) for 5 s: at most the ping already on its way arrives."""
    d = start(daemons, daemon, setup, WATCHDOG_USEC="1000000", POSTKEEP_TEST_HOOKS="1",
              POSTKEEP_TEST_HANG_SECONDS="5")
    d.notify.wait_for("READY=1")
    pings = 0
    while pings < 3:
        got = d.notify.next(30)
        assert got == "WATCHDOG=1", (got, d.stderr())
        pings += 1
    d.signal(signal.SIGUSR2)
    d.notify.wait_for("STATUS=test hook: hanging")
    during = []
    while (got := d.notify.next(2.0)) is not None:
        during.append(got)
        assert len(during) <= 1, (during, d.stderr())
    # and once the loop works again, so do the pings
    d.notify.wait_for("WATCHDOG=1", timeout=60)
    assert d.stop() == 0, d.stderr()


def test_no_watchdog_pings_for_another_process(setup: Setup, daemons: list[Daemon]) -> None:
    d = start(daemons, "postkeep-policyd", setup, WATCHDOG_USEC="1000000", WATCHDOG_PID="1")
    d.notify.wait_for("READY=1")
    assert d.notify.next(2.0) is None
    assert d.stop() == 0


# -------------------------------------------------------------------- reload


def test_policyd_reloads_its_log_level_on_sighup(setup: Setup, daemons: list[Daemon]) -> None:
    d = start(daemons, "postkeep-policyd", setup)
    d.notify.wait_for("READY=1")
    text = setup.path.read_text().replace("[policyd]\n", '[policyd]\nlog_level = "debug"\n')
    setup.path.write_text(text)
    d.signal(signal.SIGHUP)
    d.wait_line("reloaded: policyd.log_level = debug")
    assert d.proc.poll() is None  # a reload, not a stop
    assert d.stop() == 0


def test_storage_refuses_a_broken_reload_and_keeps_running(
        setup: Setup, daemons: list[Daemon]) -> None:
    d = start(daemons, "postkeep-storage", setup)
    d.notify.wait_for("READY=1")
    setup.path.write_text(setup.path.read_text() + "\n[storage]\nlog_level = 'loud'\n")
    d.signal(signal.SIGHUP)
    d.wait_line("reload refused, configuration unchanged")
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_milter_reloads_on_sigusr1_and_stops_on_sighup(setup: Setup,
                                                       daemons: list[Daemon]) -> None:
    """libmilter takes SIGHUP as stop; the unit's ExecReload sends SIGUSR1."""
    d = start(daemons, "postkeep-milter", setup)
    d.notify.wait_for("READY=1")
    d.signal(signal.SIGUSR1)
    d.wait_line("reloaded: milter.log_level = info")
    assert d.proc.poll() is None
    unit = (UNITS / "postkeep-milter.service").read_text()
    assert "\nExecReload=/bin/kill -USR1 $MAINPID\n" in unit


# -------------------------------------------------- refusals: one line each


def test_s3_endpoint_with_a_scheme_fails_check_config(tmp_path: Path) -> None:
    setup = write_config(tmp_path)
    text = re.sub(r'endpoint = "', 'endpoint = "http://', setup.path.read_text())
    setup.path.write_text(text)
    for daemon in ("postkeep-milter", "postkeep-storage"):
        done = run(daemon, "--config", str(setup.path), "--check-config")
        assert done.returncode == 2
        line = one_line(done.stderr)
        assert "s3.endpoint = 'http://127.0.0.1:" in line
        assert line.endswith("expected HOST:PORT without a scheme (s3.secure = true for https)")


@pytest.mark.parametrize("daemon", ["postkeep-milter", "postkeep-storage"])
def test_empty_config_fails_check_config(daemon: str, tmp_path: Path) -> None:
    empty = tmp_path / "postkeep.toml"
    empty.touch(0o600)
    done = run(daemon, "--config", str(empty), "--check-config")
    assert done.returncode == 2
    assert one_line(done.stderr) == (
        f"{daemon}: configuration error: s3.access_key is not set: required"
        " (or $POSTKEEP_S3_ACCESS_KEY)")


@pytest.mark.parametrize("daemon", DAEMONS)
def test_inline_secret_in_a_readable_file_is_refused(daemon: str, tmp_path: Path) -> None:
    setup = write_config(tmp_path, mode=0o640)
    done = run(daemon, "--config", str(setup.path), "--check-config")
    assert done.returncode == 2
    assert one_line(done.stderr) == (
        f"{daemon}: configuration error: s3.secret_key = <secret> in {setup.path}: the file"
        " is readable by other users (mode 640); allowed: 0600 or 0400, or move the secret"
        " to s3.secret_key_file or a systemd credential")
    setup.path.chmod(0o600)
    assert run(daemon, "--config", str(setup.path), "--check-config").returncode == 0


def test_readable_config_without_inline_secrets_is_fine(tmp_path: Path) -> None:
    key = tmp_path / "s3.key"
    key.touch(0o600)
    key.write_text("s3-secret-of-the-test\n")
    setup = write_config(tmp_path, mode=0o644, secret=f'secret_key_file = "{key}"')
    done = run("postkeep-storage", "--config", str(setup.path), "--check-config")
    assert done.returncode == 0, done.stderr


def test_secret_from_a_systemd_credential(tmp_path: Path) -> None:
    setup = write_config(tmp_path, mode=0o644, secret="")
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "s3.secret_key").write_text("from-the-credential\n")
    without = run("postkeep-storage", "--config", str(setup.path), "--check-config")
    assert without.returncode == 2
    assert "s3.secret_key is not set" in one_line(without.stderr)
    done = run("postkeep-storage", "--config", str(setup.path), "--check-config",
               env=clean_env(CREDENTIALS_DIRECTORY=str(creds)))
    assert done.returncode == 0, done.stderr


def test_every_secret_key_can_come_from_a_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("POSTKEEP_", "PG")):
            monkeypatch.delenv(name)
    secrets = [(section, f.name) for section, cls in config._SECTIONS.items()
               for f in dataclasses.fields(cls) if f.metadata.get("secret")]
    assert {f"{s}.{n}" for s, n in secrets} >= {
        "postgres.password", "s3.secret_key", "dkim.master_key", "dkim.system_key",
        "return_path.key"}
    def value(section: str, name: str) -> str:
        text = f"credential-for-{section}-{name}" * 2
        # checked at load: base64 of 32 bytes
        if (section, name) in {("storage", "master_key"), ("storage", "previous_master_key")}:
            return base64.b64encode(text.encode()[:32]).decode()
        return text

    for section, name in secrets:
        (tmp_path / f"{section}.{name}").write_text(value(section, name))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = config.parse({})
    for section, name in secrets:
        assert getattr(getattr(cfg, section), name) == value(section, name)


def test_metrics_port_in_use_names_the_key(setup: Setup,
                                                          daemons: list[Daemon]) -> None:
    text = setup.path.read_text()
    port = int(re.search(r'\[policyd\][^\[]*metrics_listen = "127.0.0.1:(\d+)"', text)[1])
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        done = run("postkeep-policyd", "--config", str(setup.path))
    assert done.returncode == 2
    assert one_line(done.stderr).startswith(
        f"postkeep-policyd: start-up refused: policyd.metrics_listen = '127.0.0.1:{port}':"
        " cannot listen: the port is already in use")


# ------------------------------------------------------------------ units


def _score(unit: Path, threshold: int) -> subprocess.CompletedProcess[str]:
    """systemd-analyze's offline security check: exit 0 if the exposure (x10) is at
    most THRESHOLD.  --offline needs no running systemd (PID 1 here is not)."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze missing: devstack/stack.sh install puts it (package systemd)"
    return subprocess.run([tool, "security", "--offline=true", f"--threshold={threshold}",
                           "--no-pager", str(unit)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("unit", ["postkeep-milter.service", "postkeep-policyd.service",
                                  "postkeep-storage.service", "postkeep-retention.service"])
def test_units_are_hardened(unit: str, tmp_path: Path) -> None:
    done = _score(UNITS / unit, 15)  # exposure 1.5 at most
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    # and the check can fail: the same unit without its syscall filter and
    # capability limits scores worse
    weak = tmp_path / unit
    weak.write_text("".join(
        line for line in (UNITS / unit).read_text().splitlines(keepends=True)
        if not line.startswith(("SystemCallFilter=", "CapabilityBoundingSet=", "ProtectSystem=",
                                "PrivateDevices=", "RestrictAddressFamilies="))))
    assert _score(weak, 15).returncode != 0
