"""What every `postkeep` command shares: a session, one-line failures, parsing.

The click layer is an adapter only: each command loads the configuration,
opens one autocommit connection (`session`), calls a reader or writer in
`postkeep.storage` and hands the plain values to a small pure formatting or
parsing function, which the unit tests exercise without any server.

Failures are one line on stderr and exit status 1 (`fail`): a backend failure
as `postkeep: postgres: …` (or `s3`), anything the operator typed wrong as
`postkeep: …` naming the offending value.  Configuration errors propagate to
`postkeep.cli.main`, which reports them with exit status 2.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NoReturn

import click
import psycopg

from postkeep import config as config_mod
from postkeep.storage.metadata import directory
from postkeep.storage.metadata.db import BackendError, connect

_RELATIVE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def parse_since(text: str, now: datetime) -> datetime:
    """An absolute UTC time from ISO 8601 or a relative age like 1h, 2d, 30m."""
    m = _RELATIVE.match(text.strip())
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected ISO 8601 (2026-03-01T12:00:00Z) or an age"
            " like 30m, 1h, 2d, 1w"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def check_domain(text: str) -> str:
    """The domain lower-cased if it is a valid DNS name, else ValueError saying why."""
    name = text.strip().lower().removesuffix(".")
    if not name:
        raise ValueError(f"domain {text!r}: empty")
    if len(name) > 253:
        raise ValueError(f"domain {text!r}: longer than 253 characters")
    labels = name.split(".")
    if len(labels) < 2:
        raise ValueError(f"domain {text!r}: needs at least two labels (example.com)")
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(
                f"domain {text!r}: label {label!r} must be 1-63 letters, digits or"
                " hyphens, not starting or ending with a hyphen"
            )
    if labels[-1].isdigit():
        raise ValueError(f"domain {text!r}: the top-level label cannot be numeric")
    return name


def iso(when: datetime | None) -> str | None:
    """ISO 8601 in UTC, or None."""
    return None if when is None else when.astimezone(UTC).isoformat()



def fail(message: str) -> NoReturn:
    """Print one `postkeep: …` line on stderr and exit 1."""
    click.echo(f"postkeep: {message}", err=True)
    raise click.exceptions.Exit(1)


@dataclass
class Session:
    """The configuration and connection one command works with."""

    cfg: config_mod.Config
    conn: psycopg.Connection


@contextmanager
def session(ctx: click.Context) -> Iterator[Session]:
    """Load the configuration, connect, and turn backend failures into one line."""
    obj = ctx.find_root().obj or {}
    cfg = config_mod.load(obj.get("config_path"))
    try:
        conn = connect(cfg.postgres)
        with conn:
            yield Session(cfg, conn)
    except BackendError as exc:
        fail(str(exc))
    except psycopg.Error as exc:
        text = str(exc).strip().splitlines()
        fail(f"postgres: {text[0] if text else type(exc).__name__}")


def find_org(conn: psycopg.Connection, name_or_id: str) -> directory.Organisation:
    """The organisation named or identified by NAME_OR_ID, or exit naming it."""
    org = directory.find_by_name(conn, name_or_id)
    if org is None:
        fail(f"no organisation {name_or_id!r} (see `postkeep org list`)")
    return org


