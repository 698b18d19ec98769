"""Run the stack's daemons with some settings of one postkeep.toml table changed, then put
it back.

The stack's postkeep.toml is shared by every test: the original text is
restored and the daemons restarted with it whatever happens inside.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from support.stack import Stack


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def with_settings(text: str, table: str, settings: Mapping[str, object]) -> str:
    """TEXT (a postkeep.toml) with SETTINGS replacing or added to its [TABLE] table.

    Only that table's lines are touched: another table's key of the same name stays.
    """
    head, sep, rest = text.partition(f"[{table}]\n")
    assert sep, f"postkeep.toml has no [{table}] table"
    body, nxt, tail = rest.partition("\n[")
    for key in settings:
        body = re.sub(rf"(?m)^{re.escape(key)}\s*=.*(\n|$)", "", body)
    lines = "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items())
    return head + sep + lines + body + nxt + tail


def restart(stack: Stack, services: Sequence[str]) -> None:
    for service in services:
        stack.stack_ctl("stop", service)
        stack.stack_ctl("start", service)


@contextmanager
def daemon_settings(stack: Stack, table: str, settings: Mapping[str, object],
                    services: Sequence[str] | None = None) -> Iterator[None]:
    """SERVICES (by default the daemon named like TABLE: milter, storage, policyd) run
    with SETTINGS in [TABLE] inside the block, as configured outside it."""
    path = Path(stack.env["POSTKEEP_CONFIG"])
    original = path.read_text()
    path.write_text(with_settings(original, table, settings))
    which = (table,) if services is None else tuple(services)
    try:
        restart(stack, which)
        yield
    finally:
        path.write_text(original)
        restart(stack, which)
