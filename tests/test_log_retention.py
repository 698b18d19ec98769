"""Log retention: the shipped logrotate and rsyslog fragments, run for real.

A private rsyslogd (its own socket, config and files in a temp dir) loads the
shipped rsyslog drop-in; a writer sends mail.* lines to it throughout a forced
`logrotate -f` of the shipped fragment (rsyslog-rotate replaced by a SIGHUP
to this rsyslogd, which is what it sends the system's).  No line is lost, and
after the rotation rsyslog writes to the new file, not to .1.  Also: Debian's
/etc/logrotate.d/rsyslog and the fragment together pass `logrotate -d` (no
"duplicate log entry"), and the journald namespace files verify.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.wait import until

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
LOGROTATE = ROOT / "postfix-conf" / "logrotate" / "postkeep-postfix"
RSYSLOG = ROOT / "postfix-conf" / "rsyslog" / "postkeep-mail.conf"
MAIL_LOG = "/var/log/postkeep-mail.log"


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture()
def rsyslogd(tmp_path: Path) -> Iterator[tuple[Path, int, Path]]:
    """(log file, rsyslogd pid, its socket): the shipped drop-in, paths in TMP."""
    log = tmp_path / "postkeep-mail.log"
    dropins = tmp_path / "rsyslog.d"
    dropins.mkdir()
    (dropins / "postkeep-mail.conf").write_text(RSYSLOG.read_text().replace(MAIL_LOG, str(log)))
    sock = tmp_path / "log.sock"
    (tmp_path / "work").mkdir()
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(
        f'global(workDirectory="{tmp_path / "work"}")\n'
        'module(load="imuxsock" SysSock.Use="off")\n'
        # no rate limit: a burst of test lines must not be thinned out
        f'input(type="imuxsock" Socket="{sock}" RateLimit.Interval="0")\n'
        f"$IncludeConfig {dropins}/*.conf\n"
        f"*.*\t{tmp_path / 'other.log'}\n")
    proc = subprocess.Popen(["rsyslogd", "-n", "-f", str(conf), "-i", str(tmp_path / "pid")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until(sock.exists, "rsyslogd's socket", timeout=30)
        yield log, proc.pid, sock
    finally:
        proc.terminate()
        proc.wait(10)


def test_forced_rotation_with_a_live_writer_loses_no_line(
        tmp_path: Path, rsyslogd: tuple[Path, int, Path]) -> None:
    log, pid, sock = rsyslogd
    conf = tmp_path / "logrotate.conf"
    conf.write_text(LOGROTATE.read_text().replace(MAIL_LOG, str(log))
                    .replace("/usr/lib/rsyslog/rsyslog-rotate", f"kill -HUP {pid}"))
    state = tmp_path / "logrotate.state"
    dry = subprocess.run(["logrotate", "-d", "-s", str(state), str(conf)],
                         capture_output=True, text=True, check=False)
    assert dry.returncode == 0, dry.stderr
    assert f"considering log {log}" in dry.stdout + dry.stderr

    sent: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(str(sock))
            n = 0
            while not stop.is_set() and n < 200_000:  # bounded
                # <22>: facility mail, severity info
                s.send(f"<22>postfix/smtp[1]: line {n}".encode())
                sent.append(n)
                n += 1
                time.sleep(0.001)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        until(lambda: len(_lines(log)) >= 200, "lines before the rotation", timeout=60)
        done = subprocess.run(["logrotate", "-f", "-s", str(state), str(conf)],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        rotated = log.with_name(log.name + ".1")
        assert rotated.exists()
        # after the HUP the writer's lines land in the new file
        until(lambda: len(_lines(log)) >= 200, "lines in the new file", timeout=60)
    finally:
        stop.set()
        thread.join(30)
    total = len(sent)

    def numbers() -> list[int]:
        out = []
        for line in _lines(rotated) + _lines(log):
            m = re.search(r"line (\d+)$", line)
            if m:
                out.append(int(m.group(1)))
        return out

    until(lambda: len(numbers()) >= total, f"all {total} lines written", timeout=60)
    assert sorted(numbers()) == list(range(total))  # none lost, none twice
    # .1 holds the older lines, the new file the newer ones: rsyslog moved on
    old, new = [numbers()[:len(_lines(rotated))], numbers()[len(_lines(rotated)):]]
    assert max(old) < min(new)
    assert new[-1] == total - 1
    # the drop-in's `& stop`: mail lines are not also in the catch-all file
    assert not [x for x in _lines(tmp_path / "other.log") if "postfix/smtp" in x]


def test_fragment_and_debians_rsyslog_entry_together(tmp_path: Path) -> None:
    """No file is named twice (logrotate refuses a duplicate log entry)."""
    assert Path("/etc/logrotate.d/rsyslog").is_file(), "rsyslog not installed (stack.sh install)"
    conf = tmp_path / "all.conf"
    conf.write_text(f"include /etc/logrotate.d/rsyslog\ninclude {LOGROTATE}\n")
    done = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(conf)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "duplicate" not in done.stdout + done.stderr
    assert "considering log /var/log/postkeep-mail.log" in done.stdout + done.stderr
    assert "considering log /var/log/mail.log" in done.stdout + done.stderr


def test_the_old_fragment_was_a_duplicate(tmp_path: Path) -> None:
    """The check above can fail: a fragment naming mail.log is refused beside rsyslog's."""
    bad = tmp_path / "bad"
    bad.write_text(LOGROTATE.read_text().replace(MAIL_LOG, "/var/log/mail.log"))
    conf = tmp_path / "all.conf"
    conf.write_text(f"include /etc/logrotate.d/rsyslog\ninclude {bad}\n")
    done = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(conf)],
                          capture_output=True, text=True, check=False)
    assert "duplicate log entry for /var/log/mail.log" in done.stdout + done.stderr

