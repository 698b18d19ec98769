"""postkeep.toml: every configuration key, its default and what it allows.

Each key is declared once, here, as a dataclass field with its default; the
loader walks these declarations, so an unknown key, a wrong type or a value
outside what is allowed is refused at start with the key, the value and what
is allowed (`ConfigError`).  Secrets may come from the environment, from a
file (`*_file` keys) or from a systemd credential (`LoadCredential=NAME:...`
puts the file $CREDENTIALS_DIRECTORY/NAME, NAME being the key, e.g.
`s3.secret_key`) instead of the TOML file itself; a TOML file that holds a
secret inline must be readable by its owner only, as key files are.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postkeep.windows import Windows

DEFAULT_PATH = "/etc/postkeep/postkeep.toml"


class ConfigError(Exception):
    """A configuration value that postkeep refuses, naming the key."""


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


def _positive() -> dict[str, Any]:
    return {"min": 0, "exclusive": True}


@dataclass(frozen=True)
class PostgresConfig:
    """[postgres]: the metadata database (libpq connection parameters)."""

    host: str = "/var/run/postgresql"
    port: int = field(default=5432, metadata={"min": 1, "max": 65535})
    # Several servers (a primary and its replicas, issue 20): host lists them
    # comma-separated as libpq does ("10.0.0.1,10.0.0.2") and ports gives one
    # port per host ("5432,5433"; empty: `port` for all).  libpq tries them in
    # order and keeps the first that target_session_attrs accepts, so after a
    # failover a new connection finds the new primary with no change here.
    ports: str = ""
    # Every postkeep component writes: never settle on a standby.
    target_session_attrs: str = field(default="read-write", metadata=_choice(
        "read-write", "primary", "any"))
    dbname: str = "postkeep"
    user: str = "postkeep"
    password: str = field(default="", repr=False,
                          metadata={"secret": True, "env": "PGPASSWORD"})
    password_file: str = ""
    connect_timeout_seconds: float = field(default=3.0, metadata=_positive())
    statement_timeout_ms: int = field(default=5000, metadata=_positive())
    pool_min: int = field(default=2, metadata={"min": 1})
    pool_max: int = field(default=20, metadata={"min": 1})

    def conninfo(self) -> str:
        """libpq keyword/value string for psycopg (no secret in it: see kwargs)."""
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            host=self.host,
            port=self.ports or self.port,
            target_session_attrs=self.target_session_attrs,
            dbname=self.dbname,
            user=self.user,
            password=self.password or None,
            connect_timeout=max(1, round(self.connect_timeout_seconds)),
            application_name="postkeep",
            # jit=off: JIT-compiling a plan over hundreds of partitions (a
            # retention of years) took 25 s for a 3 ms search; postkeep's
            # queries are all short.  Migration 0024 sets it for the database.
            options=f"-c statement_timeout={self.statement_timeout_ms} -c jit=off",
        )


@dataclass(frozen=True)
class S3Config:
    """[s3]: the object store holding message content (any S3 API)."""

    endpoint: str = "127.0.0.1:9000"
    secure: bool = False
    region: str = "us-east-1"
    bucket: str = field(default="postkeep", metadata={"min_len": 3})
    access_key: str = field(default="", metadata={"env": "POSTKEEP_S3_ACCESS_KEY"})
    secret_key: str = field(default="", repr=False,
                            metadata={"secret": True, "env": "POSTKEEP_S3_SECRET_KEY"})
    secret_key_file: str = ""
    timeout_seconds: float = field(default=5.0, metadata=_positive())
    # "auto": store many small objects in one request where the server can
    # (MinIO's snowball auto-extract; probed at start), else one PUT each.
    batch_uploads: str = field(default="auto", metadata=_choice("auto", "off"))
    # WORM storage (issue 19): "compliance" creates the bucket with Object Lock
    # and writes every message object with a compliance-mode retention until
    # its content expiry; the daemons refuse to start if the bucket does not
    # enforce it (`postkeep storage probe`).  "off": plain objects.
    object_lock: str = field(default="off", metadata=_choice("off", "compliance"))
    # "packs": the small messages one group commit writes for one organisation
    # and retention class go into one object (a pack) indexed in PostgreSQL;
    # "objects": one object per message (the layout before packs).
    layout: str = field(default="packs", metadata=_choice("packs", "objects"))

    def effective_layout(self, sealed: bool = False) -> str:
        """The layout new content is written in: `layout`, except one object
        per message under Object Lock without sealing (a pack carries one
        retention date for all its messages, and erasure could not delete one
        of them there).  SEALED (storage.master_key set): packs under Object
        Lock too, erasure destroying the message's key (issue 19)."""
        return "objects" if self.object_lock != "off" and not sealed else self.layout


