"""packaging/postkeep.toml, the package's /etc/postkeep/postkeep.toml, cannot go stale.

Every key postkeep/config.py declares must appear in its section, set or as a
commented `#key = default` line preceded by a comment saying what it means;
a commented default must be the real default; the file as shipped must load;
and no key it names may be unknown to config.py.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from postkeep import config

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[1] / "packaging" / "postkeep.toml"
_SECTION = re.compile(r"^\[([a-z0-9_]+)\]\s*$")
_KEY = re.compile(r"^(#?)([a-z_]+) = (.*?)(?:\s{3}#.*)?$")


def _entries(text: str) -> dict[tuple[str, str], tuple[bool, str, int]]:
    """(section, key) -> (commented, value text, line number) for every key line."""
    found: dict[tuple[str, str], tuple[bool, str, int]] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), 1):
        if m := _SECTION.match(line):
            section = m.group(1)
        elif m := _KEY.match(line):
            assert (section, m.group(2)) not in found, f"line {number}: {m.group(2)} twice"
            found[(section, m.group(2))] = (m.group(1) == "#", m.group(3), number)
    return found


def _declared() -> dict[tuple[str, str], Any]:
    return {(name, f.name): f.default if f.default_factory is dataclasses.MISSING
            else f.default_factory()
            for name, cls in config._SECTIONS.items() for f in dataclasses.fields(cls)}


def _toml_value(text: str) -> Any:
    value = tomllib.loads(f"v = {text}")["v"]
    return tuple(value) if isinstance(value, list) else value


def test_every_declared_key_is_in_the_example() -> None:
    found = _entries(EXAMPLE.read_text())
    missing = sorted(f"{s}.{k}" for s, k in _declared() if (s, k) not in found)
    assert not missing, f"keys missing from {EXAMPLE}: {missing}"


def test_the_example_names_no_unknown_key() -> None:
    declared = _declared()
    unknown = sorted(f"{s}.{k}" for s, k in _entries(EXAMPLE.read_text()) if (s, k) not in declared)
    assert not unknown, f"keys in {EXAMPLE} that postkeep/config.py does not know: {unknown}"


def test_commented_defaults_are_the_real_defaults() -> None:
    declared = _declared()
    wrong = []
    for key, (commented, text, number) in _entries(EXAMPLE.read_text()).items():
        if commented and key in declared and _toml_value(text) != declared[key]:
            wrong.append(f"line {number}: {key[0]}.{key[1]} = {text}, default {declared[key]!r}")
    assert not wrong, wrong


def test_every_key_says_what_it_means() -> None:
    """A key line follows a comment, or a key sharing that comment (a group)."""
    lines = EXAMPLE.read_text().splitlines()
    bare = []
    for number, line in enumerate(lines, 1):
        if not _KEY.match(line):
            continue
        i = number - 2
        while i >= 0 and _KEY.match(lines[i]):
            i -= 1
        if i < 0 or not lines[i].startswith("# "):
            bare.append(f"line {number}: {line}")
    assert not bare, bare


def test_the_example_loads_as_shipped() -> None:
    cfg = config.load(str(EXAMPLE))
    # the packaged units' only writable path
    assert cfg.milter.spool_directory == "/var/spool/postkeep"
    assert cfg.milter.outage_spool_directory.startswith("/var/spool/postkeep/")
