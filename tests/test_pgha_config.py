"""[postgres] for a primary and its replicas: libpq's multi-host syntax.

`host` lists the servers comma-separated, `ports` gives one port each, and
`target_session_attrs` (read-write by default: every postkeep component
writes) makes libpq keep the primary, whichever host that is after a
failover (devstack/pgha.sh, tests/test_pgha_failover.py).
"""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from postkeep.config import ConfigError, parse

pytestmark = pytest.mark.unit


def test_multi_host_conninfo() -> None:
    cfg = parse({"postgres": {"host": "10.0.0.1,10.0.0.2", "ports": "5432,5433"}})
    info = conninfo_to_dict(cfg.postgres.conninfo())
    assert (info["host"], info["port"]) == ("10.0.0.1,10.0.0.2", "5432,5433")
    assert info["target_session_attrs"] == "read-write"


def test_single_host_keeps_port_and_read_write_by_default() -> None:
    info = conninfo_to_dict(parse({"postgres": {"host": "db", "port": 6432}})
                            .postgres.conninfo())
    assert (info["host"], info["port"], info["target_session_attrs"]) == (
        "db", "6432", "read-write")


@pytest.mark.parametrize("ports", ["5432", "5432,x", "5432,70000", "5432,5433,5434"])
def test_ports_must_give_one_port_per_host(ports: str) -> None:
    with pytest.raises(ConfigError, match=r"postgres\.ports = .*one port \(1\.\.65535\) per host"):
        parse({"postgres": {"host": "a,b", "ports": ports}})


def test_target_session_attrs_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"postgres\.target_session_attrs"):
        parse({"postgres": {"target_session_attrs": "standby"}})
