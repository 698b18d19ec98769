"""Imports go one way: ground floor <- storage <- daemons and CLI.

Read from the source with `ast` (every import statement, also those inside
functions and `if TYPE_CHECKING:` blocks), never by importing, so a
violation is found whether or not the code path runs.

The layers, by module name:

- ground floor: `postkeep.<module>` (config, ids, envelope, process,
  ttlcache, windows, signing_keys): imports only the ground floor;
- storage: `postkeep.storage.<sub>.*`, each sub-package with its own
  allowance (metadata <- content <- lifecycle; metadata <- reports); the
  sidecar (postkeep-storage, a daemon) stands on all of storage;
- daemons: `postkeep.milter`, `postkeep.policyd`, `postkeep.storage.sidecar`:
  the ground floor and storage, never another daemon, never the CLI;
- CLI: `postkeep.cli`: the ground floor and storage, never a daemon.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent

# What each layer may import, as module-name prefixes (its own included).
_STORAGE = ("postkeep.storage.metadata", "postkeep.storage.content",
            "postkeep.storage.reports", "postkeep.storage.lifecycle")
ALLOWED: dict[str, tuple[str, ...]] = {
    "postkeep.storage.metadata": ("postkeep.storage.metadata",),
    "postkeep.storage.content": ("postkeep.storage.metadata", "postkeep.storage.content"),
    "postkeep.storage.reports": ("postkeep.storage.metadata", "postkeep.storage.reports"),
    "postkeep.storage.lifecycle": ("postkeep.storage.metadata", "postkeep.storage.content",
                                   "postkeep.storage.lifecycle"),
    "postkeep.storage.sidecar": (*_STORAGE, "postkeep.storage.sidecar"),
    "postkeep.milter": (*_STORAGE, "postkeep.milter"),
    "postkeep.policyd": (*_STORAGE, "postkeep.policyd"),
    "postkeep.cli": (*_STORAGE, "postkeep.cli"),
}
HIGHER = tuple(ALLOWED)  # every prefix above the ground floor


def layer_of(module: str) -> str:
    """The ALLOWED key MODULE belongs to, or 'ground' for the ground floor."""
    for prefix in HIGHER:
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    if module in ("postkeep.storage", "postkeep.storage.__init__"):
        return "postkeep.storage.metadata"  # the package docstring only
    return "ground"


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imported_names(module: str, source: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every postkeep import in SOURCE."""
    package = module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from postkeep.storage import metadata` imports postkeep.storage.metadata.
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return [(line, name) for line, name in out if name.split(".")[0] == "postkeep"]


def violations(module: str, source: str) -> list[str]:
    """Each import in SOURCE (the text of MODULE) that reaches above its layer."""
    layer = layer_of(module)
    allowed = ALLOWED.get(layer, ())
    bad = []
    for line, name in imported_names(module, source):
        target = layer_of(name)
        if target == "ground" or _within(name, allowed):
            continue
        bad.append(f"{module}:{line} ({layer}) imports {name} ({target})")
    return bad


def project_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the postkeep package as it is installed."""
    found: dict[str, Path] = {}
    top = ROOT / "postkeep"
    # postkeep/milter, postkeep/policyd and postkeep/storage are symlinks to the
    # top-level folders: follow them, as the import system does.
    for dirpath, _dirs, files in os.walk(top, followlinks=True):
        rel = Path(dirpath).relative_to(ROOT)
        for f in files:
            if f.endswith(".py"):
                parts = [*rel.parts, f[:-3]]
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = Path(dirpath) / f
    return found


def test_every_module_imports_only_downwards() -> None:
    modules = project_modules()
    # The tree is what the layout promises, so the walk found it all.
    for expected in ("postkeep.config", "postkeep.cli", "postkeep.milter.service",
                     "postkeep.policyd.decide", "postkeep.storage.metadata.db",
                     "postkeep.storage.content.objects", "postkeep.storage.reports.dsn",
                     "postkeep.storage.lifecycle.retention", "postkeep.storage.sidecar.lmtp"):
        assert expected in modules, expected
    bad = [v for name, path in sorted(modules.items())
           for v in violations(name, path.read_text())]
    assert bad == []


@pytest.mark.parametrize(("module", "source"), [
    ("postkeep.config", "from postkeep.storage.metadata.limits import KINDS"),
    ("postkeep.ids", "import postkeep.milter.dkim"),
    ("postkeep.storage.metadata.dkim_keys", "from postkeep.milter.dkim import sign"),
    ("postkeep.storage.metadata.db", "from postkeep.storage.content import objects"),
    ("postkeep.storage.content.parts", "from postkeep.storage.lifecycle.holds import x"),
    ("postkeep.storage.reports.outcomes", "from postkeep.storage.sidecar.lmtp import y"),
    ("postkeep.storage.lifecycle.retention", "from postkeep.storage.reports import dsn"),
    ("postkeep.milter.service", "from postkeep.policyd import decide"),
    ("postkeep.policyd.service", "from postkeep.storage.sidecar import daemon"),
    ("postkeep.storage.sidecar.lmtp", "from postkeep.milter.capture import Capture"),
    ("postkeep.cli.messages", "from postkeep.milter import dkim"),
    ("postkeep.milter.daemon", "from postkeep.cli.common import fail"),
    ("postkeep.storage.metadata.messages", "def f():\n    from postkeep.cli import main\n"),
    ("postkeep.storage.content.spool", "from ...milter import dkim"),
])
def test_an_upward_import_is_named(module: str, source: str) -> None:
    bad = violations(module, source)
    assert len(bad) == 1 and module in bad[0]


@pytest.mark.parametrize(("module", "source"), [
    ("postkeep.config", "from postkeep.windows import Windows"),
    ("postkeep.storage.content.parts", "from postkeep.storage.metadata.db import Database"),
    ("postkeep.storage.lifecycle.holds", "from postkeep.storage.content import layout"),
    ("postkeep.storage.sidecar.daemon", "from postkeep.storage.lifecycle import retention"),
    ("postkeep.milter.service", "from postkeep.storage.content.objects import message_key"),
    ("postkeep.cli.retention", "from postkeep.storage.lifecycle import erasure"),
])
def test_a_downward_import_passes(module: str, source: str) -> None:
    assert violations(module, source) == []
