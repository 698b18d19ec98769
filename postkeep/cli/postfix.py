"""The Postfix bundle: apply postkeep's main.cf settings and check an instance.

The bundle (postfix-conf/main.cf) is a list of `name = value` lines with
placeholders such as `{milter_address}` filled from the [postfix] section of
postkeep.toml.  The pure functions here parse and render it and compare it with
what `postconf` reports; the `postkeep postfix apply|check` commands are a thin
shell over them that runs `postconf -c DIR`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from postkeep.cli.common import confirm, session
from postkeep.config import PostfixConfig, load
from postkeep.storage.reports import outcomes

# Where the bundle is looked for, first match wins: $POSTKEEP_POSTFIX_BUNDLE, the
# source tree (editable installs, the dev stack), the packaged location.
BUNDLE_ENV = "POSTKEEP_POSTFIX_BUNDLE"
BUNDLE_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "postfix-conf" / "main.cf",
    Path("/usr/share/postkeep/postfix-conf/main.cf"),
)

# Per-transport parameters carry the master.cf service name, hyphens and all
# (postkeep-system_destination_concurrency_limit).
_LINE = re.compile(r"^([A-Za-z0-9_-]+)\s*=\s*(.*?)\s*$")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


# Lookup tables shipped beside the bundle: (file in postfix-conf/, name it is
# installed under in the Postfix configuration directory).  Placeholders are
# filled as in main.cf.
MAP_FILES = (
    ("command-filter.pcre", "postkeep-command-filter.pcre"),
    ("transport.pcre", "postkeep-transport.pcre"),
    ("system-senders", "postkeep-system-senders"),
)


# Tables main.cf names whose content is postkeep's data, not the bundle's:
# `postkeep domain set-inbound` writes them from PostgreSQL (postkeep/cli/
# directory.py).  apply creates a missing one empty (Postfix refuses mail
# when a named table is missing), never overwrites one, and remove deletes
# only those it created that are still empty.
DATA_MAPS = ("postkeep-inbound-domains", "postkeep-inbound-transport")


def missing_data_maps(config_directory: str) -> list[Path]:
    """The data tables (DATA_MAPS) not present in CONFIG_DIRECTORY."""
    return [p for p in (Path(config_directory, n) for n in DATA_MAPS) if not p.exists()]


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


# --- Merging into the host's own values -----------------------------------
#
# Three kinds of bundle parameter are merged with what the host has instead
# of replacing it (issue 16: apply once dropped a host's
# reject_unauth_destination, RBL checks and OpenDKIM milter):
#   restriction lists: postkeep's `check_policy_service ADDR` is inserted
#     into the host's list (see policy_position);
#   milter lists: postkeep's milter is appended, last (its capture and
#     signature must see every other milter's edits);
#   open lists (bundle value ending ", ..."): the bundle's head first, then
#     the host's own entries (transport_maps).
# Every other bundle parameter is a value postkeep needs as it is.
RESTRICTION_LISTS = frozenset({
    "smtpd_recipient_restrictions", "smtpd_data_restrictions", "smtpd_end_of_data_restrictions",
})
MILTER_LISTS = frozenset({"smtpd_milters", "non_smtpd_milters"})

# Restrictions that take one argument (the next word belongs to them).
_ARG_PREFIXES = ("check_", "reject_rbl_client", "reject_rhsbl_", "permit_dnswl_client",
                 "permit_rhswl_client", "sleep", "reject_dnsbl_")
# Entries that decide relaying: the policy must not come before them
# when they are in the same list (old-style lists without relay restrictions).
RELAY_DECISIONS = ("reject_unauth_destination", "defer_unauth_destination")


def split_list(value: str) -> list[str]:
    """A Postfix list value as its words (commas and whitespace separate)."""
    return [w for w in re.split(r"[\s,]+", value) if w]


def restriction_entries(value: str) -> list[str]:
    """A restriction list as entries, each a restriction with its argument."""
    words = split_list(value)
    entries: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        takes_arg = word.startswith(_ARG_PREFIXES) and "=" not in word
        if takes_arg and i + 1 < len(words):
            entries.append(f"{word} {words[i + 1]}")
            i += 2
            continue
        if word == "warn_if_reject" and i + 1 < len(words):
            # a prefix: it belongs to the restriction after it
            rest = restriction_entries(" ".join(words[i + 1:]))
            entries.append(f"{word} {rest[0]}")
            entries.extend(rest[1:])
            return entries
        entries.append(word)
        i += 1
    return entries


def _may_permit(entry: str) -> bool:
    """Can this entry end the list with OK (so nothing after it is asked)?"""
    head = entry.split()[0]
    return head.startswith(("permit", "check_"))


def policy_position(entries: Sequence[str]) -> int:
    """Where postkeep's policy check goes in a host's restriction list.

    Before the first entry that may permit (permit_mynetworks,
    permit_sasl_authenticated, an access map answering OK): a submission it
    permits would never reach the policy and never be counted.  The policy
    itself authorises nothing (it answers DUNNO or DEFER_IF_PERMIT), so
    coming before a permit lets nothing through.  When the list itself
    carries the relay decision ahead of any permit, the policy comes right
    after it; where a permit comes first (old-style lists), an unauthorised
    relay attempt is still refused at RCPT by that decision, before DATA,
    where policyd counts a message.  On Debian's 3.7 the relay decision is in
    smtpd_relay_restrictions, evaluated before this list.  The host's own
    rejects before that point stay first (cheap refusals first).
    """
    position = len(entries)
    for i, entry in enumerate(entries):
        if entry.split()[0] in RELAY_DECISIONS:
            position = min(position, i + 1)
            break
        if _may_permit(entry):
            position = min(position, i)
            break
    return position


def merge_restrictions(have: str, policy_entry: str) -> str:
    """HAVE with POLICY_ENTRY in place (policy_position); unchanged if present."""
    entries = restriction_entries(have)
    if policy_entry in entries:
        return normalize(have)
    entries.insert(policy_position(entries), policy_entry)
    return ", ".join(entries)


def merge_milters(have: str, ours: str) -> str:
    """HAVE's milters in their order, then OURS last (moved there if elsewhere)."""
    host = [m for m in split_list(have) if m != ours]
    return ", ".join([*host, ours])


