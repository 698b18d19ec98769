"""Run one fuzz target under atheris: python -m fuzz.run TARGET [libFuzzer flags].

From tests/ (PYTHONPATH=tests); `make fuzz` runs every target.  A crash is
written by libFuzzer as crash-<sha1> in the working directory: copy it to
tests/fuzz/crashes/<target>/ once fixed, so every later run replays it.
"""

from __future__ import annotations

import inspect
import logging
import sys

import atheris

from fuzz.targets import TARGETS


def _instrument_postkeep() -> int:
    """Instrument every function and method of the postkeep modules loaded.

    postkeep is imported through setuptools' editable finder, which atheris's
    import hook does not see, and atheris.instrument_all() takes ~45 s over
    every library loaded.  instrument_func patches __code__ in place, so
    references bound elsewhere (from-imports) are instrumented too."""
    count = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("postkeep") or module is None:
            continue
        for obj in list(vars(module).values()):
            funcs = [obj] if inspect.isfunction(obj) else (
                [v for v in vars(obj).values() if inspect.isfunction(v)]
                if inspect.isclass(obj) else [])
            for f in funcs:
                if getattr(f, "__module__", None) == name:
                    atheris.instrument_func(f)
                    count += 1
    return count


_instrument_postkeep()


def main() -> None:
    logging.disable(logging.CRITICAL)  # flufl.bounce logs every detector's exception
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz.run {{{'|'.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
