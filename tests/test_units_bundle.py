"""The queue-expiry units and the journald namespace drop-in, verified offline.

PID 1 is not systemd here, so `systemd-analyze verify` (with ExecStart
pointed at an executable that exists) and `systemd-analyze security
--offline=true` are what can be checked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
DROPIN = ROOT / "postfix-conf" / "journald" / "log-namespace.conf"
JOURNALD = ROOT / "postfix-conf" / "journald" / "journald@postkeep.conf"
DAEMONS = ("postkeep-milter", "postkeep-policyd", "postkeep-storage", "postkeep-retention",
           "postkeep-queue-expiry")


def _copy(unit: str, into: Path) -> Path:
    """UNIT with its /usr/bin/postkeep* commands replaced by /bin/true (verify
    refuses a command that does not exist)."""
    text = re.sub(r"/usr/bin/postkeep[-a-z]*", "/bin/true", (UNITS / unit).read_text())
    path = into / unit
    path.write_text(text)
    return path


def _verify(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, paths)],
                          capture_output=True, text=True, check=False)


def test_queue_expiry_units_verify(tmp_path: Path) -> None:
    service = _copy("postkeep-queue-expiry.service", tmp_path)
    timer = tmp_path / "postkeep-queue-expiry.timer"
    shutil.copyfile(UNITS / timer.name, timer)
    done = _verify(service, timer)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    assert "expire-queue --max-age 1h --yes" in service.read_text()


def test_queue_expiry_service_is_hardened(tmp_path: Path) -> None:
    done = subprocess.run(["systemd-analyze", "security", "--offline=true",
                           str(_copy("postkeep-queue-expiry.service", tmp_path))],
                          capture_output=True, text=True, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert m, done.stdout + done.stderr
    # root (postsuper -d needs it) with a bounded capability set: well under
    # the retention unit's 4.8
    assert float(m.group(1)) <= 3.0


@pytest.mark.parametrize("unit", DAEMONS)
def test_log_namespace_dropin_verifies(tmp_path: Path, unit: str) -> None:
    service = _copy(f"{unit}.service", tmp_path)
    for companion in UNITS.glob(f"{unit}.socket"):  # a unit it Requires=
        _copy(companion.name, tmp_path)
    (tmp_path / f"{unit}.service.d").mkdir()
    shutil.copyfile(DROPIN, tmp_path / f"{unit}.service.d" / "log-namespace.conf")
    done = _verify(service)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    # the drop-in was read: a key verify does not know would be named
    (tmp_path / f"{unit}.service.d" / "zz-probe.conf").write_text("[Service]\nNoSuchKey=1\n")
    assert "NoSuchKey" in _verify(service).stderr


def test_journald_namespace_keeps_seven_days() -> None:
    text = JOURNALD.read_text()
    assert re.search(r"^\[Journal\]$", text, re.M)
    assert re.search(r"^MaxRetentionSec=7day$", text, re.M)
    assert re.search(r"^MaxFileSec=1day$", text, re.M)
    assert re.search(r"^LogNamespace=postkeep$", DROPIN.read_text(), re.M)
