"""`postkeep_build_info{version, daemon}`: which postkeep each daemon runs.

One gauge for every daemon (always 1), so that a dashboard or an alert can
tell versions apart during an upgrade and `count by (version)` shows a mixed
fleet.  Declared once here: a process importing several daemons' metric
modules (the tests) would otherwise register the name twice.
"""

from __future__ import annotations

from prometheus_client import Gauge

from postkeep import __version__

BUILD_INFO = Gauge("postkeep_build_info",
                   "Always 1: the postkeep version a daemon runs, by daemon.",
                   ["version", "daemon"])


def export(daemon: str) -> None:
    """Publish this process's build info as DAEMON (milter, policyd, storage)."""
    BUILD_INFO.labels(__version__, daemon).set(1)
