#!/bin/bash
# build-deb.sh OUTDIR - build postkeep_<version>_amd64.deb with dpkg-deb.
#
# The package carries a virtualenv at /opt/postkeep made with Debian's own
# /usr/bin/python3 (never a python3 earlier on PATH, such as pyenv's): the
# project's wheel plus its dependencies' wheels.  Those wheels are built once
# per dependency set into /var/cache/postkeep/deb-wheels-<hash> (pyproject.toml
# and the interpreter's version), so a rebuild after a code change takes
# seconds.  The venv is built in a staging tree and its absolute paths are
# rewritten to /opt/postkeep.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$REPO}"
PY=/usr/bin/python3
CACHE=/var/cache/postkeep
PREFIX=/opt/postkeep

log() { printf 'build-deb: %s\n' "$*" >&2; }
die() { printf 'build-deb: ERROR: %s\n' "$*" >&2; exit 1; }

[ -x "$PY" ] || die "$PY missing (Debian package python3)"
"$PY" -c 'import ensurepip' 2>/dev/null || die "$PY has no venv/ensurepip (Debian package python3-venv)"
VERSION="$("$PY" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$REPO/pyproject.toml")"
PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
PYNEXT="$("$PY" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')"
ARCH="$(dpkg --print-architecture)"
DEB="$OUT/postkeep_${VERSION}_${ARCH}.deb"

WORK="$(mktemp -d /var/tmp/postkeep-deb.XXXXXX)"
trap '[ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"' EXIT
ROOT="$WORK/root"
STAGE="$ROOT$PREFIX"

# ---------------------------------------------------------------- wheels
log "building the postkeep wheel"
"$PY" -m venv "$WORK/build-venv"
BPIP=("$WORK/build-venv/bin/pip" -q --disable-pip-version-check)
# A copy of the tree (git's files only): an in-tree build would leave build/ behind.
mkdir -p "$WORK/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | xargs -0 -I{} cp --parents -P {} "$WORK/src/") 2>/dev/null \
    || (cd "$REPO" && tar --exclude-vcs --exclude=.venv --exclude='.stack*' -cf - . \
        | tar -xf - -C "$WORK/src")
"${BPIP[@]}" wheel --no-deps -w "$WORK/wheel" "$WORK/src" || die "building the postkeep wheel failed"
WHEEL="$(ls "$WORK"/wheel/postkeep-*.whl)"

HASH="$( (cat "$REPO/pyproject.toml"; "$PY" -VV) | sha256sum | cut -c1-12)"
WHEELS="$CACHE/deb-wheels-$HASH"
if [ ! -f "$WHEELS/.complete" ]; then
    log "building dependency wheels into $WHEELS (once per dependency set)"
    rm -rf "$WHEELS"; mkdir -p "$WHEELS"
    "${BPIP[@]}" wheel -w "$WHEELS" "$WHEEL" || die "building dependency wheels failed"
    rm -f "$WHEELS"/postkeep-*.whl
    touch "$WHEELS/.complete"
fi

# ---------------------------------------------------------------- venv
log "installing into $PREFIX (staged)"
mkdir -p "$(dirname "$STAGE")"
"$PY" -m venv --without-pip "$STAGE"
"${BPIP[@]}" --python "$STAGE/bin/python" install --no-index --find-links "$WHEELS" \
    --no-compile "$WHEEL" || die "installing postkeep into the staged venv failed"
# The wheel's temporary path: not where postkeep came from for anyone.
find "$STAGE" -path '*.dist-info/direct_url.json' -delete
# Absolute staging paths (scripts' #! lines, pyvenv.cfg) become /opt/postkeep.
grep -rlI --null -F "$STAGE" "$STAGE" | xargs -0 -r sed -i "s#$STAGE#$PREFIX#g"
# Byte-code compiled now (the units' /opt is read-only), naming /opt paths.
"$STAGE/bin/python" -m compileall -q -j0 -s "$ROOT" -p / "$STAGE/lib" >/dev/null \
    || die "compileall failed"
[ -z "$(grep -rlI -F "$WORK" "$STAGE" || true)" ] || die "staging path left in the venv"

# ---------------------------------------------------------------- files
install -d "$ROOT/usr/bin" "$ROOT/lib/systemd/system" "$ROOT/usr/lib/sysusers.d" \
    "$ROOT/usr/lib/tmpfiles.d" "$ROOT/etc/postkeep" "$ROOT/usr/share/postkeep" \
    "$ROOT/usr/share/doc/postkeep" "$ROOT/DEBIAN"