@dataclass(frozen=True)
class MilterConfig:
    """[milter]: postkeep-milter, the capture milter."""

    # libmilter socket spec: inet:PORT@HOST or unix:/path (under Postfix's queue
    # directory when smtpd is chrooted).
    listen: str = "inet:8891@127.0.0.1"
    # What to do with mail whose sender domain belongs to no organisation.
    unknown_sender: str = field(default="reject", metadata=_choice("reject", "pass"))
    # What to do with mail from a SASL login that is no registered submitter
    # (`postkeep submitter add`): 'reject' refuses it with 550 5.7.1 as soon as
    # the login is seen (the milter at MAIL FROM, postkeep-policyd at RCPT);
    # 'pass' lets it through unsigned, uncaptured and not counted.  Either way
    # it is never attributed to the organisation of the sender domain it
    # claims.  postkeep-policyd reads this key too.
    unknown_login: str = field(default="reject", metadata=_choice("reject", "pass"))
    metrics_listen: str = "127.0.0.1:9361"
    # Compressed content stays in memory up to this size, then spills to disk.
    spill_bytes: int = field(default=1 << 20, metadata={"min": 0})
    spool_directory: str = "/var/tmp"
    zstd_level: int = field(default=3, metadata={"min": 1, "max": 22})
    # How long an organisation lookup is trusted before asking PostgreSQL again.
    directory_cache_seconds: float = field(default=30.0, metadata={"min": 0})
    # Clients whose mail may be DKIM-signed without SASL (CIDR).  Mail from
    # anywhere else is captured but never signed, whatever domain it claims.
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # How often the milter checks PostgreSQL for DKIM key changes (rotation
    # needs no restart).
    dkim_reload_seconds: float = field(default=5.0, metadata=_positive())
    # Header added to every captured message, carrying postkeep's message id.
    id_header: str = "X-Postkeep-Id"
    # Threads for organisation lookups that miss the cache (PostgreSQL).
    backend_threads: int = field(default=4, metadata={"min": 1, "max": 256})
    # Threads that store messages' objects in batches (one upload for whatever
    # queued up meanwhile; one more thread writes the rows of every uploaded
    # batch waiting in one INSERT), and the largest upload batch.  Two keep a
    # large upload from holding up small ones; more made smaller batches and
    # cost more CPU per message than the latency they saved (BENCHMARKS.md).
    commit_threads: int = field(default=2, metadata={"min": 1, "max": 64})
    commit_batch_max: int = field(default=64, metadata={"min": 1, "max": 1000})
    # How long the first message of a batch waits for others (milliseconds):
    # fewer, larger uploads, packs and INSERTs for latency at end of message.
    # 0: a batch is whatever queued while the previous one was being stored.
    # With packs a PUT carries a batch.  This is the longest wait: with
    # commit_siblings below it ends as soon as every capture in flight has
    # joined its batch, and a quiet host does not wait.  100 ms made 3.6x
    # fewer PUTs than 10 ms through Postfix but cost a third of the throughput
    # at 20 sessions (BENCHMARKS.md).
    commit_linger_ms: float = field(default=10.0, metadata={"min": 0, "max": 1000})
    # Linger only when at least this many other captures are in flight (MAIL
    # FROM to end of message), as PostgreSQL's commit_siblings: a lone session
    # gets no added latency, a busy host gets large packs; the wait also ends
    # once every capture in flight is in its batch (milter/linger.py).
    commit_siblings: int = field(default=4, metadata={"min": 0, "max": 10000})
    # The longest a message waits for the group commit before the milter
    # gives it up and spools (or tempfails) it, whatever a backend does; a
    # message already being written waits for the backends' own timeouts.
    commit_timeout_seconds: float = field(default=5.0, metadata=_positive())
    # The platform's bounce domain: captured mail leaves with the return path
    # pk-<message id>-<expiry>-<MAC>@<this domain> (or the sending domain's own bounce domain,
    # `postkeep domain set-bounce`), so DSNs and bounces come back to
    # postkeep-storage.  Empty: envelopes are left alone and no outcome is
    # tracked.
    bounce_domain: str = ""
    # MIME leaf parts larger than this (bytes, as encoded in the message) are
    # stored once per organisation and referenced from the message object
    # (the same PDF to thousands of recipients is kept once).  0: never split.
    part_split_bytes: int = field(default=128 * 1024, metadata={"min": 0})
    # Messages up to this size are compressed with their organisation's zstd
    # dictionary when it has one (`postkeep dict train`).  0: never.
    dictionary_max_bytes: int = field(default=64 * 1024, metadata={"min": 0})
    # How long the milter uses an organisation's dictionary before checking
    # PostgreSQL for a newer version.
    dictionary_refresh_seconds: float = field(default=300.0, metadata=_positive())
    # libmilter's own timeout for talking to Postfix.
    mta_timeout_seconds: int = field(default=600, metadata=_positive())
    log_level: str = field(default="info", metadata=_choice("debug", "info", "warning", "error"))
    # Outage spool (milter/spool.py): when S3 or PostgreSQL cannot take a
    # message, write it durably here and accept it; the drain stores it later.
    # Off: such messages are tempfailed (451 4.3.0), as is anything the spool
    # cannot take.  Must be a local filesystem that survives reboots, and the
    # same directory for the milter and the drain (`postkeep spool drain`).
    outage_spool: bool = True
    outage_spool_directory: str = "/var/spool/postkeep/outage"
    # Tempfail instead of spooling once the spool's filesystem would be fuller
    # than this (percent, as `df` counts it).
    outage_spool_max_fill_percent: float = field(default=90.0, metadata={"min": 0, "max": 100})
    # When end of message is answered (README "Accepting after the journal").
    # 'store': once the message's object and rows are in S3 and PostgreSQL
    # (the group commit; the outage spool only when a backend is down).
    # 'journal': once it is fsync'd in the outage spool's directory on this
    # host, the same sealed entry an outage writes; postkeep-storage drains
    # the directory into packs every storage.spool_drain_interval_seconds, so
    # a PUT carries every message of that interval instead of one commit's,
    # and a session never waits for S3 or PostgreSQL.  Needs outage_spool on.
    # The message is then durable on this host's disk until drained, as it
    # is in Postfix's own queue; search and restore see it after the drain.
    # Mail with parts cut out (part_split_bytes) takes the group commit;
    # journaled mail is compressed without the organisation's dictionary.
    accept_after: str = field(default="store", metadata=_choice("store", "journal"))
    # -- lines over 998 octets (issue 21, point 14) --
    # Postfix's smtp client breaks lines longer than smtp_line_length_limit
    # (998) with CRLF SPACE when it relays.  'fold': the milter breaks them
    # the same way first (the body is replaced, headers are folded as Postfix
    # will), so the DKIM signature and the stored copy are of the bytes
    # delivered.  'reject': such mail is refused with 550 5.6.0.
    long_lines: str = field(default="fold", metadata=_choice("fold", "reject"))


