"""Run the stack's milter with some [milter] settings changed, then put it back.

The stack's postkeep.toml is shared by every test: the original text is
restored and the milter restarted with it whatever happens inside.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.stack import Stack


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def with_milter_settings(text: str, settings: dict[str, object]) -> str:
    """TEXT (a postkeep.toml) with SETTINGS replacing or added to its [milter] table."""
    for key in settings:
        text = re.sub(rf"(?m)^{re.escape(key)}\s*=.*\n", "", text)
    lines = "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items())
    new, n = re.subn(r"(?m)^\[milter\]\n", lambda m: m.group(0) + lines, text, count=1)
    assert n == 1, "postkeep.toml has no [milter] table"
    return new


def restart_milter(stack: Stack) -> None:
    stack.stack_ctl("stop", "milter")
    stack.stack_ctl("start", "milter")


@contextmanager
def milter_settings(stack: Stack, **settings: object) -> Iterator[None]:
    """The milter runs with SETTINGS inside the block, as configured outside it."""
    path = Path(stack.env["POSTKEEP_CONFIG"])
    original = path.read_text()
    path.write_text(with_milter_settings(original, settings))
    try:
        restart_milter(stack)
        yield
    finally:
        path.write_text(original)
        restart_milter(stack)