for b in postkeep postkeep-milter postkeep-policyd postkeep-storage; do
    [ -x "$STAGE/bin/$b" ] || die "the venv has no bin/$b"
    ln -s "$PREFIX/bin/$b" "$ROOT/usr/bin/$b"
done
# Every unit in systemd/ (services, timers, sockets), as it is there.
(shopt -s nullglob
 install -m 0644 "$REPO"/systemd/*.{service,timer,socket,path} "$ROOT/lib/systemd/system/")
install -m 0644 "$REPO/systemd/postkeep.sysusers.conf" "$ROOT/usr/lib/sysusers.d/postkeep.conf"
install -m 0644 "$REPO/systemd/postkeep.tmpfiles.conf" "$ROOT/usr/lib/tmpfiles.d/postkeep.conf"
install -m 0640 "$REPO/packaging/postkeep.toml" "$ROOT/etc/postkeep/postkeep.toml"
cp -r "$REPO/postfix-conf" "$ROOT/usr/share/postkeep/postfix-conf"
# Prometheus alert rules (with their promtool tests) and the Grafana dashboard.
install -d "$ROOT/usr/share/postkeep/monitoring"
install -m 0644 "$REPO"/monitoring/* "$ROOT/usr/share/postkeep/monitoring/"
install -m 0644 "$REPO/README.md" "$ROOT/usr/share/doc/postkeep/README.md"
install -m 0644 "$REPO/LICENSE" "$ROOT/usr/share/doc/postkeep/copyright"
install -m 0755 "$REPO"/packaging/deb/{postinst,prerm,postrm} "$ROOT/DEBIAN/"
echo /etc/postkeep/postkeep.toml >"$ROOT/DEBIAN/conffiles"

# Shared libraries the venv's extensions need from Debian (pymilter's
# libmilter; the other wheels are manylinux and carry their own).
owner() {  # LIBRARY: the Debian package owning it (/lib and /usr/lib: merged /usr)
    local p="$1"
    dpkg -S "$p" 2>/dev/null || dpkg -S "/usr$p" 2>/dev/null || dpkg -S "${p#/usr}" 2>/dev/null \
        || dpkg -S "$(readlink -f "$p")" 2>/dev/null || echo "?: $p"
}
LIBDEPS=""
for lib in $(find "$STAGE" -name '*.so*' -type f -print0 | xargs -0 -r ldd 2>/dev/null \
        | awk '/=> \// {print $3}' | sort -u | grep -v "^$STAGE"); do
    pkg="$(owner "$lib" | head -1 | cut -d: -f1)"
    [ "$pkg" != "?" ] || die "no Debian package provides $lib (needed by the venv)"
    LIBDEPS="$LIBDEPS $pkg"
done
LIBDEPS="$(printf '%s\n' $LIBDEPS | sort -u | grep -vx -e libc6 || true)"
DEPENDS="python3 (>= $PYVER), python3 (<< $PYNEXT), libc6, systemd | adduser, passwd"
for p in $LIBDEPS; do DEPENDS="$DEPENDS, $p"; done
SIZE="$(du -sk "$ROOT" | cut -f1)"
cat >"$ROOT/DEBIAN/control" <<CONTROL
Package: postkeep
Version: $VERSION
Architecture: $ARCH
Maintainer: postkeep maintainers <root@localhost>
Installed-Size: $SIZE
Depends: $DEPENDS
Recommends: postfix, postfix-pcre
Suggests: postgresql
Section: mail
Priority: optional
Homepage: https://example.invalid/postkeep
Description: capture, sign, rate-limit and track every message through Postfix
 A milter archiving every message to S3-compatible storage with its metadata
 in PostgreSQL, DKIM signing, a policy daemon enforcing per-tier rate limits,
 and a sidecar recording delivery outcomes from DSNs.  Self-contained Python
 virtualenv under /opt/postkeep, built for Debian's python$PYVER.
CONTROL

mkdir -p "$OUT"
dpkg-deb --root-owner-group -Zxz -z1 --build "$ROOT" "$DEB.tmp" >/dev/null || die "dpkg-deb failed"
mv "$DEB.tmp" "$DEB"
log "built $DEB"