@dataclass(frozen=True)
class PolicydConfig:
    """[policyd]: postkeep-policyd, the rate-limiting policy server."""

    # Loopback TCP (Postfix: check_policy_service inet:HOST:PORT).
    listen_host: str = "127.0.0.1"
    listen_port: int = field(default=10040, metadata={"min": 1, "max": 65535})
    metrics_listen: str = "127.0.0.1:9362"
    # When PostgreSQL cannot answer in time: 'share' admits this process's
    # share of each limit (limit / degraded_processes), counted in memory;
    # 'open' answers DUNNO to everything; 'closed' defers everything.
    degraded_mode: str = field(default="share", metadata=_choice("share", "open", "closed"))
    # How many policyd processes share the limits while PostgreSQL is down.
    degraded_processes: int = field(default=2, metadata={"min": 1, "max": 1000})
    # After a failure, how long decisions stay local before PostgreSQL is tried again.
    degraded_retry_seconds: float = field(default=2.0, metadata=_positive())
    # The longest a decision waits for PostgreSQL before it is taken locally.
    # (Far above the ~1 ms a decision takes: a busy database must not be
    # mistaken for a dead one, which would switch to local counting.)
    decision_timeout_ms: int = field(default=1000, metadata={"min": 1, "max": 60000})
    # Every organisation is in shadow mode (decide and log, answer DUNNO);
    # per organisation or tier: `postkeep limits shadow`.
    shadow: bool = False
    # A client that sends nothing for this long is disconnected (Postfix
    # itself reconnects; smtpd_policy_service_max_idle is 300 s).
    read_timeout_seconds: float = field(default=330.0, metadata=_positive())
    max_line_bytes: int = field(default=4096, metadata={"min": 64, "max": 1 << 20})
    max_request_bytes: int = field(default=16384, metadata={"min": 256, "max": 1 << 22})
    max_attributes: int = field(default=128, metadata={"min": 8, "max": 4096})
    # A reservation made at DATA for a message that never reaches
    # END-OF-MESSAGE gives its counts back after this long.
    reservation_seconds: int = field(default=900, metadata={"min": 10, "max": 86400})
    # How long an organisation and its limits are trusted before asking again.
    directory_cache_seconds: float = field(default=5.0, metadata={"min": 0})
    # Suppression lists (issue 17): how long a recipient's answer (on the
    # list or not) is trusted before asking PostgreSQL again.  An address
    # suppressed now is refused at the latest this long after.  0: ask every time.
    suppression_cache_seconds: float = field(default=5.0, metadata={"min": 0, "max": 3600})
    # PostgreSQL synchronous_commit for policyd's sessions.  'off': a decision
    # does not wait for its WAL flush; counters stay exact across processes
    # (visibility and locks are unchanged), only a PostgreSQL crash may forget
    # the last fraction of a second of counts.  'on' waits for the disk.
    synchronous_commit: str = field(default="off", metadata=_choice("off", "local", "on"))
    log_level: str = field(default="info", metadata=_choice("debug", "info", "warning", "error"))
    # Lease mode, for tiers whose limits are far above one host's traffic:
    # organisations of these tiers are counted in memory against blocks of
    # units leased from the shared counters (one round trip per block instead
    # of per decision).  Never more than the limit in all; see README.
    lease_tiers: tuple[str, ...] = ()
    # A block is this share of the limit (at least what the message needs).
    lease_fraction: float = field(default=0.001, metadata={"min": 1e-6, "max": 0.5})
    # Unspent units a process has not touched for this long go back.
    lease_idle_seconds: float = field(default=2.0, metadata={"min": 0.1, "max": 3600})
    # Window lengths (seconds): messages per 'hour', recipients and bytes per
    # 'day', aligned to the epoch.  Tier limits mean hours and days: change
    # these only for tests that watch a window roll over in real time.
    message_window_seconds: int = field(default=3600, metadata={"min": 1, "max": 86400})
    daily_window_seconds: int = field(default=86400, metadata={"min": 1, "max": 86400 * 7})

    @property
    def windows(self) -> Windows:
        return Windows(self.message_window_seconds, self.daily_window_seconds)