def unmerge(name: str, current: str, ours: str) -> str:
    """CURRENT without postkeep's entries (remove, after the host edited the list)."""
    if name in RESTRICTION_LISTS:
        return ", ".join(e for e in restriction_entries(current) if e != ours)
    if name in MILTER_LISTS:
        return ", ".join(m for m in split_list(current) if m != ours)
    head = split_list(ours.removesuffix(OPEN_LIST))
    words = split_list(current)
    return ", ".join(words[len(head):] if words[:len(head)] == head else words)


def merged_value(name: str, have: str | None, want: str) -> str:
    """What apply writes for NAME: the bundle's WANT merged with the host's HAVE."""
    if name in RESTRICTION_LISTS:
        return merge_restrictions(have or "", want)
    if name in MILTER_LISTS:
        return merge_milters(have or "", want)
    return value_to_set(have, want)


def satisfied(name: str, have: str | None, want: str) -> bool:
    """Does the instance already carry what apply would write?"""
    if have is None:
        return False
    if name in RESTRICTION_LISTS or name in MILTER_LISTS:
        return normalize(merged_value(name, have, want)) == normalize(have)
    return satisfies(have, want)


def diff(wanted: Sequence[tuple[str, str]], have: Mapping[str, str]) -> list[Difference]:
    """Every bundle parameter whose current value differs, in bundle order."""
    return [
        Difference(name, have.get(name), want)
        for name, want in wanted
        if not satisfied(name, have.get(name), want)
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


def load_bundle(path: Path, postfix_cfg: PostfixConfig, config_directory: str
                ) -> list[tuple[str, str]]:
    """Read and render the bundle at PATH for the instance at CONFIG_DIRECTORY.

    {config_directory} is the instance's directory, not the TOML's default:
    the map paths must name the tables installed beside the main.cf applied.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read the bundle ({exc.strerror})") from exc
    placeholders = {**asdict(postfix_cfg), "config_directory": config_directory}
    try:
        return parse_bundle(text, placeholders, source=str(path))
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
        # unknown parameters are reported as differences instead; unused ones
        # are the host's business
        if "unknown parameter" not in line and "unused parameter" not in line:
            click.echo(line, err=True)
    return proc.stdout


def current_values(config_directory: str, names: Iterable[str]) -> dict[str, str]:
    """Effective values of NAMES in the instance at CONFIG_DIRECTORY, $names
    expanded: `non_smtpd_milters = $smtpd_milters` merged unexpanded would
    name postkeep's milter twice.  Only values with a `$` are asked again with
    postconf -x (it takes seconds on some hosts: it expands every parameter)."""
    values = parse_postconf(_postconf(config_directory, names))
    macros = [name for name, value in values.items() if "$" in value]
    if macros:
        values.update(parse_postconf(_postconf(config_directory, ["-x", *macros])))
    return values


def explicit_values(config_directory: str, names: Iterable[str]) -> dict[str, str]:
    """Values of NAMES as main.cf sets them (postconf -n); defaults are absent."""
    return parse_postconf(_postconf(config_directory, ["-n", *names]))


@dataclass
class _Target:
    config_directory: str
    wanted: list[tuple[str, str]]
    maps: list[tuple[Path, str]]  # installed path, wanted content
    services: list[tuple[str, str]] = field(default_factory=list)  # master.cf: key, entry


def load_maps(bundle: Path, postfix_cfg: PostfixConfig, config_directory: str,
              extra: Mapping[str, str] | None = None) -> list[tuple[Path, str]]:
    """The bundle's lookup tables, rendered, with where they are installed."""
    placeholders = {**asdict(postfix_cfg), "config_directory": config_directory,
                    **(extra or {})}
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
    # absolute: map paths rendered from it must be absolute for Postfix
    directory = os.path.abspath(config_directory or cfg.postfix.config_directory)
    if not Path(directory, "main.cf").is_file():
        raise click.ClickException(f"{directory}/main.cf not found (postfix.config_directory)")
    found = find_bundle(bundle)
    senders = {"system_senders": system_senders_table(cfg.dkim.system_domains)}
    return _Target(directory, load_bundle(found, cfg.postfix, directory),
                   load_maps(found, cfg.postfix, directory, senders),
                   load_services(found, cfg.postfix))


_DIR_OPTION = click.option(
    "--config-directory",
    default=None,
    metavar="DIR",
    help="Postfix configuration directory (default: [postfix].config_directory).",
)
_BUNDLE_OPTION = click.option(
    "--bundle", default=None, metavar="FILE", help="Bundle main.cf (default: the shipped one)."
)
_DRY_RUN_OPTION = click.option(
    "--dry-run", is_flag=True, help="Print the exact changes (unified diff); change nothing."
)


def _differences(target: _Target) -> list[Difference]:
    """Every bundle parameter whose value in the instance differs from the bundle."""
    names = [name for name, _ in target.wanted]
    return diff(target.wanted, current_values(target.config_directory, names))


# --- master.cf services (the system mail lane) ------------------------------
#
# The bundle's postfix-conf/master.cf holds whole service entries (the
# postkeep-system transport).  apply adds or replaces each with
# `postconf -c DIR -M "service/type = entry"` and records the entry it found
# before (usually none); remove gives that back exactly (`postconf -MX` for
# an entry apply added), and leaves an entry the admin edited since alone.
SERVICES_FILE = "master.cf"  # beside the bundle's main.cf
SYSTEM_TRANSPORT = "postkeep-system"


def system_senders_table(domains: Iterable[str]) -> str:
    """postkeep-system-senders: every system domain's senders -> the lane."""
    return "".join(f"@{d.lower().rstrip('.')}\t{SYSTEM_TRANSPORT}\n" for d in domains)


def fold_entry(entry: str) -> str:
    """A master.cf entry as one line, whitespace runs folded (as compared)."""
    return " ".join(entry.split())


def parse_services(text: str, placeholders: Mapping[str, str], source: str = "<master.cf>"
                   ) -> list[tuple[str, str]]:
    """Ordered (service/type, entry) pairs of a master.cf fragment, rendered.

    An indented line continues the entry before it (master.cf's own rule);
    an entry needs its 8 fields; a service/type given twice is refused.
    """
    entries: list[tuple[str, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        line = render(raw.strip(), placeholders)
        if raw[0].isspace():
            if not entries:
                raise BundleError(f"{source}:{number}: continuation line before any service")
            key, entry = entries[-1]
            entries[-1] = (key, f"{entry} {line}")
            continue
        fields = line.split()
        if len(fields) < 8:
            raise BundleError(f"{source}:{number}: expected a master.cf service entry"
                              f" (8 fields), got {raw!r}")
        key = f"{fields[0]}/{fields[1]}"
        if key in (k for k, _ in entries):
            raise BundleError(f"{source}:{number}: {key} is given twice")
        entries.append((key, line))
    return [(key, fold_entry(entry)) for key, entry in entries]


def parse_master(output: str) -> dict[str, str]:
    """`postconf -M` output (one line per entry) by service/type, folded."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 8:
            found[f"{fields[0]}/{fields[1]}"] = " ".join(fields)
    return found


def load_services(bundle: Path, postfix_cfg: PostfixConfig) -> list[tuple[str, str]]:
    """The bundle's master.cf entries, rendered from [postfix]."""
    path = bundle.parent / SERVICES_FILE
    try:
        text = path.read_text()
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        return parse_services(text, asdict(postfix_cfg), source=str(path))
    except BundleError as exc:
        raise click.ClickException(str(exc)) from exc


def current_services(config_directory: str) -> dict[str, str]:
    """The instance's master.cf entries (postconf -M), folded."""
    return parse_master(_postconf(config_directory, ["-M"]))


@dataclass(frozen=True)
class ServiceChange:
    """One master.cf entry apply writes (or remove restores)."""

    key: str  # service/type
    before: str | None  # None: no such entry
    after: str | None  # None: delete it (postconf -MX)


def plan_services(wanted: Sequence[tuple[str, str]], have: Mapping[str, str]
                  ) -> list[ServiceChange]:
    """The bundle's entries the instance does not carry as they are."""
    return [ServiceChange(key, have.get(key), entry) for key, entry in wanted
            if fold_entry(have.get(key) or "") != entry]


def plan_remove_services(state: Mapping[str, Any], have: Mapping[str, str]
                         ) -> tuple[list[ServiceChange], list[str]]:
    """What remove does to master.cf, and warnings for entries edited since."""
    changes: list[ServiceChange] = []
    warnings: list[str] = []
    for key, rec in state.get("services", {}).items():
        now = have.get(key)
        if now is not None and fold_entry(now) == rec["applied"]:
            changes.append(ServiceChange(key, now, rec["before"]))
        elif now is None and rec["before"] is None:
            warnings.append(f"master.cf {key}: already gone")
        else:
            warnings.append(f"master.cf {key}: changed since apply ({now!r}); left as it is")
    return changes, warnings


def service_args(changes: Sequence[ServiceChange]) -> list[list[str]]:
    """The postconf invocations that make CHANGES to master.cf."""
    return [["-MX", c.key] if c.after is None else ["-M", f"{c.key} = {c.after}"]
            for c in changes]


def record_services(old: Mapping[str, Any] | None, changes: Sequence[ServiceChange]
                    ) -> dict[str, Any]:
    """The services part of the state: the first recorded 'before' wins."""
    services: dict[str, Any] = dict((old or {}).get("services", {}))
    for c in changes:
        before = services[c.key]["before"] if c.key in services else c.before
        services[c.key] = {"before": before, "applied": c.after}
    return services


# --- Backup and the record of what apply changed ----------------------------
#
# apply copies main.cf and master.cf to BACKUP_DIR/<UTC time>/ before any
# change and records, per parameter it set, main.cf's own value before
# (None: not in main.cf, the default applied) and the value it wrote.
# remove works from that record, so it restores the host's values exactly
# and touches no parameter apply did not set.
BACKUP_DIR = "postkeep-backup"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class Change:
    """One main.cf parameter apply sets (or remove restores)."""

    name: str
    before: str | None  # main.cf's value; None: not set there
    after: str | None  # None: remove the line (postconf -X)


def plan_apply(wanted: Sequence[tuple[str, str]], have: Mapping[str, str],
               explicit: Mapping[str, str]) -> list[Change]:
    """The parameters apply changes: bundle values merged with the host's."""
    return [
        Change(d.name, explicit.get(d.name), merged_value(d.name, d.have, d.want))
        for d in diff(wanted, have)
    ]


def record_state(old: Mapping[str, Any] | None, changes: Sequence[Change],
                 maps: Sequence[Path], backup: str) -> dict[str, Any]:
    """The state after apply: the first recorded 'before' of a parameter wins
    (a second apply must not take postkeep's own value for the host's)."""
    params: dict[str, Any] = dict((old or {}).get("parameters", {}))
    for c in changes:
        before = params[c.name]["before"] if c.name in params else c.before
        params[c.name] = {"before": before, "applied": c.after}
    installed = sorted({*(old or {}).get("maps", []), *(str(p) for p in maps)})
    backups = [*(old or {}).get("backups", []), backup]
    return {"parameters": params, "maps": installed, "backups": backups}


def plan_remove(state: Mapping[str, Any], explicit: Mapping[str, str],
                wanted: Mapping[str, str]) -> tuple[list[Change], list[str]]:
    """What remove sets, and warnings for values the admin changed since apply.

    A value still as apply wrote it gets the host's value back exactly.  A
    list the admin edited since loses postkeep's entries only; another
    value the admin changed is left alone (named in a warning).
    """
    changes: list[Change] = []
    warnings: list[str] = []
    for name, rec in state.get("parameters", {}).items():
        now = explicit.get(name)
        if now is not None and normalize(now) == normalize(rec["applied"] or ""):
            if now != rec["before"]:
                changes.append(Change(name, now, rec["before"]))
            continue
        ours = wanted.get(name)
        if now is not None and ours is not None and (
                name in RESTRICTION_LISTS or name in MILTER_LISTS or ours.endswith(OPEN_LIST)):
            changes.append(Change(name, now, unmerge(name, now, ours)))
            warnings.append(f"{name}: changed since apply; removed postkeep's entries only")
        else:
            warnings.append(f"{name}: changed since apply ({now!r}); left as it is")
    return changes, warnings


def postconf_args(changes: Sequence[Change]) -> list[list[str]]:
    """The postconf invocations that make CHANGES (edits, then removals)."""
    edits = [f"{c.name} = {c.after}" for c in changes if c.after is not None]
    drops = [c.name for c in changes if c.after is None]
    return [args for args in (["-e", *edits] if edits else [], ["-X", *drops] if drops else [])
            if args]


def unified(path: Path, old: str, new: str) -> str:
    return "".join(difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True),
        fromfile=str(path), tofile=f"{path} (new)"))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _edited(directory: str, changes: Sequence[Change],
            services: Sequence[ServiceChange] = ()) -> dict[str, str]:
    """main.cf and master.cf as postconf leaves them after CHANGES, made on
    copies in a scratch directory (the diff shown is the file written; a dry
    run needs no write access to DIRECTORY)."""
    with tempfile.TemporaryDirectory(prefix="postkeep-postconf-") as scratch:
        for name in ("main.cf", "master.cf"):
            src = Path(directory, name)
            if src.exists():
                shutil.copyfile(src, Path(scratch, name))
        for args in [*service_args(services), *postconf_args(changes)]:
            _postconf(scratch, args)
        return {name: _read(Path(scratch, name)) for name in ("main.cf", "master.cf")}


def _replace(path: Path, text: str) -> None:
    """Write PATH atomically, keeping its mode and owner."""
    tmp = path.with_name(path.name + ".postkeep-tmp")
    tmp.write_text(text)
    try:
        st = path.stat()
        os.chmod(tmp, st.st_mode & 0o7777)
        os.chown(tmp, st.st_uid, st.st_gid)
    except FileNotFoundError:
        tmp.chmod(0o644)
    tmp.replace(path)


def _backup(directory: str) -> str:
    """Copy main.cf and master.cf to a new timestamped backup directory."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    dest = Path(directory, BACKUP_DIR, stamp)
    dest.mkdir(parents=True, mode=0o755)
    for name in ("main.cf", "master.cf"):
        if Path(directory, name).exists():
            shutil.copy2(Path(directory, name), dest / name)
    return str(dest)


def _state_path(directory: str) -> Path:
    return Path(directory, BACKUP_DIR, STATE_FILE)


def _load_state(directory: str) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = json.loads(_state_path(directory).read_text())
    except FileNotFoundError:
        return None
    return loaded


def _write_files(directory: str, old: Mapping[str, str], new: Mapping[str, str]) -> None:
    for name, text in new.items():
        if text != old[name]:
            _replace(Path(directory, name), text)


@click.group()
def postfix() -> None:
    """Apply, check or remove postkeep's Postfix settings (postconf -c DIR)."""


@postfix.command()
@_DIR_OPTION
@_BUNDLE_OPTION
@_DRY_RUN_OPTION
@click.pass_context
def apply(ctx: click.Context, config_directory: str | None, bundle: str | None,
          dry_run: bool) -> None:
    """Merge the bundle into the host's main.cf; back up first; print what changed.

    Restriction and milter lists keep the host's entries (postkeep's policy
    check inserted, its milter last); see `postkeep postfix remove`.
    """
    target = _target(ctx, config_directory, bundle)
    directory = target.config_directory
    names = [name for name, _ in target.wanted]
    changes = plan_apply(target.wanted, current_values(directory, names),
                         explicit_values(directory, names))
    stale = stale_maps(target.maps)
    services = plan_services(target.services, current_services(directory))
    absent = missing_data_maps(directory)
    old = {name: _read(Path(directory, name)) for name in ("main.cf", "master.cf")}
    new = _edited(directory, changes, services) if changes or services else old
    if dry_run:
        for name in ("main.cf", "master.cf"):
            click.echo(unified(Path(directory, name), old[name], new[name]), nl=False)
        for path in stale:
            click.echo(unified(path, _read(path), dict(target.maps)[path]), nl=False)
        for path in absent:
            click.echo(f"{path}: would be created empty")
        click.echo(f"{directory}: dry run, {len(changes)} parameter(s), "
                   f"{len(services)} master.cf service(s) and "
                   f"{len(stale) + len(absent)} table(s) would change", err=True)
        return
    if not changes and not stale and not services and not absent:
        click.echo(f"{directory}: all {len(names)} bundle parameters already set")
        return
    backup = _backup(directory)
    click.echo(f"{backup}: backup of main.cf and master.cf")
    for path in stale:
        _replace(path, dict(target.maps)[path])
        click.echo(f"{path}: installed")
    for path in absent:  # before main.cf names them
        _replace(path, "")
        click.echo(f"{path}: created empty (postkeep domain set-inbound fills it)")
    previous = _load_state(directory)
    state = record_state(previous, changes, [p for p, _ in target.maps], backup)
    state["services"] = record_services(previous, services)
    state["data_maps"] = sorted({*(previous or {}).get("data_maps", []),
                                 *(str(p) for p in absent)})
    _replace(_state_path(directory), json.dumps(state, indent=2, sort_keys=True) + "\n")
    _write_files(directory, old, new)
    for c in changes:
        click.echo(f"{c.name}: {'<unset>' if c.before is None else repr(c.before)} -> {c.after!r}")
    for s in services:
        click.echo(f"master.cf {s.key}: {'<none>' if s.before is None else repr(s.before)}"
                   f" -> {s.after!r}")
    left = _differences(target)
    if left:
        raise click.ClickException("postconf did not take: " + "; ".join(str(d) for d in left))
    if plan_services(target.services, current_services(directory)):
        raise click.ClickException("postconf -M did not take: master.cf differs from the bundle")
    click.echo(f"{directory}: {len(changes)} parameter(s) changed; "
               "run 'postfix reload' for a running instance")


@postfix.command()
@_DIR_OPTION
@_BUNDLE_OPTION
@_DRY_RUN_OPTION
@click.option("--yes", "-y", "yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def remove(ctx: click.Context, config_directory: str | None, bundle: str | None,
           dry_run: bool, yes: bool) -> None:
    """Restore the host's own values of what apply changed (its record)."""
    target = _target(ctx, config_directory, bundle)
    directory = target.config_directory
    state = _load_state(directory)
    if state is None:
        raise click.ClickException(
            f"{_state_path(directory)} not found: apply has not changed this instance")
    names = list(state.get("parameters", {}))
    changes, warnings = plan_remove(state, explicit_values(directory, names),
                                    dict(target.wanted))
    services, service_warnings = plan_remove_services(state, current_services(directory))
    for w in [*warnings, *service_warnings]:
        click.echo(f"warning: {w}", err=True)
    old = {name: _read(Path(directory, name)) for name in ("main.cf", "master.cf")}
    new = _edited(directory, changes, services) if changes or services else old
    maps = [Path(p) for p in state.get("maps", []) if Path(p).exists()]
    # Data tables apply created: deleted while empty; with domains in them
    # they are the operator's (set-inbound --off empties them), and kept.
    maps += [Path(p) for p in state.get("data_maps", [])
             if Path(p).exists() and not Path(p).read_text().strip()]
    if dry_run:
        for name in ("main.cf", "master.cf"):
            click.echo(unified(Path(directory, name), old[name], new[name]), nl=False)
        for path in maps:
            click.echo(f"{path}: would be deleted")
        return
    confirm(f"{directory}: restore {len(changes)} parameter(s) of main.cf and"
            f" {len(services)} service(s) of master.cf and delete"
            f" {len(maps)} postkeep table(s)", yes)
    backup = _backup(directory)
    click.echo(f"{backup}: backup of main.cf and master.cf")
    _write_files(directory, old, new)
    for path in maps:
        path.unlink()
        click.echo(f"{path}: deleted")
    for c in changes:
        click.echo(f"{c.name}: {c.before!r} -> {'<unset>' if c.after is None else repr(c.after)}")
    for s in services:
        click.echo(f"master.cf {s.key}: {s.before!r} -> "
                   f"{'<deleted>' if s.after is None else repr(s.after)}")
    _state_path(directory).rename(Path(backup, STATE_FILE))  # kept with the last backup
    click.echo(f"{directory}: {len(changes)} parameter(s) restored; "
               "run 'postfix reload' for a running instance")


@postfix.command()
@_DIR_OPTION
@_BUNDLE_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.pass_context
def check(ctx: click.Context, config_directory: str | None, bundle: str | None,
          as_json: bool) -> None:
    """Print every parameter that differs from the bundle; exit 1 if any does."""
    target = _target(ctx, config_directory, bundle)
    names = [name for name, _ in target.wanted]
    differences = _differences(target)
    stale = stale_maps(target.maps) + missing_data_maps(target.config_directory)
    services = plan_services(target.services, current_services(target.config_directory))
    if as_json:
        click.echo(json.dumps({
            "config_directory": target.config_directory,
            "parameters": len(names),
            "match": not differences and not stale and not services,
            "differences": [asdict(d) for d in differences],
            "stale_maps": [str(p) for p in stale],
            "services": [{"service": s.key, "have": s.before, "want": s.after}
                         for s in services],
        }, indent=2))
    else:
        for d in differences:
            click.echo(str(d))
        for path in stale:
            click.echo(f"{path}: missing or not the bundle's (fix: postkeep postfix apply)")
        for s in services:
            click.echo(f"master.cf {s.key}: have {s.before!r}, want {s.after!r}")
    if differences or stale or services:
        click.echo(
            f"{target.config_directory}: {len(differences)} of {len(names)} bundle "
            "parameters differ (fix: postkeep postfix apply)",
            err=True,
        )
        # sys.exit, not ctx.exit: the CLI root runs click with standalone_mode=False,
        # where ctx.exit's code is returned instead of becoming the exit status.
        sys.exit(1)
    if not as_json:
        click.echo(f"{target.config_directory}: all {len(names)} bundle parameters match")


# --- Queue hygiene ----------------------------------------------------------
#
# Postfix returns mail it cannot deliver within maximal_queue_lifetime (1 h
# in the bundle), but never expires the hold queue: a held message would sit
# there, full content and all, for ever.  expire-queue removes queue files
# older than --max-age from the queues Postfix does not expire itself, after
# recording every recipient as 'expired' with the reason (never a silent loss).
UNEXPIRED_QUEUES = ("hold",)


@dataclass(frozen=True)
class QueuedMessage:
    """One queue file as `postqueue -j` lists it."""

    queue_name: str
    queue_id: str
    arrival_time: int
    recipients: tuple[str, ...]


def parse_postqueue_json(output: str) -> list[QueuedMessage]:
    """`postqueue -j` output: one JSON object per line."""
    out = []
    for line in output.splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        out.append(QueuedMessage(obj["queue_name"], obj["queue_id"], int(obj["arrival_time"]),
                                 tuple(r["address"] for r in obj.get("recipients", []))))
    return out


def too_old(messages: Sequence[QueuedMessage], ages: Mapping[str, float], max_age: float
            ) -> list[QueuedMessage]:
    """Messages of UNEXPIRED_QUEUES whose queue file is older than MAX_AGE seconds.

    AGES: the queue file's age by queue id (its mtime; postsuper -h and -H
    keep it), falling back to the arrival time for a file not found.
    """
    return [m for m in messages
            if m.queue_name in UNEXPIRED_QUEUES and ages.get(m.queue_id, 0.0) > max_age]


def _file_ages(queue_directory: str, messages: Sequence[QueuedMessage], now: float
               ) -> dict[str, float]:
    ages = {}
    for m in messages:
        base = Path(queue_directory, m.queue_name)
        found = [p for p in (base / m.queue_id, *base.glob(f"*/{m.queue_id}")) if p.exists()]
        stamp = found[0].stat().st_mtime if found else float(m.arrival_time)
        ages[m.queue_id] = now - stamp
    return ages


def parse_age(text: str) -> float:
    """Seconds in an age like 90s, 30m, 1h, 2d."""
    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not m:
        raise click.BadParameter(f"{text!r}: expected an age like 30m, 1h, 2d")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _run(cmd: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise click.ClickException(f"{cmd[0]} not found: is Postfix installed?") from exc
    if proc.returncode != 0:
        raise click.ClickException(
            f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@postfix.command("expire-queue")
@_DIR_OPTION
@click.option("--max-age", default="1h", show_default=True, metavar="AGE",
              help="Remove queue files older than this (30m, 1h, 2d).")
@_DRY_RUN_OPTION
@click.option("--yes", "-y", "yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.pass_context
def expire_queue(ctx: click.Context, config_directory: str | None, max_age: str,
                 dry_run: bool, yes: bool, as_json: bool) -> None:
    """Remove held mail older than --max-age; its recipients become 'expired'."""
    limit = parse_age(max_age)
    cfg = load((ctx.find_root().obj or {}).get("config_path"))
    directory = os.path.abspath(config_directory or cfg.postfix.config_directory)
    queued = parse_postqueue_json(_run(["postqueue", "-c", directory, "-j"]))
    queue_directory = _run(["postconf", "-c", directory, "-xh", "queue_directory"]).strip()
    now = datetime.now(UTC)
    old = too_old(queued, _file_ages(queue_directory, queued, now.timestamp()), limit)
    expired: dict[str, int] = {}  # queue id: recipients whose status changed
    if old and not dry_run:
        confirm(f"remove {len(old)} message(s) held longer than {max_age} from Postfix's"
                " queue, recording their recipients as expired", yes)
        with session(ctx) as s:
            for m in old:
                reason = (f"removed from Postfix's {m.queue_name} queue by postkeep after"
                          f" {max_age} (queue id {m.queue_id})")
                arrival = datetime.fromtimestamp(m.arrival_time, UTC)
                # recorded first: if the removal fails, the next run removes it
                expired[m.queue_id] = outcomes.expire_queued(
                    s.conn, m.queue_id, m.recipients, reason, now,
                    since=arrival - timedelta(days=1))
                _run(["postsuper", "-c", directory, "-d", m.queue_id, m.queue_name])
    if as_json:
        click.echo(json.dumps({
            "config_directory": directory, "max_age_seconds": limit, "dry_run": dry_run,
            "messages": [{**asdict(m), "recipients": list(m.recipients),
                          "expired_recipients": expired.get(m.queue_id)} for m in old],
            "removed": len(expired)}, indent=2))
        return
    for m in old:
        if dry_run:
            click.echo(f"{m.queue_id} ({m.queue_name}): would remove; "
                       f"{len(m.recipients)} recipient(s) would be expired")
        else:
            # a message postkeep never captured has no recipient to mark:
            # this line (the journal, under the timer) is its only record
            click.echo(f"{m.queue_id} ({m.queue_name}): removed; {expired[m.queue_id]} of "
                       f"{len(m.recipients)} recipient(s) recorded expired in postkeep")
    click.echo(f"{directory}: {len(old)} message(s) older than {max_age} in "
               f"{', '.join(UNEXPIRED_QUEUES)}" + (" (dry run)" if dry_run else ""), err=True)
