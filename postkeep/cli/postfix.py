"""The Postfix bundle: apply postkeep's main.cf settings and check an instance.

The bundle (postfix-conf/main.cf) is a list of `name = value` lines with
placeholders such as `{milter_address}` filled from the [postfix] section of
postkeep.toml.  The pure functions here parse and render it and compare it with
what `postconf` reports; the `postkeep postfix apply|check` commands are a thin
shell over them that runs `postconf -c DIR`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from postkeep.config import PostfixConfig, load

# Where the bundle is looked for, first match wins: $POSTKEEP_POSTFIX_BUNDLE, the
# source tree (editable installs, the dev stack), the packaged location.
BUNDLE_ENV = "POSTKEEP_POSTFIX_BUNDLE"
BUNDLE_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "postfix-conf" / "main.cf",
    Path("/usr/share/postkeep/postfix-conf/main.cf"),
)

_LINE = re.compile(r"^([A-Za-z0-9_]+)\s*=\s*(.*?)\s*$")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


# Lookup tables shipped beside the bundle: (file in postfix-conf/, name it is
# installed under in the Postfix configuration directory).  Placeholders are
# filled as in main.cf.
MAP_FILES = (
    ("command-filter.pcre", "postkeep-command-filter.pcre"),
    ("transport.pcre", "postkeep-transport.pcre"),
)


class BundleError(Exception):
    """A bundle line that cannot be used, naming the file and line."""


@dataclass(frozen=True)
class Difference:
    """One parameter whose value in the instance is not the bundle's."""

    name: str
    have: str | None  # None: postconf does not know the parameter
    want: str

    def __str__(self) -> str:
        have = "<unknown parameter>" if self.have is None else repr(self.have)
        return f"{self.name}: have {have}, want {self.want!r}"


def render(value: str, placeholders: Mapping[str, str]) -> str:
    """Fill `{name}` placeholders known in PLACEHOLDERS; leave Postfix macros alone."""
    return _PLACEHOLDER.sub(
        lambda m: placeholders[m.group(1)] if m.group(1) in placeholders else m.group(0), value
    )


def parse_bundle(
    text: str, placeholders: Mapping[str, str], source: str = "<bundle>"
) -> list[tuple[str, str]]:
    """Ordered (name, value) pairs of a bundle, placeholders rendered.

    Comments and blank lines are skipped; an indented line continues the value
    before it (Postfix's own rule); a parameter set twice is refused.
    """
    result: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace():
            if not result:
                raise BundleError(f"{source}:{number}: continuation line before any parameter")
            name, value = result[-1]
            result[-1] = (name, f"{value} {render(raw.strip(), placeholders)}".strip())
            continue
        m = _LINE.match(raw)
        if not m:
            raise BundleError(f"{source}:{number}: expected 'name = value', got {raw!r}")
        name, value = m.group(1), m.group(2)
        if name in seen:
            raise BundleError(f"{source}:{number}: {name} is set twice")
        seen.add(name)
        result.append((name, render(value, placeholders)))
    return result


def normalize(value: str) -> str:
    """A value as Postfix compares it: whitespace runs and comma spacing folded."""
    return re.sub(r"\s*,\s*", ", ", " ".join(value.split()))


def parse_postconf(output: str) -> dict[str, str]:
    """`postconf NAME...` output (`name = value` lines) as a dict."""
    values: dict[str, str] = {}
    for line in output.splitlines():
        name, sep, value = line.partition(" =")
        if sep and name and " " not in name:
            values[name] = value.strip()
        elif values and line[:1].isspace():  # long values may wrap
            last = next(reversed(values))
            values[last] = f"{values[last]} {line.strip()}"
    return values


# A bundle value ending in ", ..." is a list the host may extend: the
# bundle's entries come first, the host's own follow (transport_maps).
OPEN_LIST = ", ..."


def satisfies(have: str, want: str) -> bool:
    """Does the instance's value HAVE meet the bundle's WANT?"""
    if want.endswith(OPEN_LIST):
        head = normalize(want.removesuffix(OPEN_LIST))
        value = normalize(have)
        return value == head or value.startswith(head + ", ")
    return normalize(have) == normalize(want)


def value_to_set(have: str | None, want: str) -> str:
    """What apply writes: WANT, or for an open list its head before HAVE's own."""
    if not want.endswith(OPEN_LIST):
        return want
    head = want.removesuffix(OPEN_LIST)
    rest = normalize(have or "")
    return f"{head}, {rest}" if rest else head


def diff(wanted: Sequence[tuple[str, str]], have: Mapping[str, str]) -> list[Difference]:
    """Every bundle parameter whose current value differs, in bundle order."""
    return [
        Difference(name, have.get(name), want)
        for name, want in wanted
        if name not in have or not satisfies(have[name], want)
    ]


def find_bundle(explicit: str | None = None) -> Path:
    """The bundle file to use (see BUNDLE_CANDIDATES)."""
    if explicit:
        return Path(explicit)
    if os.environ.get(BUNDLE_ENV):
        return Path(os.environ[BUNDLE_ENV])
    for candidate in BUNDLE_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise click.ClickException(
        "Postfix bundle not found; looked in "
        + ", ".join(str(c) for c in BUNDLE_CANDIDATES)
        + f" (set ${BUNDLE_ENV} or --bundle)"
    )