@dataclass(frozen=True)
class PostfixConfig:
    """[postfix]: where `postkeep postfix apply/check` finds the instance."""

    config_directory: str = "/etc/postfix"
    # How Postfix reaches the milter (Postfix syntax: inet:HOST:PORT or unix:PATH).
    milter_address: str = "inet:127.0.0.1:8891"
    # How Postfix reaches postkeep-policyd (check_policy_service; Postfix syntax).
    policy_address: str = "inet:127.0.0.1:10040"
    # How Postfix delivers reports to postkeep-storage over LMTP (Postfix
    # syntax: inet:HOST:PORT or unix:PATH).
    storage_lmtp_address: str = "inet:127.0.0.1:10027"
    # The system mail lane (postfix-conf/master.cf, transport postkeep-system):
    # the source address its SMTP client binds to (smtp_bind_address; empty:
    # the host's choice, as for customer mail) and the name it gives in HELO.
    system_bind_address: str = ""
    system_helo_name: str = "$myhostname"


@dataclass(frozen=True)
class StorageConfig:
    """[storage]: postkeep-storage, the sidecar that records delivery outcomes."""

    # LMTP listener for DSNs and bounces (the bundle's transport_maps routes
    # postkeep's return paths here).
    lmtp_host: str = "127.0.0.1"
    lmtp_port: int = field(default=10027, metadata={"min": 1, "max": 65535})
    metrics_listen: str = "127.0.0.1:9363"
    # Reports larger than this are refused (552 5.3.4): a DSN with RET=HDRS
    # is a few kilobytes; remote bounces may quote the whole message.
    max_report_bytes: int = field(default=12 << 20, metadata={"min": 1024})
    # Outcomes are written in batches: whatever arrived while the previous
    # batch was written, up to this many reports per round trip.
    batch_max: int = field(default=200, metadata={"min": 1, "max": 10000})
    # How many batches may be in PostgreSQL at once (each on a pool connection;
    # keep it below postgres.pool_max).  One makes the largest batches, the
    # least work per report; more help when a commit is slow (a remote
    # PostgreSQL, a slow disk).  On the 2-core bench host with everything
    # local, 4 cost 5-13 % of the throughput with outcome tracking.
    batch_writers: int = field(default=1, metadata={"min": 1, "max": 64})
    # How long a received report's hash is kept to recognise a duplicate
    # (Postfix retries a report for at most bounce_queue_lifetime, 1 hour);
    # older days of the reports table are dropped whole.
    report_days: int = field(default=3, metadata={"min": 1, "max": 90})
    # How long the event outbox keeps an event (issue 18): the webhook
    # worker retries for 24 h, so a few days more lets an operator replay;
    # older days of event_outbox are dropped whole.
    event_days: int = field(default=7, metadata={"min": 2, "max": 90})
    # How often the sidecar runs its upkeep (report partitions).
    maintenance_seconds: float = field(default=3600.0, metadata={"min": 10})
    # How often the sidecar looks for organisations due a new zstd dictionary
    # (trained weekly per organisation with enough small mail; see
    # storage/content/dictionaries.py train_due).  0: never (train with `postkeep dict train`).
    dictionary_check_seconds: float = field(default=3600.0, metadata={"min": 0})
    # Where failure notices are forwarded to organisations that asked for it
    # (organisations.forward_failures): an SMTP server, HOST:PORT.  Empty: no
    # forwarding.
    forward_relay: str = ""
    # How often the sidecar drains the milter's outage spool
    # (milter.outage_spool_directory, on this host) while it holds entries.
    spool_drain_interval_seconds: float = field(default=5.0, metadata=_positive())
    # A delivery report for a message still in that spool asks the drain to
    # run at once and waits up to this long for it before it is answered 451
    # (Postfix brings it back later).  Under milter.accept_after = 'journal'
    # every message passes through the spool and a fast DSN often arrives
    # before its drain.  0: answer 451 at once.
    spool_report_wait_seconds: float = field(default=5.0, metadata={"min": 0, "max": 300})
    log_level: str = field(default="info", metadata=_choice("debug", "info", "warning", "error"))
    # --- sealed content (issue 19; storage/content/sealing.py) ---
    # base64 of 32 random bytes (`head -c32 /dev/urandom | base64`): wraps
    # each organisation's content key, which wraps each message's data key.
    # Read by every process that writes or reads content (milter, sidecar,
    # CLI).  Empty: new content is not sealed (sealed content then cannot be
    # read).  Losing it loses all sealed content: back it up apart from the
    # database.
    master_key: str = field(default="", repr=False,
                            metadata={"secret": True, "env": "POSTKEEP_STORAGE_MASTER_KEY"})
    master_key_file: str = ""
    # During a master-key rotation only (README "Rotating the content master
    # key"): the key being retired.  Organisation keys it still wraps are
    # read with it; everything new is wrapped by master_key.  Remove it once
    # `postkeep storage rotate-master-key` has rewrapped them all.
    previous_master_key: str = field(
        default="", repr=False,
        metadata={"secret": True, "env": "POSTKEEP_STORAGE_PREVIOUS_MASTER_KEY"})
    previous_master_key_file: str = ""

    def master_key_bytes(self) -> bytes | None:
        """The 32 bytes of master_key (checked at load), or None if unset."""
        return base64.b64decode(self.master_key.strip()) if self.master_key else None

    def previous_master_key_bytes(self) -> bytes | None:
        """The 32 bytes of previous_master_key (checked at load), or None if unset."""
        return (base64.b64decode(self.previous_master_key.strip())
                if self.previous_master_key else None)


