"""Rate-limit decisions as plain functions over plain data.

`plan` reads a policy request and says what must be counted: nothing (system
mail, stages that do not count, mail with no sender to attribute), or a
stage of counting for an organisation found by SASL user, else sender
domain (the milter's resolution).  `verdict` turns the counters' outcome into
Postfix's answer: `DUNNO` within limits (never `OK`, which would skip the
restrictions after ours), else `DEFER_IF_PERMIT 4.7.1` naming what was
exceeded, the tier, the limit and when the window reopens.  Shadow mode
decides the same but answers DUNNO.  `LocalCounters` is the degraded mode's
in-memory counting of a per-process share of each limit.  Time is always
passed in, so window roll-over is tested without waiting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from postkeep.storage.limits import OrgLimits, Outcome

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


def plan(attrs: dict[str, str], system_domains: tuple[str, ...] | frozenset[str]) -> Plan:
    """What to count for one request (pure)."""
    state = attrs.get("protocol_state", "").upper()
    stage = STAGES.get(state)
    if stage is None:
        return Plan(None, f"stage {state or '?'} is not counted")
    sender = attrs.get("sender", "")
    domain = sender_domain(sender)
    system = {d.lower() for d in system_domains}
    if domain and domain in system:
        return Plan(None, f"system mail from {domain}")
    user = attrs.get("sasl_username", "")
    if user:
        lookup, key = "submitter", user
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


def window_end(kind: str, now: datetime) -> datetime:
    """When the window of KIND that holds NOW closes (UTC hour or day)."""
    now = now.astimezone(UTC)
    if kind == "messages":
        return now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


@dataclass(frozen=True)
class Decision:
    action: str
    over: str | None = None  # the kind exceeded, if any
    reason: str = ""
    shadowed: bool = False


def verdict(outcome: Outcome, org: OrgLimits, now: datetime, *, shadow: bool = False,
            degraded: bool = False, size: int = 0) -> Decision:
    """Postfix's answer for OUTCOME (pure)."""
    if outcome.result != "over" or outcome.kind is None:
        return Decision(DUNNO)
    kind = outcome.kind
    retry = window_end(kind, now)
    wait = max(1, math.ceil((retry - now).total_seconds() / 60))
    share = " (this host share)" if degraded else ""
    this = f", this message {size}" if kind == "bytes" and size else ""
    reason = (f"{org.name}: {WINDOW_NAMES[kind]} limit of the {org.tier} tier reached"
              f" ({outcome.used} of {outcome.limit}{share}{this});"
              f" retry after {retry:%Y-%m-%d %H:%M} UTC (in {wait} min)")
    if shadow or org.shadow:
        return Decision(DUNNO, kind, reason, shadowed=True)
    return Decision(f"DEFER_IF_PERMIT 4.7.1 Rate limit: {reason}", kind, reason)


@dataclass
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
    settlement as the database.
    """

    processes: int
    ttl: timedelta = timedelta(minutes=15)
    _used: dict[tuple[object, str, datetime], int] = field(default_factory=dict)
    # in order of expiry: every entry is (re)inserted with now + ttl
    _held: dict[tuple[object, str], _Held] = field(default_factory=dict)
    _swept: datetime | None = None

    def share(self, limit: int | None) -> int | None:
        if limit is None:
            return None
        return 0 if limit == 0 else max(1, limit // self.processes)

    def consume(self, stage: str, org: OrgLimits, instance: str, recipients: int, size: int,
                now: datetime) -> Outcome:
        hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        day = hour.replace(hour=0)
        self._expire(now)
        oid = org.org_id
        lim = {"messages": self.share(org.messages_per_hour),
               "recipients": self.share(org.recipients_per_day),
               "bytes": self.share(org.bytes_per_day)}
        used = {"messages": self._used.get((oid, "messages", hour), 0),
                "recipients": self._used.get((oid, "recipients", day), 0),
                "bytes": self._used.get((oid, "bytes", day), 0)}

        def over(kind: str, n: int) -> Outcome | None:
            limit = lim[kind]
            if limit is not None and used[kind] + n > limit:
                return Outcome("over", kind, used[kind], limit)
            return None

        if stage == "check":
            return over("messages", 1) or over("recipients", 1) or Outcome("ok")
        held = self._held.get((oid, instance))
        if held is not None and (stage == "reserve" or held.settled):
            return Outcome("dup")
        if held is not None:
            refused = over("bytes", size)
            if refused:
                del self._held[(oid, instance)]
                self._add(oid, "messages", held.hour, -1)
                self._add(oid, "recipients", held.day, -held.recipients)
                return refused
            self._add(oid, "bytes", held.day, size)
            held.settled, held.expires = True, now + self.ttl
            self._held[(oid, instance)] = self._held.pop((oid, instance))  # keep expiry order
            return Outcome("ok")
        refused = over("messages", 1) or over("recipients", recipients) or over("bytes", size)
        if refused:
            return refused
        self._add(oid, "messages", hour, 1)
        self._add(oid, "recipients", day, recipients)
        if stage == "settle":
            self._add(oid, "bytes", day, size)
        self._held[(oid, instance)] = _Held(hour, day, recipients, stage == "settle",
                                            now + self.ttl)
        return Outcome("ok")

    def _add(self, oid: object, kind: str, window: datetime, n: int) -> None:
        key = (oid, kind, window)
        self._used[key] = max(0, self._used.get(key, 0) + n)

    def _expire(self, now: datetime) -> None:
        """Give back expired reservations: only those at the front (cost: what expires)."""
        while self._held:
            key, held = next(iter(self._held.items()))
            if held.expires > now:
                break
            del self._held[key]
            if not held.settled:
                self._add(key[0], "messages", held.hour, -1)
                self._add(key[0], "recipients", held.day, -held.recipients)
        if self._swept is None or now - self._swept > timedelta(hours=1):
            self._swept = now
            day_ago = now - timedelta(days=2)
            for ukey in [k for k in self._used if k[2] < day_ago]:
                del self._used[ukey]
