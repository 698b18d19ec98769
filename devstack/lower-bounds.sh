#!/bin/bash
# lower-bounds.sh - the unit tests against every runtime dependency at its lower bound.
#
# Usage: devstack/lower-bounds.sh [PYTEST ARGS...]   (default: -m unit -q)
#
# A second venv, beside stack.sh's, with postkeep installed under the
# constraints in tests/lower-bounds.txt (every runtime dependency pinned to the
# lower bound pyproject.toml declares).  It is cached outside the clone, keyed
# by the constraints file's hash, so only a new set of bounds builds a new one;
# dependencies come from pip's wheel cache.  Clones share it: the editable
# install is pointed at this clone under a lock held for the whole run.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE=/var/cache/postkeep  # as stack.sh
CONSTRAINTS="$REPO/tests/lower-bounds.txt"

log() { printf 'lower-bounds: %s\n' "$*" >&2; }
die() { printf 'lower-bounds: ERROR: %s\n' "$*" >&2; exit 1; }

[ -f "$CONSTRAINTS" ] || die "$CONSTRAINTS missing"
VENV="$CACHE/venv-lower-$(sha256sum "$CONSTRAINTS" | cut -c1-12)"
mkdir -p "$CACHE"
exec 8>"$VENV.lock"
flock -n 8 || { log "waiting for another run on $VENV"; flock 8; }

if [ ! -f "$VENV/.postkeep-complete" ]; then
    log "creating venv $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
    # setuptools as pyproject's build-system asks, for --no-build-isolation below.
    "$VENV/bin/pip" install -q --upgrade pip "setuptools>=77" wheel \
        || die "installing pip, setuptools and wheel into $VENV failed"
    touch "$VENV/.postkeep-complete"
fi
# A no-op once satisfied; installs what a changed [dev] extra adds, and points
# the editable install at this clone.  The constraints make pip downgrade or
# refuse rather than run on other versions.
if ! (cd "$REPO" && "$VENV/bin/pip" install -q --no-build-isolation \
        -c "$CONSTRAINTS" -e '.[dev]') >"$VENV/.install.log" 2>&1; then
    cat "$VENV/.install.log" >&2
    die "pip install -c tests/lower-bounds.txt -e '.[dev]' failed in $VENV"
fi

[ $# -gt 0 ] || set -- -m unit -q
log "pytest $* in $VENV"
# No stack settings: unit tests use no services, and must not find a stack.
cd "$REPO"
exec env -u POSTKEEP_CONFIG "$VENV/bin/pytest" -p no:cacheprovider "$@" 9>&-
