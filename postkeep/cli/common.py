"""What every `postkeep` command shares: a session, one-line failures, parsing.

The click layer is an adapter only: each command loads the configuration,
opens one autocommit connection (`session`), calls a reader or writer in
`postkeep.storage` and hands the plain values to a small pure formatting or
parsing function, which the unit tests exercise without any server.

Failures are one line on stderr.  Exit statuses, decided here and nowhere
else (README, "The postkeep command"):

- 1 (`EXIT_FAILED`): not found, refused, or not confirmed: `postkeep: …`
  naming the offending value;
- 2: usage errors (click's own) and configuration errors (`postkeep.cli.main`);
- 3 (`EXIT_UNAVAILABLE`): a backend could not be reached (PostgreSQL refusing
  connections or gone mid-command, S3 unreachable or answering 5xx):
  `postkeep: postgres: …` or `postkeep: s3: …` (`backend_failure`).

Destructive commands take `@destructive` (--yes, --dry-run) and call
`confirm` before they change anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

import click
import psycopg
import urllib3
from minio.error import S3Error, ServerError
from psycopg_pool import PoolTimeout

from postkeep import config as config_mod
from postkeep.storage.content import sealing
from postkeep.storage.metadata import directory
from postkeep.storage.metadata.db import BackendError, connect

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

# S3 error codes that mean "the service is not there right now", not "no such thing".
_S3_UNAVAILABLE = {"ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout",
                   "XMinioServerNotInitialized"}

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


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one `postkeep: …` line on stderr and exit CODE (1: not found, refused).

    Under --json the line is a JSON object instead: {"error": …, "exit": CODE}.
    """
    if json_mode():
        click.echo(json.dumps({"error": message, "exit": code}), err=True)
    else:
        click.echo(f"postkeep: {message}", err=True)
    raise click.exceptions.Exit(code)


# --json on commands that change something: the result as one JSON object.
# Reading commands (list, show, ...) have their own --json printing their rows.
_JSON = "postkeep.json"


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_JSON] = True


def json_flag(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give COMMAND --json: what it `say`s is printed as one JSON object."""
    return click.option("--json", "json_flag", is_flag=True, expose_value=False,
                        is_eager=True, callback=_set_json,
                        help="Print the result (or the error) as a JSON object.")(command)


def json_mode() -> bool:
    """True under a --json that `json_flag` gave the running command."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(_JSON))


def say(text: str, **result: Any) -> None:
    """The command's result: TEXT for people, or RESULT with "message": TEXT as
    one JSON object under --json (values JSON cannot hold are printed as strings)."""
    if json_mode():
        click.echo(json.dumps({**result, "message": text}, indent=2, default=str))
    else:
        click.echo(text)


def unavailable(exc: BaseException) -> bool:
    """True if EXC (or what caused it) says a backend could not be reached.

    Connection failures are psycopg's OperationalError (refused, reset, the
    server shutting down), a pool timeout, and for S3 a transport error
    (urllib3, OSError) or a 5xx answer.  An S3 4xx (NoSuchKey, AccessDenied)
    or a SQL error is the backend answering: not "unavailable".
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, psycopg.OperationalError | PoolTimeout | ServerError):
            return True
        if isinstance(cur, S3Error):
            return cur.code in _S3_UNAVAILABLE
        if isinstance(cur, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


BACKEND_ERRORS = (BackendError, psycopg.Error, PoolTimeout, S3Error, ServerError,
                  urllib3.exceptions.HTTPError)


def backend_message(exc: BaseException) -> tuple[str, int]:
    """The one line (without `postkeep: `) and the exit status for a backend failure."""
    code = EXIT_UNAVAILABLE if unavailable(exc) else EXIT_FAILED
    if isinstance(exc, BackendError):
        return _first_line(exc), code
    if isinstance(exc, psycopg.Error | PoolTimeout):
        return f"postgres: {_first_line(exc)}", code
    return f"s3: {_first_line(exc)}", code


def backend_failure(exc: BaseException) -> NoReturn:
    """One line naming the backend; exit 3 if it was unreachable, else 1."""
    fail(*backend_message(exc))


def destructive(command: Callable[..., Any]) -> Callable[..., Any]:
    """--yes and --dry-run for a command that deletes or removes something.

    The command receives `yes` and `dry_run`; it describes what it would
    change, returns after that under --dry-run, else calls `confirm`.
    """
    command = click.option("--dry-run", is_flag=True,
                           help="Show what would change; change nothing.")(command)
    return click.option("--yes", "-y", "yes", is_flag=True,
                        help="Do not ask for confirmation.")(command)


def confirm(what: str, yes: bool) -> None:
    """Ask (on stderr, answer on stdin) before WHAT happens; exit 1 unless agreed.

    Without a terminal, an answer can still be piped in; none (EOF) is a no.
    """
    if yes:
        return
    try:
        agreed = click.confirm(f"{what}: go ahead?", default=False, err=True)
    except click.exceptions.Abort:
        agreed = False
    if not agreed:
        click.echo("", err=True)
        fail("not confirmed, nothing changed (--yes skips the question)")


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
    sealing.install_config(cfg.storage)  # sealed content's keys
    try:
        conn = connect(cfg.postgres)
        with conn:
            yield Session(cfg, conn)
    except (BackendError, psycopg.Error) as exc:
        backend_failure(exc)


def find_org(conn: psycopg.Connection, name_or_id: str) -> directory.Organisation:
    """The organisation named or identified by NAME_OR_ID, or exit naming it."""
    org = directory.find_by_name(conn, name_or_id)
    if org is None:
        fail(f"no organisation {name_or_id!r} (see `postkeep org list`)")
    return org


# What Override returns for 'tier' (organisations) or 'unlimited' (tiers): NULL.
CLEAR = "clear"

# click's ParamType is generic from 8.4 on (its type hints need the parameter);
# at run time it is subscripted only where click allows it, so the tested
# lower bound (8.2, tests/lower-bounds.txt) still imports this module.
if TYPE_CHECKING:
    ParamType = click.ParamType[Any]
else:
    ParamType = click.ParamType


class Override(ParamType):
    """A number, or 'tier' (an organisation's: back to the tier's value), or
    'unlimited' (a tier's: no limit); both return CLEAR, stored as NULL."""

    name = "N|tier"

    def __init__(self, minimum: int, allow_tier: bool = True) -> None:
        self.minimum = minimum
        self.allow_tier = allow_tier

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, int) or value is None:
            return value
        text = str(value).strip().lower()
        if self.allow_tier and text in ("tier", "default", "inherit"):
            return CLEAR  # NULL: the tier's value
        if text in ("unlimited", "none") and not self.allow_tier:
            return CLEAR  # NULL: no limit
        try:
            n = int(text)
        except ValueError:
            extra = "or 'tier'" if self.allow_tier else "or 'unlimited'"
            self.fail(f"{value!r}: expected a whole number {extra}", param, ctx)
        if n < self.minimum:
            self.fail(f"{value!r}: must be at least {self.minimum}", param, ctx)
        return n


def changes_of(values: dict[str, Any]) -> dict[str, Any]:
    """The options given (not None), CLEAR as None (NULL in the row)."""
    return {k: (None if v == CLEAR else v) for k, v in values.items() if v is not None}