def load_bundle(path: Path, postfix_cfg: PostfixConfig) -> list[tuple[str, str]]:
    """Read and render the bundle at PATH for this [postfix] configuration."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read the bundle ({exc.strerror})") from exc
    try:
        return parse_bundle(text, asdict(postfix_cfg), source=str(path))
    except BundleError as exc:
        raise click.ClickException(str(exc)) from exc


def _postconf(config_directory: str, args: Iterable[str]) -> str:
    cmd = ["postconf", "-c", config_directory, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise click.ClickException("postconf not found: is Postfix installed?") from exc
    if proc.returncode != 0:
        raise click.ClickException(
            f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    for line in proc.stderr.splitlines():
        if "unknown parameter" not in line:  # reported as a difference instead
            click.echo(line, err=True)
    return proc.stdout


def current_values(config_directory: str, names: Iterable[str]) -> dict[str, str]:
    """Effective values of NAMES in the instance at CONFIG_DIRECTORY."""
    return parse_postconf(_postconf(config_directory, names))


@dataclass
class _Target:
    config_directory: str
    wanted: list[tuple[str, str]]
    maps: list[tuple[Path, str]]  # installed path, wanted content


def load_maps(bundle: Path, postfix_cfg: PostfixConfig, config_directory: str
              ) -> list[tuple[Path, str]]:
    """The bundle's lookup tables, rendered, with where they are installed."""
    placeholders = {**asdict(postfix_cfg), "config_directory": config_directory}
    out = []
    for source, installed in MAP_FILES:
        path = bundle.parent / source
        try:
            text = path.read_text()
        except OSError as exc:
            raise click.ClickException(f"{path}: cannot read ({exc.strerror})") from exc
        out.append((Path(config_directory, installed), render(text, placeholders)))
    return out


def stale_maps(maps: Sequence[tuple[Path, str]]) -> list[Path]:
    """Installed tables that are missing or differ from the bundle's."""
    stale = []
    for path, text in maps:
        try:
            same = path.read_text() == text
        except OSError:
            same = False
        if not same:
            stale.append(path)
    return stale


def _target(ctx: click.Context, config_directory: str | None, bundle: str | None) -> _Target:
    cfg = load((ctx.find_root().obj or {}).get("config_path"))
    directory = config_directory or cfg.postfix.config_directory
    if not Path(directory, "main.cf").is_file():
        raise click.ClickException(f"{directory}/main.cf not found (postfix.config_directory)")
    found = find_bundle(bundle)
    return _Target(directory, load_bundle(found, cfg.postfix),
                   load_maps(found, cfg.postfix, directory))


_DIR_OPTION = click.option(
    "--config-directory",
    default=None,
    metavar="DIR",
    help="Postfix configuration directory (default: [postfix].config_directory).",
)
_BUNDLE_OPTION = click.option(
    "--bundle", default=None, metavar="FILE", help="Bundle main.cf (default: the shipped one)."
)


def _differences(target: _Target) -> list[Difference]:
    """Every bundle parameter whose value in the instance differs from the bundle."""
    names = [name for name, _ in target.wanted]
    return diff(target.wanted, current_values(target.config_directory, names))


@click.group()
def postfix() -> None:
    """Apply or check postkeep's Postfix settings (postconf -c DIR)."""


@postfix.command()
@_DIR_OPTION
@_BUNDLE_OPTION
@click.pass_context
def apply(ctx: click.Context, config_directory: str | None, bundle: str | None) -> None:
    """Set every bundle parameter with postconf -e; print what changed."""
    target = _target(ctx, config_directory, bundle)
    names = [name for name, _ in target.wanted]
    for path in stale_maps(target.maps):
        text = dict(target.maps)[path]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(path)
        click.echo(f"{path}: installed")
    changes = _differences(target)
    if not changes:
        click.echo(f"{target.config_directory}: all {len(names)} bundle parameters already set")
        return
    _postconf(target.config_directory,
              ["-e", *(f"{d.name} = {value_to_set(d.have, d.want)}" for d in changes)])
    for d in changes:
        was = "<unset>" if d.have is None else repr(d.have)
        click.echo(f"{d.name}: {was} -> {value_to_set(d.have, d.want)!r}")
    left = _differences(target)
    if left:
        raise click.ClickException("postconf did not take: " + "; ".join(str(d) for d in left))
    click.echo(
        f"{target.config_directory}: {len(changes)} parameter(s) changed; "
        "run 'postfix reload' for a running instance"
    )


@postfix.command()
@_DIR_OPTION
@_BUNDLE_OPTION
@click.pass_context
def check(ctx: click.Context, config_directory: str | None, bundle: str | None) -> None:
    """Print every parameter that differs from the bundle; exit 1 if any does."""
    target = _target(ctx, config_directory, bundle)
    names = [name for name, _ in target.wanted]
    differences = _differences(target)
    for d in differences:
        click.echo(str(d))
    stale = stale_maps(target.maps)
    for path in stale:
        click.echo(f"{path}: missing or not the bundle's (fix: postkeep postfix apply)")
    if differences or stale:
        click.echo(
            f"{target.config_directory}: {len(differences)} of {len(names)} bundle "
            "parameters differ (fix: postkeep postfix apply)",
            err=True,
        )
        # sys.exit, not ctx.exit: the CLI root runs click with standalone_mode=False,
        # where ctx.exit's code is returned instead of becoming the exit status.
        sys.exit(1)
    click.echo(f"{target.config_directory}: all {len(names)} bundle parameters match")