@dataclass(frozen=True)
class DkimConfig:
    """[dkim]: signing keys.  Customer keys live encrypted in PostgreSQL under
    the master key; the platform's system key never touches the database."""

    # base64 of 32 random bytes (`head -c32 /dev/urandom | base64`); decrypts
    # the private keys stored in dkim_keys.
    master_key: str = field(
        default="", repr=False, metadata={"secret": True, "env": "POSTKEEP_DKIM_MASTER_KEY"}
    )
    master_key_file: str = ""
    # Mail from these domains is system mail: signed with the system key,
    # never stored or counted.
    system_domains: tuple[str, ...] = ()
    system_selector: str = ""
    # PEM private key (RSA or Ed25519) for system mail.
    system_key: str = field(
        default="", repr=False, metadata={"secret": True, "env": "POSTKEEP_SYSTEM_DKIM_KEY"}
    )
    system_key_file: str = ""


@dataclass(frozen=True)
class ReturnPathConfig:
    """[return_path]: the key that makes return paths unforgeable.

    The milter signs each return path with it (HMAC-SHA256 over the message
    id, its expiry and the bounce domain) and postkeep-storage records a
    report only if it arrived at a return path that verifies.  Required when
    milter.bounce_domain is set; the same on every host of a platform.
    Changing it turns reports for mail sent before the change into unmatched
    ones."""

    # At least 32 characters of secret (`head -c32 /dev/urandom | base64`).
    key: str = field(default="", repr=False,
                     metadata={"secret": True, "env": "POSTKEEP_RETURN_PATH_KEY"})
    key_file: str = ""

    def key_bytes(self) -> bytes:
        return self.key.encode()


RETURN_PATH_KEY_MIN = 32


@dataclass(frozen=True)
class RetentionConfig:
    """[retention]: `postkeep retention run` and the sidecar's schedule for it."""

    # How content objects expire: 'auto' installs one S3 lifecycle rule per
    # retention class where the server supports it and sweeps what no rule
    # covers; 'lifecycle' requires rules; 'sweep' deletes every expired
    # object from the sweeper (S3 servers without lifecycle support).
    content_expiry: str = field(default="auto", metadata=_choice("auto", "lifecycle", "sweep"))
    # Objects deleted per S3 multi-delete request (S3 allows 1,000).
    sweep_batch: int = field(default=1000, metadata={"min": 1, "max": 1000})
    # Days before today whose delivery statistics each run recomputes.
    stats_days: int = field(default=8, metadata={"min": 1, "max": 366})
    # A partition drop waits this long for its lock (captures wait behind
    # it meanwhile), then backs off and tries again, up to drop_attempts.
    lock_timeout_ms: int = field(default=2000, metadata={"min": 10, "max": 600000})
    drop_attempts: int = field(default=5, metadata={"min": 1, "max": 100})
    # Whether postkeep-storage runs retention itself, and how often (seconds;
    # the first run one interval after start).  Keep it well under a day: a
    # legal hold's new mail is moved out of lifecycle reach by a run.
    in_sidecar: bool = True
    interval_seconds: float = field(default=3600.0, metadata={"min": 60, "max": 86400})


@dataclass(frozen=True)
class LogConfig:
    """[log]: the daemons' log lines (postkeep/logs.py)."""

    # 'text': one line per event, `<UTC time> <program>[<pid>] <LEVEL> key=value ...`;
    # 'json': one JSON object per line, each key=value pair a field.
    format: str = field(default="text", metadata=_choice("text", "json"))


# --- [tags] (issue 17: application tags) ---------------------------------

# A tag key: lower-case ASCII, as a JSON key and a CLI filter take it as is.
TAG_KEY = re.compile(r"[a-z][a-z0-9_]{0,62}")
# A header field name (RFC 5322 2.2: printable ASCII but the colon).
_FIELD_NAME = re.compile(r"[!-9;-~]+")
# Headers a message cannot do without, or that signing and tracing rely on:
# never tag headers (stripping one would change the message itself).
_NOT_TAG_HEADERS = frozenset({
    "from", "sender", "reply-to", "to", "cc", "bcc", "subject", "date", "message-id",
    "in-reply-to", "references", "mime-version", "content-type",
    "content-transfer-encoding", "content-disposition", "received", "return-path",
    "dkim-signature", "list-unsubscribe", "list-unsubscribe-post", "auto-submitted",
})


