"""Rate-limit decisions as plain functions over plain data.

`plan` reads a policy request and says what must be counted: nothing (system
mail, stages that do not count, mail with no sender to attribute), or a
stage of counting for an organisation found by SASL login, else sender
domain (the milter's resolution).  A login decides alone, whatever sender it
names: a registered submitter is counted for its own organisation, and a
login that is no submitter is refused (`unknown_login_action`) or passed
uncounted, never counted for the domain it claims.  `verdict` turns the counters' outcome into
Postfix's answer: `DUNNO` within limits (never `OK`, which would skip the
restrictions after ours), else `DEFER_IF_PERMIT 4.7.1` naming what was
exceeded, the tier, the limit and when the window reopens.  Shadow mode
decides the same but answers DUNNO.  `LocalCounters` is in-memory counting
against per-window allowances: in degraded mode a per-process share of each
limit, in lease mode (`LeaseBook`) the units this process leased from the
shared counters.  Time is always passed in, so window roll-over is tested
without waiting.

`invalid` finds a value `plan` would read that no Postfix sends (a number
out of range, text that is not UTF-8): that request alone is refused, before
anything reaches the counters or PostgreSQL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from postkeep.storage.metadata.limits import KINDS, OrgLimits, Outcome, Unspent, Want
from postkeep.windows import HOURS_AND_DAYS, Windows

DUNNO = "DUNNO"

# protocol_state -> how that stage counts
STAGES = {"RCPT": "check", "DATA": "reserve", "END-OF-MESSAGE": "settle"}

WINDOW_NAMES = {"messages": "messages per hour", "recipients": "recipients per day",
                "bytes": "bytes per day"}


@dataclass(frozen=True)
class Plan:
    """What a request asks of the counters.

    `stage` None: answer DUNNO without counting (`why` says why).  Otherwise
    look the organisation up by `lookup` ('submitter' or 'domain') and `key`.
    """

    stage: str | None
    why: str = ""
    lookup: str = ""
    key: str = ""
    instance: str = ""
    recipients: int = 0
    size: int = 0


def sender_domain(sender: str) -> str:
    """The domain of an envelope sender, lower case ('' for <> or no @)."""
    _, at, domain = sender.rpartition("@")
    return domain.strip().lower().rstrip(".") if at else ""


def _int(attrs: dict[str, str], name: str) -> int:
    try:
        return max(0, int(attrs.get(name, "0") or "0"))
    except ValueError:
        return 0


# Largest values accepted.  Postfix counts recipients in a C int (PostgreSQL's
# `integer` too).  No Postfix accepts a message near MAX_SIZE (1 PiB), and it
# keeps the daily byte counters (bigint) far from overflowing: that would take
# 8,192 such messages in a day.
MAX_RECIPIENTS = 2**31 - 1
MAX_SIZE = 2**50
NUMBERS = {"recipient_count": MAX_RECIPIENTS, "size": MAX_SIZE}
# The text attributes `plan` reads: they reach PostgreSQL, which takes UTF-8 only.
TEXTS = ("sender", "sasl_username", "instance", "queue_id")


@dataclass(frozen=True)
class Invalid:
    """An attribute value no Postfix sends: the request is refused, nothing counted."""

    attribute: str
    problem: str
    code: str = "550 5.5.4"  # invalid command arguments

    @property
    def action(self) -> str:
        return f"{self.code} Invalid policy request: {self.attribute} {self.problem}"


def invalid(attrs: Mapping[str, str]) -> Invalid | None:
    """The first attribute `plan` reads whose value is not valid, else None (pure).

    Numbers are ASCII digits within range (empty or absent is 0); text is
    valid UTF-8 (`protocol.parse_attribute` keeps undecodable bytes as lone
    surrogates).  Attributes policyd does not read are not looked at.
    """
    for name, top in NUMBERS.items():
        value = attrs.get(name, "")
        if not value:
            continue
        if not (value.isascii() and value.isdigit()):
            return Invalid(name, f"is not a number: {_shown(value)}")
        if len(value) > 20 or int(value) > top:
            code = "552 5.3.4" if name == "size" else "550 5.5.4"  # 5.3.4: message too big
            return Invalid(name, f"is out of range (0 to {top}): {_shown(value)}", code)
    for name in TEXTS:
        if not _utf8(attrs.get(name, "")):
            code = "550 5.1.7" if name == "sender" else "550 5.5.4"  # 5.1.7: bad sender syntax
            return Invalid(name, "is not valid UTF-8", code)
    return None


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(value: str, limit: int = 24) -> str:
    """VALUE for a reply line: printable ASCII only, cut at LIMIT characters."""
    text = ascii(value[:limit])
    return text + ("..." if len(value) > limit else "")


def plan(attrs: dict[str, str], system_domains: tuple[str, ...] | frozenset[str]) -> Plan:
    """What to count for one request (pure)."""
    state = attrs.get("protocol_state", "").upper()
    stage = STAGES.get(state)
    if stage is None:
        return Plan(None, f"stage {state or '?'} is not counted")
    sender = attrs.get("sender", "")
    domain = sender_domain(sender)
    system = {d.lower() for d in system_domains}
    user = attrs.get("sasl_username", "")
    if user:
        # Before the system domains: a login names no sender that would let
        # it escape its organisation's limits.
        lookup, key = "submitter", user
    elif domain and domain in system:
        return Plan(None, f"system mail from {domain}")
    elif domain:
        lookup, key = "domain", domain
    else:
        return Plan(None, "no SASL user and no sender domain")
    instance = attrs.get("instance", "") or attrs.get("queue_id", "")
    if not instance and stage != "check":
        return Plan(None, "no instance or queue_id to count the message by")
    recipients = _int(attrs, "recipient_count")
    if stage == "settle" and recipients == 0:
        recipients = 1
    return Plan(stage, "", lookup, key, instance, max(recipients, 1 if stage != "check" else 0),
                _int(attrs, "size"))


def unknown_login_action(login: str, mode: str) -> str:
    """The answer for a SASL LOGIN that is no registered submitter ([milter]
    unknown_login = MODE): 550 5.7.1 naming it, or DUNNO ('pass': the milter
    lets the mail through uncaptured; it is counted for nobody)."""
    if mode == "pass":
        return DUNNO
    shown = "".join(c if " " < c < "\x7f" else "?" for c in login)
    shown = shown[:64] + ("..." if len(shown) > 64 else "")
    return f"550 5.7.1 postkeep: SASL login {shown} is not a registered submitter"


def window_end(kind: str, now: datetime, windows: Windows = HOURS_AND_DAYS) -> datetime:
    """When the window of KIND that holds NOW closes (UTC hour or day by default)."""
    return windows.end(kind, now)


@dataclass(frozen=True)
class Decision:
    action: str
    over: str | None = None  # the kind exceeded, if any
    reason: str = ""
    shadowed: bool = False


def verdict(outcome: Outcome, org: OrgLimits, now: datetime, *, shadow: bool = False,
            degraded: bool = False, size: int = 0,
            windows: Windows = HOURS_AND_DAYS) -> Decision:
    """Postfix's answer for OUTCOME (pure)."""
    if outcome.result != "over" or outcome.kind is None:
        return Decision(DUNNO)
    kind = outcome.kind
    retry = window_end(kind, now, windows)
    wait = max(1, math.ceil((retry - now).total_seconds() / 60))
    share = " (this host share)" if degraded else ""
    this = f", this message {size}" if kind == "bytes" and size else ""
    reason = (f"{org.name}: {WINDOW_NAMES[kind]} limit of the {org.tier} tier reached"
              f" ({outcome.used} of {outcome.limit}{share}{this});"
              f" retry after {retry:%Y-%m-%d %H:%M} UTC (in {wait} min)")
    if shadow or org.shadow:
        return Decision(DUNNO, kind, reason, shadowed=True)
    return Decision(f"DEFER_IF_PERMIT 4.7.1 Rate limit: {reason}", kind, reason)


