"""Run the stack's postkeep-storage with some [storage] settings changed, then put it back.

The stack's postkeep.toml is shared by every test: the original text is
restored and the sidecar restarted with it whatever happens inside.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.stack import Stack


def with_storage_settings(text: str, settings: dict[str, object]) -> str:
    """TEXT (a postkeep.toml) with SETTINGS replacing or added to its [storage] table."""
    head, sep, rest = text.partition("[storage]\n")
    assert sep, "postkeep.toml has no [storage] table"
    table, nxt, tail = rest.partition("\n[")
    for key in settings:
        table = re.sub(rf"(?m)^{re.escape(key)}\s*=.*(\n|$)", "", table)
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    return head + sep + lines + table + nxt + tail


def restart_storage(stack: Stack) -> None:
    stack.stack_ctl("stop", "storage")
    stack.stack_ctl("start", "storage")


@contextmanager
def storage_settings(stack: Stack, **settings: object) -> Iterator[None]:
    """postkeep-storage runs with SETTINGS inside the block, as configured outside it."""
    path = Path(stack.env["POSTKEEP_CONFIG"])
    original = path.read_text()
    path.write_text(with_storage_settings(original, settings))
    try:
        restart_storage(stack)
        yield
    finally:
        path.write_text(original)
        restart_storage(stack)