@dataclass(frozen=True)
class TagsConfig:
    """[tags]: what a message belongs to, told by the platform in headers.

    Each header named in `headers` gives one tag (its value); the free header
    gives any tag as `key=value`.  Tags land in `messages.tags` (JSONB) and the
    tag `campaign_id` in `messages.campaign_id` too.  Malformed or oversized
    tags are refused with 550 5.6.0 (postkeep/milter/tags.py)."""

    # Header name -> tag key, e.g. { "X-Campaign-Id" = "campaign_id" }.
    headers: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    # The free tag header, each one `key=value`; "" turns it off.
    free_header: str = "X-Postkeep-Tag"
    # true: tag headers are removed before signing and delivery (recipients
    # never see them; the archive keeps the message as delivered).
    strip: bool = True
    # At most this many tags per message, each value at most this many characters.
    max_tags: int = field(default=16, metadata={"min": 1, "max": 256})
    max_value_length: int = field(default=256, metadata={"min": 1, "max": 998})


def _check_tags(cfg: TagsConfig, id_header: str) -> None:
    """Header names are field names, keys are tag keys, none collides."""
    seen: dict[str, str] = {}
    for name, key in cfg.headers.items():
        where = f"tags.headers.{name}"
        if not _FIELD_NAME.fullmatch(name):
            raise ConfigError(f"{where}: {name!r} is not a header field name")
        if name.lower() in _NOT_TAG_HEADERS or name.lower() == id_header.lower():
            raise ConfigError(f"{where}: {name} cannot be a tag header (the message needs it)")
        if not TAG_KEY.fullmatch(key):
            raise ConfigError(f"{where} = {key!r}: expected a tag key ({TAG_KEY.pattern})")
        if name.lower() in seen:
            raise ConfigError(f"{where}: named twice (also as {seen[name.lower()]})")
        seen[name.lower()] = name
    free = cfg.free_header
    if free and (not _FIELD_NAME.fullmatch(free) or free.lower() in _NOT_TAG_HEADERS
                 or free.lower() == id_header.lower() or free.lower() in seen):
        raise ConfigError(f"tags.free_header = {free!r}: expected a header field name that is"
                          " no mapped tag header and none the message needs")


# --- [webhooks] (issue 18: event delivery) -----------------------------------
@dataclass(frozen=True)
class WebhooksConfig:
    """[webhooks]: postkeep-storage delivers the event outbox to each
    organisation's endpoints (`postkeep webhook add`).  Endpoint secrets are
    sealed under the DKIM master key ([dkim] master_key_file): without it the
    worker does not run."""

    # Whether postkeep-storage runs the delivery worker.
    enabled: bool = True
    # Seconds one POST may take (connect, send, answer) before it counts as failed.
    request_timeout_seconds: float = field(default=10.0, metadata={"min": 0.1, "max": 300})
    # POSTs in flight at once over all endpoints (each endpoint has at most one).
    concurrency: int = field(default=32, metadata={"min": 1, "max": 1024})
    # Retry delays: the first, doubled each failure up to the maximum, each
    # with up to half of it taken off at random (jitter).
    retry_initial_seconds: float = field(default=5.0, metadata={"min": 0.01, "max": 3600})
    retry_max_seconds: float = field(default=3600.0, metadata={"min": 0.01, "max": 86400})
    # An event not delivered this long after it was written is dead-lettered.
    give_up_after_seconds: float = field(default=86400.0, metadata={"min": 1, "max": 604800})
    # The safety net behind LISTEN postkeep_events: every endpoint looks
    # for new events at least this often.
    poll_seconds: float = field(default=5.0, metadata={"min": 0.1, "max": 3600})
    # Delivered rows are kept this many days (`postkeep webhook deliveries`).
    keep_delivered_days: int = field(default=7, metadata={"min": 1, "max": 366})


@dataclass(frozen=True)
class Config:
    postgres: PostgresConfig = PostgresConfig()
    s3: S3Config = S3Config()
    milter: MilterConfig = MilterConfig()
    postfix: PostfixConfig = PostfixConfig()
    dkim: DkimConfig = DkimConfig()
    policyd: PolicydConfig = PolicydConfig()
    storage: StorageConfig = StorageConfig()
    retention: RetentionConfig = RetentionConfig()
    return_path: ReturnPathConfig = ReturnPathConfig()
    log: LogConfig = LogConfig()
    tags: TagsConfig = TagsConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    source: str = "<defaults>"


_SECTIONS: dict[str, type[Any]] = {
    "postgres": PostgresConfig,
    "s3": S3Config,
    "milter": MilterConfig,
    "postfix": PostfixConfig,
    "dkim": DkimConfig,
    "policyd": PolicydConfig,
    "storage": StorageConfig,
    "retention": RetentionConfig,
    "return_path": ReturnPathConfig,
    "log": LogConfig,
    "tags": TagsConfig,
    "webhooks": WebhooksConfig,
}

# Field types as declared (the annotations are strings), and how each is named
# in a refusal.
_LIST_OF_STR = "tuple[str, ...]"
_MAP_OF_STR = "Mapping[str, str]"
_TYPE_NAMES = {_LIST_OF_STR: "list of strings", _MAP_OF_STR: "table of strings"}


