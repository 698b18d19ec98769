"""A short fuzz pass on every target, and the inputs that once broke one.

tests/fuzz/targets.py has the targets and their invariants.  Here each one
is run under atheris (coverage-guided, in a subprocess: libFuzzer exits the
process when it is done) for a bounded number of runs from its seeds, and
every input in tests/fuzz/crashes/<target>/ (crashes found and fixed) and
tests/fuzz/seeds/<target>/ is replayed in-process.  `make fuzz` runs the
same targets for longer.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz.targets import TARGETS

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parent
RUNS = int(os.environ.get("POSTKEEP_FUZZ_RUNS", "4000"))


def _inputs(target: str) -> list[Path]:
    dirs = (TESTS / "fuzz" / "crashes" / target, TESTS / "fuzz" / "seeds" / target)
    return sorted(p for d in dirs if d.is_dir() for p in d.iterdir() if p.is_file())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_known_inputs_replay_cleanly(target: str) -> None:
    inputs = _inputs(target)
    assert inputs, f"no seeds for {target}"
    for path in inputs:
        TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_short_coverage_guided_pass_finds_nothing(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in _inputs(target):
        shutil.copy(path, corpus / path.name)
    proc = subprocess.run(
        # A fixed seed: the same inputs every run (make fuzz explores anew).
        [sys.executable, "-m", "fuzz.run", target, f"-runs={RUNS}", "-max_total_time=60",
         "-max_len=4096", "-seed=1", str(corpus)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(TESTS)},
        capture_output=True, text=True, timeout=180)
    crashes = sorted(tmp_path.glob("crash-*"))
    # The input itself, base64, so that a CI log keeps what tmp_path loses.
    found = {p.name: base64.b64encode(p.read_bytes()[:4096]).decode() for p in crashes}
    assert proc.returncode == 0 and not crashes, (
        f"{target}: exit {proc.returncode}, {found}; add the input to"
        f" tests/fuzz/crashes/{target}/ once fixed\n{proc.stderr[-3000:]}")
    assert f"Done {RUNS} runs" in proc.stderr or "DONE" in proc.stderr, proc.stderr[-2000:]
