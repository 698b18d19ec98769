"""Packaging hygiene: tested dependency lower bounds, a wheel built without warnings.

pyproject.toml's lower bounds are what `make test-lower-bounds` installs
(tests/lower-bounds.txt as pip constraints) and unit-tests; the two files
must not drift apart.  Building the wheel must print no setuptools warning:
each one is metadata, discovery or package data going wrong quietly.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "tests" / "lower-bounds.txt"

# Runtime dependencies deliberately left without an upper bound, and why
# (pyproject.toml says the same beside the dependency).
OPEN_ENDED = {
    "cryptography": "a new major every release, removals only after deprecation warnings",
}
# Packages an extra pulls in, pinned with the dependency that names it:
# psycopg[binary] requires psycopg-binary of exactly psycopg's version.
PINNED_WITH = {"psycopg-binary": "psycopg"}

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([0-9][0-9A-Za-z.]*)\s*$")


def _name(raw: str) -> str:
    """PEP 503 normalised name."""
    return re.sub(r"[-_.]+", "-", raw).lower()


def _version(raw: str) -> tuple[int, ...]:
    """A release number to compare, trailing zeros dropped (PEP 440: 3.1 == 3.1.0)."""
    parts = [int(p) for p in raw.strip().split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def bounds(requirement: str) -> tuple[str, str | None, str | None]:
    """(name, lower bound, upper bound) of a dependency; None where it has none."""
    m = _REQUIREMENT.match(requirement)
    assert m, f"unparsable dependency {requirement!r}"
    lower = upper = None
    for spec in filter(None, (s.strip() for s in m.group(3).split(","))):
        value = spec.lstrip("<>=!~")
        op = spec[: len(spec) - len(value)].strip()
        if op in (">=", "==", "~="):
            lower = value.strip()
        if op in ("<", "==", "~="):
            upper = value.strip()
    return _name(m.group(1)), lower, upper


def runtime_dependencies() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps: list[str] = project["dependencies"]
    return deps


def pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` line (comments and blanks skipped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN.match(line)
        assert m, f"lower-bounds.txt: {line!r} is not name==version"
        assert _name(m.group(1)) not in out, f"lower-bounds.txt pins {m.group(1)} twice"
        out[_name(m.group(1))] = m.group(2)
    return out


def drift(dependencies: list[str], constraints: str) -> list[str]:
    """Every way the constraints file and the dependencies disagree (empty: in step)."""
    problems: list[str] = []
    pinned = pins(constraints)
    expected: dict[str, str] = {}
    for dep in dependencies:
        name, lower, upper = bounds(dep)
        if lower is None:
            problems.append(f"{dep!r} has no lower bound")
            continue
        if upper is None and name not in OPEN_ENDED:
            problems.append(f"{dep!r} has no upper bound (nor a reason in OPEN_ENDED)")
        expected[name] = lower
    for extra, parent in PINNED_WITH.items():
        if parent in expected:
            expected[extra] = expected[parent]
    for name in sorted(expected.keys() | pinned.keys()):
        if name not in pinned:
            problems.append(f"{name} >= {expected[name]} is not pinned in lower-bounds.txt")
        elif name not in expected:
            problems.append(f"lower-bounds.txt pins {name}, which is no runtime dependency")
        elif _version(pinned[name]) != _version(expected[name]):
            problems.append(f"{name}: pyproject says >= {expected[name]}, "
                            f"lower-bounds.txt pins {pinned[name]}")
    return problems


def test_lower_bounds_file_pins_every_dependency_at_its_lower_bound() -> None:
    assert drift(runtime_dependencies(), CONSTRAINTS.read_text()) == []


def test_drift_is_caught() -> None:
    """The comparison itself finds each kind of disagreement."""
    deps = ["click>=8.2,<9", "psycopg[binary]>=3.1.4,<4", "cryptography>=42"]
    good = "click==8.2.0\npsycopg==3.1.4\npsycopg-binary==3.1.4\ncryptography==42\n"
    assert drift(deps, good) == []
    assert drift(deps, good.replace("click==8.2.0", "click==8.1")) != []
    assert drift(deps, good.replace("psycopg-binary==3.1.4", "psycopg-binary==3.1.5")) != []
    assert drift(deps, good + "minio==7.2\n") != []
    assert drift(deps, good.replace("cryptography==42\n", "")) != []
    assert drift([*deps, "zstandard"], good + "zstandard==0.22\n") != []
    assert drift([*deps, "zstandard>=0.22"], good + "zstandard==0.22\n") != []


def _source_copy(dest: Path) -> Path:
    """The project's files as a fresh clone has them (no build/, egg-info, venv or stack)."""
    junk = shutil.ignore_patterns(".*", "__pycache__", "build", "dist", "*.egg-info")
    shutil.copytree(ROOT, dest, symlinks=True, ignore=junk)
    return dest


def build_wheel(source: Path, out: Path) -> tuple[str, Path]:
    """pip's verbose log of building SOURCE's wheel into OUT, and the wheel.

    No network: this venv's setuptools (pyproject asks for >=77, as stack.sh
    installs).  PYTHONDONTWRITEBYTECODE is a choice of the environment, and
    makes distutils warn "byte-compiling is disabled": not the project's.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-v", "-w", str(out), str(source)],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    wheels = list(out.glob("postkeep-*.whl"))
    assert len(wheels) == 1, log[-4000:]
    return log, wheels[0]


def warnings_in(log: str) -> list[str]:
    return [line for line in log.splitlines() if "warn" in line.lower()]


def test_wheel_builds_without_setuptools_warnings(tmp_path: Path) -> None:
    log, wheel = build_wheel(_source_copy(tmp_path / "src"), tmp_path / "out")
    assert warnings_in(log) == []
    names = set(zipfile.ZipFile(wheel).namelist())
    # The symlinked packages are found and shipped, with their package data.
    for module in ("postkeep/cli/__init__.py", "postkeep/milter/daemon.py",
                   "postkeep/policyd/daemon.py", "postkeep/storage/sidecar/daemon.py",
                   "postkeep/storage/metadata/migrations/0001_initial.sql"):
        assert module in names


def test_a_metadata_cause_of_warnings_is_caught(tmp_path: Path) -> None:
    """The check sees setuptools' warnings: the deprecated licence table warns."""
    src = _source_copy(tmp_path / "src")
    pyproject = src / "pyproject.toml"
    text = pyproject.read_text()
    assert 'license = "MIT"\n' in text
    pyproject.write_text(text.replace('license = "MIT"\n', 'license = { text = "MIT" }\n'))
    log, _ = build_wheel(src, tmp_path / "out")
    assert warnings_in(log) != []


def test_no_module_subscripts_click_param_type_at_run_time() -> None:
    # click.ParamType is generic only from click 8.4; the tested lower bound is
    # 8.2, where `click.ParamType[...]` raises at import (postkeep.cli.common's
    # ParamType alias subscripts it for type checking alone).
    root = Path(__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for d in ("postkeep", "milter", "policyd", "storage")
                 for p in (root / d).rglob("*.py") if not p.is_symlink()
                 if re.search(r"click\.ParamType\[", p.read_text())
                 and p.name != "common.py"]
    assert offenders == []