def _describe(meta: Any, ftype: str) -> str:
    if "choices" in meta:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    bounds = []
    if "min" in meta:
        bounds.append((">" if meta.get("exclusive") else ">=") + f" {meta['min']}")
    if "max" in meta:
        bounds.append(f"<= {meta['max']}")
    if "min_len" in meta:
        bounds.append(f"at least {meta['min_len']} characters")
    return f"a {_TYPE_NAMES.get(ftype, ftype)}" + (" " + " and ".join(bounds) if bounds else "")


def _check(section: str, f: dataclasses.Field[Any], value: Any) -> Any:
    key = f"{section}.{f.name}"
    ftype = str(f.type)
    meta = f.metadata
    shown = "<secret>" if meta.get("secret") else repr(value)
    want = _describe(meta, ftype)
    ok_type = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        _LIST_OF_STR: isinstance(value, list) and all(isinstance(v, str) for v in value),
        _MAP_OF_STR: isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
    }[ftype]
    if not ok_type:
        raise ConfigError(f"{key} = {shown}: expected {want}")
    if ftype == "float":
        value = float(value)
    if ftype == _LIST_OF_STR:
        value = tuple(value)  # frozen configuration: lists become tuples
    if ftype == _MAP_OF_STR:
        value = types.MappingProxyType(dict(value))  # and tables read-only mappings
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key} = {shown}: expected {want}")
    if "min" in meta and (
        value <= meta["min"] if meta.get("exclusive") else value < meta["min"]
    ):
        raise ConfigError(f"{key} = {shown}: expected {want}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{key} = {shown}: expected {want}")
    if "min_len" in meta and len(value) < meta["min_len"]:
        raise ConfigError(f"{key} = {shown}: expected {want}")
    return value


def _read_secret_file(key: str, path: str) -> str:
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{key} = {path!r}: cannot read the file ({exc.strerror})") from exc
    if mode & 0o077:
        raise ConfigError(
            f"{key} = {path!r}: the file is readable by other users (mode {mode & 0o777:o});"
            " allowed: 0600 or 0400"
        )
    return text


def _credential(key: str) -> str | None:
    """The systemd credential named KEY ($CREDENTIALS_DIRECTORY/KEY), if there is one.

    systemd makes that directory and its files readable by the service alone,
    so their mode is not checked again here."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / key
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read the credential {str(path)!r}"
                          f" ({exc.strerror})") from exc


def _check_s3_endpoint(endpoint: str) -> None:
    """minio-py takes HOST[:PORT] only and raises ValueError at start otherwise."""
    if "://" in endpoint:
        raise ConfigError(
            f"s3.endpoint = {endpoint!r}: expected HOST:PORT without a scheme"
            " (s3.secure = true for https)")
    host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", "")
    if "/" in endpoint or not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ConfigError(f"s3.endpoint = {endpoint!r}: expected HOST:PORT, e.g. 127.0.0.1:9000")


def _check_postgres_ports(host: str, ports: str) -> None:
    """postgres.ports: one port (1..65535) per host of postgres.host, or empty."""
    if not ports:
        return
    items = ports.split(",")
    hosts = host.split(",")
    if not all(p.strip().isdigit() and 0 < int(p) < 65536 for p in items) or (
            len(items) != len(hosts)):
        raise ConfigError(f"postgres.ports = {ports!r}: expected one port (1..65535) per host"
                          f" of postgres.host ({len(hosts)}), comma-separated")


def _build(section: str, cls: type[Any], raw: dict[str, Any]) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}]: expected a table, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(fields))}"
        )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _check(section, f, raw[name])
        env = f.metadata.get("env")
        if env and os.environ.get(env) and name not in raw:
            values[name] = os.environ[env]
    for name in fields:
        if name.endswith("_file") and values.get(name):
            target = name.removesuffix("_file")
            values[target] = _read_secret_file(f"{section}.{name}", values[name])
    for name, f in fields.items():
        if f.metadata.get("secret") and not values.get(name):
            secret = _credential(f"{section}.{name}")
            if secret:
                values[name] = secret
    cfg = cls(**values)
    if section == "s3":
        _check_s3_endpoint(cfg.endpoint)
    if section == "postgres":
        _check_postgres_ports(cfg.host, cfg.ports)
    if section == "storage":
        _check_storage_master_key(cfg)
    if section == "postgres" and cfg.pool_min > cfg.pool_max:
        raise ConfigError(
            f"postgres.pool_min = {cfg.pool_min}: expected <= postgres.pool_max ({cfg.pool_max})"
        )
    if section == "dkim" and cfg.system_domains and not (cfg.system_selector and cfg.system_key):
        raise ConfigError(
            f"dkim.system_domains = {list(cfg.system_domains)!r}: system mail needs"
            " dkim.system_selector and a key (dkim.system_key_file or $POSTKEEP_SYSTEM_DKIM_KEY)"
        )
    return cfg


def _check_storage_master_key(cfg: StorageConfig) -> None:
    """storage.master_key and previous_master_key, if set, are base64 of
    exactly 32 bytes (never shown); a previous key needs a current one."""
    if cfg.previous_master_key:
        if not cfg.master_key:
            raise ConfigError("storage.previous_master_key_file is set but"
                              " storage.master_key_file is not: the previous key is only"
                              " read during a rotation to a new master key")
        source = (f"storage.previous_master_key_file = {cfg.previous_master_key_file!r}"
                  if cfg.previous_master_key_file
                  else "storage.previous_master_key (or $POSTKEEP_STORAGE_PREVIOUS_MASTER_KEY)")
        _check_master_key_text(source, cfg.previous_master_key)
    if not cfg.master_key:
        return
    source = (f"storage.master_key_file = {cfg.master_key_file!r}" if cfg.master_key_file
              else "storage.master_key (or $POSTKEEP_STORAGE_MASTER_KEY)")
    _check_master_key_text(source, cfg.master_key)


def _check_master_key_text(source: str, text: str) -> bytes:
    """TEXT's 32 bytes if it is base64 of exactly 32 bytes, else ConfigError naming SOURCE."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise ConfigError(f"{source}: not valid base64; expected base64 of 32 random bytes"
                          " (head -c32 /dev/urandom | base64)") from None
    if len(raw) != 32:
        raise ConfigError(f"{source}: decodes to {len(raw)} bytes; expected base64 of 32"
                          " random bytes (head -c32 /dev/urandom | base64)")
    return raw