@dataclass(slots=True)
class _Held:
    hour: datetime
    day: datetime
    recipients: int
    settled: bool
    expires: datetime


@dataclass
class LocalCounters:
    """Degraded mode: this process counts its share of each limit in memory.

    With `processes` policyd processes, each admits floor(limit / processes)
    (at least 1 if the limit is not 0): together at most the limit, as long
    as the estimate of processes is right.  Same windows, reservations and
    settlement as the database.  A message is remembered (to count it once)
    for `ttl` after DATA if it never completes, and for `settled_ttl` (default
    `ttl`) after it did.
    """

    processes: int
    ttl: timedelta = timedelta(minutes=15)
    windows: Windows = field(default_factory=Windows)
    settled_ttl: timedelta | None = None
    _used: dict[tuple[object, str, datetime], int] = field(default_factory=dict)
    # each in order of expiry: every entry is inserted with now + its ttl
    _open: dict[tuple[object, str], _Held] = field(default_factory=dict)
    _settled: dict[tuple[object, str], _Held] = field(default_factory=dict)
    _swept: datetime | None = None

    def share(self, limit: int | None) -> int | None:
        if limit is None:
            return None
        return 0 if limit == 0 else max(1, limit // self.processes)

    def consume(self, stage: str, org: OrgLimits, instance: str, recipients: int, size: int,
                now: datetime, allowance: Mapping[str, int | None] | None = None) -> Outcome:
        """Count one stage of a message against ALLOWANCE (default: this process's share)."""
        hour = self.windows.start("messages", now)
        day = self.windows.start("recipients", now)
        self.expire(now)
        oid = org.org_id
        lim = dict(allowance) if allowance is not None else {
            kind: self.share(org.limit(kind)) for kind in KINDS}
        used = {"messages": self._used.get((oid, "messages", hour), 0),
                "recipients": self._used.get((oid, "recipients", day), 0),
                "bytes": self._used.get((oid, "bytes", day), 0)}

        def over(kind: str, n: int) -> Outcome | None:
            limit = lim[kind]
            if limit is not None and used[kind] + n > limit:
                return Outcome("over", kind, used[kind], limit)
            return None

        key = (oid, instance)
        held = None if stage == "check" else self.held(oid, instance)
        if held is not None and (stage == "reserve" or held.settled):
            return Outcome("dup")
        refused = next((o for kind, n in needs(stage, held, recipients, size).items()
                        if (o := over(kind, n)) is not None), None)
        if stage == "check":
            return refused or Outcome("ok")
        if held is not None:
            del self._open[key]
            if refused:
                self._add(oid, "messages", held.hour, -1)
                self._add(oid, "recipients", held.day, -held.recipients)
                return refused
            self._add(oid, "bytes", day, size)  # where it was checked
            held.settled, held.expires = True, now + (self.settled_ttl or self.ttl)
            self._settled[key] = held
            return Outcome("ok")
        if refused:
            return refused
        self._add(oid, "messages", hour, 1)
        self._add(oid, "recipients", day, recipients)
        if stage == "settle":
            self._add(oid, "bytes", day, size)
            self._settled[key] = _Held(hour, day, recipients, True,
                                       now + (self.settled_ttl or self.ttl))
        else:
            self._open[key] = _Held(hour, day, recipients, False, now + self.ttl)
        return Outcome("ok")

    def held(self, oid: object, instance: str) -> _Held | None:
        """The message's reservation, settled or not, if it is remembered."""
        key = (oid, instance)
        return self._open.get(key) or self._settled.get(key)

    def used(self, oid: object, kind: str, window: datetime) -> int:
        return self._used.get((oid, kind, window), 0)

    def _add(self, oid: object, kind: str, window: datetime, n: int) -> None:
        key = (oid, kind, window)
        self._used[key] = max(0, self._used.get(key, 0) + n)

    def expire(self, now: datetime) -> None:
        """Forget expired messages, giving back what unsettled ones held; only
        entries at the fronts are looked at (cost: what expires)."""
        for book in (self._open, self._settled):
            while book:
                key, held = next(iter(book.items()))
                if held.expires > now:
                    break
                del book[key]
                if not held.settled:
                    self._add(key[0], "messages", held.hour, -1)
                    self._add(key[0], "recipients", held.day, -held.recipients)
        if self._swept is None or now - self._swept > timedelta(hours=1):
            self._swept = now
            old = now - 2 * timedelta(seconds=self.windows.day_seconds)
            for ukey in [k for k in self._used if k[2] < old]:
                del self._used[ukey]


def needs(stage: str, held: _Held | None, recipients: int, size: int) -> dict[str, int]:
    """Units of each kind a stage must find room for, in the order they are checked.

    HELD is the message's reservation; a stage it makes a duplicate needs nothing."""
    if stage == "check":
        return {"messages": 1, "recipients": 1}
    if held is not None:
        return {} if stage == "reserve" or held.settled else {"bytes": size}
    return {"messages": 1, "recipients": recipients, "bytes": size}


@dataclass
class LeaseBook:
    """Lease mode: count in memory against blocks of units leased from the shared counters.

    Per organisation, kind and window this process holds `granted` units,
    taken from the shared counter (PostgreSQL's rate_lease) in one atomic
    step, and spends them in memory with the same reservations, settlement,
    expiry and duplicate detection as the database (`LocalCounters`).  When a
    message needs more than is left, `shortfall` says what to lease: at least
    what it needs, ideally a block (`fraction` of the limit).  rate_lease
    grants the block if the limit leaves it, else just the need, else
    nothing: then the message is over.  Unspent units go back after `idle`
    without use (`unspent`), and all of them when the process stops.

    The bound, with P processes leasing for one organisation:
    - never more than the limit admitted in all: every admitted unit was
      counted in the shared counter when it was leased;
    - a message is refused only when the shared counter has less left than it
      needs; at that moment the other processes hold at most one block each
      unspent, so at least limit - (P - 1) x block units were admitted or are
      still admissible by them, and those blocks return after `idle`;
    - a message whose stages reach two processes (a new policy connection
      between DATA and END-OF-MESSAGE) is counted by both until the first
      one's reservation expires: an over-count, never an under-count;
    - a process killed without stopping loses its unspent blocks (at most one
      per kind) until the window ends;
    - unlimited kinds are not counted.
    """

    fraction: float
    idle: timedelta
    ttl: timedelta = timedelta(minutes=15)
    windows: Windows = field(default_factory=Windows)
    # Completed messages are remembered this long (a repeated END-OF-MESSAGE
    # is not counted twice): at 2,000 messages/s, ~120,000 entries, not the
    # 1.8 million a 15-minute memory would hold.
    settled_ttl: timedelta = timedelta(minutes=1)
    counters: LocalCounters = field(init=False)
    _granted: dict[tuple[object, str, datetime], int] = field(default_factory=dict)
    _touched: dict[tuple[object, str, datetime], datetime] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counters = LocalCounters(1, self.ttl, self.windows, self.settled_ttl)

    def block(self, limit: int) -> int:
        return max(1, math.ceil(limit * self.fraction))

    def shortfall(self, stage: str, org: OrgLimits, instance: str, recipients: int, size: int,
                  now: datetime) -> list[Want]:
        """What to lease before `consume` can decide this stage (empty: nothing)."""
        out = []
        self.counters.expire(now)  # expired reservations give back before anything is leased
        held = self.counters.held(org.org_id, instance)
        for kind, need in needs(stage, held, recipients, size).items():
            limit = org.limit(kind)
            if limit is None or need <= 0:
                continue
            window = self.windows.start(kind, now)
            room = (self._granted.get((org.org_id, kind, window), 0)
                    - self.counters.used(org.org_id, kind, window))
            if room < need:
                out.append(Want(kind, window, need - room, max(need - room, self.block(limit))))
        return out

    def grant(self, oid: object, kind: str, window: datetime, units: int, now: datetime) -> None:
        key = (oid, kind, window)
        self._granted[key] = self._granted.get(key, 0) + units
        self._touched[key] = now

    def consume(self, stage: str, org: OrgLimits, instance: str, recipients: int, size: int,
                now: datetime) -> Outcome:
        """Decide in memory against what this process holds (after `shortfall` was leased)."""
        oid = org.org_id
        allowance: dict[str, int | None] = {}
        for kind in KINDS:
            if org.limit(kind) is None:
                allowance[kind] = None
                continue
            key = (oid, kind, self.windows.start(kind, now))
            allowance[kind] = self._granted.get(key, 0)
            self._touched[key] = now
        return self.counters.consume(stage, org, instance, recipients, size, now, allowance)

    def unspent(self, now: datetime, everything: bool = False) -> dict[object, list[Unspent]]:
        """Units to give back, by organisation: idle ones (or all), now taken off the book.

        Blocks of windows that have ended are forgotten, not given back: the
        shared counter of an ended window no longer matters.
        """
        out: dict[object, list[Unspent]] = {}
        for key, touched in list(self._touched.items()):
            oid, kind, window = key
            ended = window + timedelta(seconds=self.windows.length(kind)) <= now
            if ended and now - touched > self.ttl:
                del self._touched[key]
                self._granted.pop(key, None)
                continue
            if ended or not (everything or now - touched >= self.idle):
                continue
            spare = self._granted.get(key, 0) - self.counters.used(oid, kind, window)
            if spare > 0:
                self._granted[key] -= spare
                out.setdefault(oid, []).append(Unspent(kind, window, spare))
        return out