# --- a master key file outside the configuration (postkeep storage rotate-master-key) ---


def read_master_key_file(path: str, name: str) -> bytes:
    """The 32-byte content master key in PATH, checked as storage.master_key_file
    is at load: mode 0600 or 0400, base64 of 32 bytes.  ConfigError naming
    NAME (the option that gave PATH) and PATH otherwise."""
    source = f"{name} = {path!r}"
    return _check_master_key_text(source, _read_secret_file(name, path))


def _check_return_path_key(cfg: Config) -> None:
    """Outcome tracking needs the return-path key; a key given must be long enough."""
    key = cfg.return_path.key
    if not (cfg.milter.bounce_domain or key) or len(key) >= RETURN_PATH_KEY_MIN:
        return
    why = "is empty" if not key else f"has {len(key)} characters"
    need = ""
    if cfg.milter.bounce_domain:
        need = (f"; milter.bounce_domain = {cfg.milter.bounce_domain!r} turns outcome tracking"
                " on, which signs every return path with it")
    raise ConfigError(
        f"return_path.key {why}: expected at least {RETURN_PATH_KEY_MIN} characters of secret"
        f" (return_path.key_file or $POSTKEEP_RETURN_PATH_KEY){need}")


def parse(data: dict[str, Any], source: str = "<string>") -> Config:
    """Build a Config from parsed TOML, refusing anything not declared above."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            f"[{unknown[0]}]: unknown section; allowed: {', '.join(sorted(_SECTIONS))}"
        )
    built = {name: _build(name, cls, data.get(name, {})) for name, cls in _SECTIONS.items()}
    cfg = Config(**built, source=source)
    _check_return_path_key(cfg)
    _check_tags(cfg.tags, cfg.milter.id_header)
    if cfg.milter.accept_after == "journal" and not cfg.milter.outage_spool:
        raise ConfigError("milter.accept_after = 'journal' writes every message to"
                          " milter.outage_spool_directory, but milter.outage_spool = false;"
                          " turn it on, or accept_after = 'store'")
    return cfg


def _refuse_readable_secrets(path: str, mode: int, data: dict[str, Any]) -> None:
    """A TOML file holding a secret inline is a key file: owner-only, like the *_file ones."""
    if not mode & 0o077:
        return
    for section, cls in _SECTIONS.items():
        table = data.get(section)
        if not isinstance(table, dict):
            continue
        for f in dataclasses.fields(cls):
            if f.metadata.get("secret") and table.get(f.name):
                raise ConfigError(
                    f"{section}.{f.name} = <secret> in {path}: the file is readable by other"
                    f" users (mode {mode & 0o777:o}); allowed: 0600 or 0400, or move the"
                    f" secret to {section}.{f.name}_file or a systemd credential")


def load(path: str | None = None) -> Config:
    """Load the TOML file named by PATH, $POSTKEEP_CONFIG or the default path."""
    path = path or os.environ.get("POSTKEEP_CONFIG") or DEFAULT_PATH
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such configuration file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    _refuse_readable_secrets(path, mode, data)
    return parse(data, source=path)


# What each daemon cannot work without, whatever the defaults: an empty
# configuration file must not pass its --check-config.  The S3 credentials
# have no sensible default; PostgreSQL's do (the local socket with peer
# authentication as user postkeep).
_REQUIRED = {
    "s3": (("s3.access_key", "$POSTKEEP_S3_ACCESS_KEY"),
           ("s3.secret_key", "s3.secret_key_file, $POSTKEEP_S3_SECRET_KEY or the credential"
                             " s3.secret_key")),
}


def require(cfg: Config, *needs: str) -> None:
    """ConfigError naming the first key NEEDS call for that has no value."""
    for need in needs:
        for key, sources in _REQUIRED[need]:
            section, _, name = key.partition(".")
            if not getattr(getattr(cfg, section), name):
                raise ConfigError(f"{key} is not set: required (or {sources})")
