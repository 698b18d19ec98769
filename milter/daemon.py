"""postkeep-milter: the process.

Loads and checks the configuration (refusing bad values with the key),
opens the PostgreSQL pool and the S3 client, serves /metrics, opens the
milter socket, tells systemd it is ready (READY=1 once the socket listens)
and hands the socket to libmilter, which runs one thread per Postfix
connection.

The stop signals are blocked before the first thread starts
(process.block_stop_signals) and unblocked in the main thread alone, which
takes them as Python signal handlers while libmilter runs on a thread of its
own.  (libmilter's own signal thread stops the listener at once, and with the
worker pool Debian's libmilter is built with, the connections in flight are
then never served again: Postfix saw "Connection reset" and tempfailed.)  On
SIGTERM the milter refuses new connections, waits for those in flight, then
stops libmilter (smfi_stop).

The milter reloads on SIGUSR1 (the unit's ExecReload): it re-reads the
configuration file and applies milter.log_level.  Not SIGHUP: should it reach
libmilter's signal thread, that one stops.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import click

import postkeep.logs
from postkeep import __version__
from postkeep.config import ConfigError, load, require
from postkeep.milter.service import system_signing
from postkeep.milter.signing import parse_networks
from postkeep.process import (
    bind_error,
    block_stop_signals,
    ensure_port_free,
    fail,
    notify_systemd,
    split_hostport,
    test_hang_seconds,
    test_hooks_enabled,
    watchdog_interval,
)
from postkeep.signing_keys import DkimError
from postkeep.storage.content import sealing

NAME = "postkeep-milter"
# The longest the drain waits for connections in flight after SIGTERM; the
# unit's TimeoutStopSec (150 s) is above it, Postfix's milter_content_timeout
# (120 s in the bundle) below.
DRAIN_SECONDS = 140.0


def _limit_malloc_arenas(count: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena, and keeps
    freed memory in it; with one libmilter thread per connection handling
    64 KiB body chunks, RSS grows with concurrency.  Two arenas keep it near
    what is actually in use (same as MALLOC_ARENA_MAX=2)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        m_arena_max = -8  # from <malloc.h>
        ctypes.CDLL(name).mallopt(m_arena_max, count)
        # Not M_MMAP_THRESHOLD: fixing it turns off glibc's dynamic
        # thresholds, and buffers over it (zstd decompression contexts, read
        # chunks) are then mmap'ed and unmapped per message: +0.07 ms of CPU
        # per 5 KB message, +0.15 ms per 100 KB (bench/milter_rss.sh: the
        # memory it would save is a few MiB kept after bursts of 10 MB mail).



def _check_listen(value: str) -> None:
    if not (value.startswith("inet:") or value.startswith("inet6:")
            or value.startswith("unix:") or value.startswith("local:")):
        raise ConfigError(
            f"milter.listen = {value!r}: expected inet:PORT@HOST, inet6:PORT@HOST or unix:PATH"
        )


def _check_outage_spool(path: str) -> None:
    """Create the outage spool (0700) if missing; refuse, naming the key, if unusable."""
    from postkeep.storage.content.spool import Spool

    try:
        Spool(path).ensure()
        probe = os.path.join(path, "tmp", f".probe-{os.getpid()}")
        with open(probe, "wb") as fh:
            os.fsync(fh.fileno())
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"milter.outage_spool_directory = {path!r}: cannot create or write it "
            f"({exc.strerror or exc}); set milter.outage_spool = false to tempfail instead"
        ) from exc


class Sessions:
    """Milter connections open right now, so the drain can wait for them."""

    def __init__(self) -> None:
        self._open = 0
        self._changed = threading.Condition()
        self.refusing = False

    @property
    def open(self) -> int:
        with self._changed:
            return self._open

    def refuse_new(self) -> None:
        self.refusing = True

    def opened(self) -> None:
        with self._changed:
            self._open += 1

    def closed(self) -> None:
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> int:
        """Block until none is open or TIMEOUT passes; how many are still open."""
        with self._changed:
            self._changed.wait_for(lambda: self._open <= 0, timeout)
            return self._open


def _serve_milter(name: str, listen: str, timeout: int, sessions: Sessions,
                  on_listening: Callable[[], None]) -> None:
    """Milter.runmilter, with the socket opened before READY=1 is sent and every
    connection counted (Sessions).  Returns when libmilter stops (SIGTERM)."""
    import Milter

    # pymilter's C extension, as Milter itself imported it (mypy would take the
    # name `milter` for this repository's milter/ folder).
    milter: Any = Milter.milter

    # Every connection starts with option negotiation (pymilter makes the
    # CaptureMilter there; CONNECT itself is negotiated away, unused) and ends
    # with close.
    def negotiate(ctx: Any, *args: Any) -> Any:
        sessions.opened()
        answer = Milter.negotiate_callback(ctx, *args)
        # Draining: a new connection is refused (Postfix applies
        # milter_default_action, tempfail, as if the milter were down).
        return Milter.TEMPFAIL if sessions.refusing else answer

    def close(ctx: Any) -> Any:
        try:
            return Milter.close_callback(ctx)
        finally:
            sessions.closed()

    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(close)
    milter.setconn(listen)
    if timeout > 0:
        milter.settimeout(timeout)
    milter.register(name, data=lambda ctx: ctx.getpriv().data(),
                    unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
                    negotiate=negotiate)
    try:
        milter.opensocket(True)
    except milter.error as exc:
        raise OSError(f"libmilter: {exc}") from exc
    on_listening()
    milter.main()


def _watchdog(interval: float, lookups: Executor, stop: threading.Event) -> None:
    """WATCHDOG=1 every INTERVAL while the lookup threads (the milter's backend
    work: every message's organisation lookup runs there) answer: a probe that
    does not come back in time means they are wedged, and the pings stop."""
    while not stop.wait(interval):
        try:
            lookups.submit(lambda: None).result(timeout=interval)
        except Exception:
            logging.getLogger("postkeep.milter").warning(
                "watchdog: the lookup threads did not answer within %gs; no ping", interval)
            continue
        notify_systemd("WATCHDOG=1")


def _handle_signals(stopping: threading.Event, config_path: str | None, lookups: Executor,
                    threads: int) -> None:
    """SIGTERM/SIGINT start the drain, SIGUSR1 reloads; unblocked in this
    (main) thread only, after every other thread has started blocking them."""
    def stop(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, lambda signum, frame: _reload(config_path))
    wanted = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
    if test_hooks_enabled():
        signal.signal(signal.SIGUSR2, lambda signum, frame: _hang_lookups(lookups, threads))
        wanted.add(signal.SIGUSR2)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)


def _drain(sessions: Sessions, log: logging.Logger) -> None:
    """Refuse new connections, let those in flight finish (at most DRAIN_SECONDS)."""
    notify_systemd("STOPPING=1")
    sessions.refuse_new()
    log.info("postkeep-milter stopping: no new connections; finishing those in flight")
    began, open_at_stop = time.monotonic(), sessions.open
    left = sessions.wait_idle(DRAIN_SECONDS)
    if left:
        log.warning("%d connection(s) still open after %gs; stopping anyway", left,
                    DRAIN_SECONDS)
    else:
        log.info("drained: %d connection(s) open at the stop signal, closed within %.1fs",
                 open_at_stop, time.monotonic() - began)


def _reload(config_path: str | None) -> None:
    log = logging.getLogger("postkeep.milter")
    try:
        level = load(config_path).milter.log_level
    except ConfigError as exc:
        log.error("reload refused, configuration unchanged: %s", exc)
        return
    logging.getLogger().setLevel(level.upper())
    log.info("reloaded: milter.log_level = %s", level)


def _hang_lookups(lookups: Executor, threads: int) -> None:
    """Test hook (POSTKEEP_TEST_HOOKS=1, SIGUSR2): every lookup thread wedged."""
    seconds = test_hang_seconds()
    for _ in range(threads):
        lookups.submit(time.sleep, seconds)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=NAME)
@click.option("--config", "config_path", envvar="POSTKEEP_CONFIG", default=None,
              metavar="FILE", help="postkeep.toml (default: $POSTKEEP_CONFIG, "
              "else /etc/postkeep/postkeep.toml).")
@click.option("--check-config", is_flag=True,
              help="Load and check the configuration, print a summary and exit.")
def main(config_path: str | None, check_config: bool) -> None:
    """Run postkeep-milter: capture every message Postfix passes it.

    Wire it in Postfix as smtpd_milters and non_smtpd_milters (listed last);
    `postkeep postfix apply` does that.
    """
    try:
        cfg = load(config_path)
        require(cfg, "s3")
        sealing.install_config(cfg.storage)  # seals packed content
        mcfg = cfg.milter
        _check_listen(mcfg.listen)
        metrics_host, metrics_port = split_hostport("milter.metrics_listen", mcfg.metrics_listen)
        if not os.path.isdir(mcfg.spool_directory) or not os.access(mcfg.spool_directory, os.W_OK):
            raise ConfigError(
                f"milter.spool_directory = {mcfg.spool_directory!r}: "
                "expected an existing directory this user can write"
            )
        if mcfg.outage_spool:
            _check_outage_spool(mcfg.outage_spool_directory)
        try:
            networks = parse_networks("milter.trusted_networks", mcfg.trusted_networks)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            system = system_signing(cfg.dkim)
        except DkimError as exc:
            raise ConfigError(f"dkim.system_key: {exc}") from exc
        if cfg.dkim.master_key:
            from postkeep.storage.metadata.dkim_keys import load_master_key

            load_master_key(cfg.dkim)  # refuses a malformed key now, naming its source
    except ConfigError as exc:
        click.echo(f"postkeep-milter: configuration error: {exc}", err=True)
        sys.exit(2)

    postkeep.logs.setup("postkeep-milter", mcfg.log_level, cfg.log.format)
    _limit_malloc_arenas()
    # A crash inside a C extension (libmilter, pymilter) otherwise leaves no
    # trace: dump every thread's Python stack to stderr on a fatal signal.
    faulthandler.enable()
    # urllib3 warns on every retry; the tempfail line already names the cause.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    if check_config:
        click.echo(f"configuration {cfg.source}: ok; listen {mcfg.listen}, "
                   f"metrics {mcfg.metrics_listen}, unknown_sender {mcfg.unknown_sender}")
        return

    try:
        _run(cfg, config_path, networks, system, metrics_host, metrics_port)
    except ConfigError as exc:
        fail(NAME, f"start-up refused: {exc}")
    except Exception as exc:
        fail(NAME, f"failed: {type(exc).__name__}: {exc}", 1)


def _port_free_or_refuse(listen: str, metrics_host: str, metrics_port: int) -> None:
    """libmilter only says "cannot open connection": try the ports ourselves
    first so a busy one is named, before anything starts."""
    kind, _, rest = listen.partition(":")
    if kind in ("inet", "inet6"):
        port, _, host = rest.partition("@")
        if port.isdigit():
            ensure_port_free("milter.listen", host or ("::" if kind == "inet6" else "0.0.0.0"),
                             int(port))
    ensure_port_free("milter.metrics_listen", metrics_host, metrics_port)


def _run(cfg: Any, config_path: str | None, networks: Any, system: Any,
         metrics_host: str, metrics_port: int) -> None:
    mcfg = cfg.milter
    log = logging.getLogger("postkeep.milter")
    # Before the first thread starts (the pool's, the committer's, /metrics):
    # SIGTERM must reach libmilter's signal thread, never a thread that dies of it.
    block_stop_signals()
    _port_free_or_refuse(mcfg.listen, metrics_host, metrics_port)
    # Imported here so --help and config errors work without the C extension.
    from concurrent.futures import ThreadPoolExecutor

    import Milter
    from prometheus_client import start_http_server

    from postkeep.milter.adapter import CaptureMilter
    from postkeep.milter.committer import GroupCommitter
    from postkeep.milter.directory import Directory
    from postkeep.milter.keys import KeyRingRefresher
    from postkeep.milter.service import CaptureService
    from postkeep.milter.spool import OutageSpooler
    from postkeep.storage.content.journal import JournalWriter
    from postkeep.storage.content.objects import S3ObjectStore
    from postkeep.storage.content.spool import Spool
    from postkeep.storage.metadata.db import BackendError, Database
    from postkeep.storage.metadata.dkim_keys import load_master_key

    db = Database(cfg.postgres)
    objects = S3ObjectStore(cfg.s3)
    try:
        objects.ensure_bucket()
        objects.can_batch()  # probe now rather than on the first message
    except BackendError as exc:  # not fatal: messages tempfail until it is back
        log.warning("object store not ready at start: %s", exc)
    # What the server does (issue 19): one line; refused only if it lacks
    # what postkeep cannot work without (ConfigError names it).
    from postkeep.storage.lifecycle.conformance import check_at_start

    check_at_start(objects, log)
    db.open()
    spooler = None
    journal: JournalWriter | None = None
    if mcfg.outage_spool:
        # The spool's gauges are served by its drain (postkeep-storage), not here too:
        # a sum() over every target would count each entry twice.
        spool = Spool(mcfg.outage_spool_directory)
        if mcfg.accept_after == "journal":
            journal = JournalWriter(spool)
            journal.start()
        spooler = OutageSpooler(spool, mcfg.outage_spool_max_fill_percent, journal=journal)
    try:
        start_http_server(metrics_port, addr=metrics_host)
    except OSError as exc:
        raise ConfigError(bind_error("milter.metrics_listen", mcfg.metrics_listen, exc)) from exc
    lookups = ThreadPoolExecutor(mcfg.backend_threads, thread_name_prefix="lookup")
    committer = GroupCommitter(db, objects, workers=mcfg.commit_threads,
                               max_batch=mcfg.commit_batch_max,
                               linger=mcfg.commit_linger_ms / 1000,
                               siblings=mcfg.commit_siblings,
                               spool_dir=mcfg.spool_directory, level=mcfg.zstd_level,
                               timeout=mcfg.commit_timeout_seconds,
                               layout=cfg.s3.effective_layout(
                                   sealed=bool(cfg.storage.master_key)))
    from postkeep.storage.content.dictionaries import DictionaryCache

    dictionaries = DictionaryCache(db, objects, refresh=mcfg.dictionary_refresh_seconds,
                                   level=mcfg.zstd_level)
    keyring = None
    if cfg.dkim.master_key:
        keyring = KeyRingRefresher(db, load_master_key(cfg.dkim), mcfg.dkim_reload_seconds,
                                   lookups)
    CaptureMilter.service = CaptureService(
        mcfg, committer, Directory(db, mcfg.directory_cache_seconds, lookups),
        networks=networks, system=system, keyring=keyring, dictionaries=dictionaries,
        spooler=spooler, return_path_key=cfg.return_path.key_bytes(), tags=cfg.tags,
        in_flight=committer.in_flight)
    Milter.factory = CaptureMilter
    log.info("postkeep-milter starting: listen=%s metrics=%s config=%s outage_spool=%s"
             " accept_after=%s", mcfg.listen, mcfg.metrics_listen, cfg.source,
             mcfg.outage_spool_directory if mcfg.outage_spool else "off", mcfg.accept_after)
    sessions = Sessions()
    stop = threading.Event()
    stopping = threading.Event()
    served: list[BaseException] = []

    def listening() -> None:
        notify_systemd("READY=1")
        interval = watchdog_interval()
        if interval is not None:
            threading.Thread(target=_watchdog, args=(interval, lookups, stop),
                             name="watchdog", daemon=True).start()

    def serve() -> None:
        try:
            _serve_milter("postkeep", mcfg.listen, mcfg.mta_timeout_seconds, sessions,
                          listening)
        except BaseException as exc:
            served.append(exc)
        finally:
            stopping.set()

    # libmilter runs on a thread of its own, started while the stop signals are
    # blocked: its signal thread (which would stop the listener at once, and
    # with Debian's worker pool abandon the connections in flight) inherits the
    # mask but never gets them.  The main thread takes them instead, as Python
    # signal handlers: the kernel gives a process-directed signal to the main
    # thread first when it does not block it.
    libmilter = threading.Thread(target=serve, name="libmilter", daemon=True)
    libmilter.start()
    _handle_signals(stopping, config_path, lookups, mcfg.backend_threads)
    try:
        while not stopping.wait(1.0):
            pass
        if served:
            failure = served[0]
            if isinstance(failure, OSError):
                raise ConfigError(bind_error("milter.listen", mcfg.listen, failure)) from failure
            raise failure
        _drain(sessions, log)
        Milter.milter.stop()  # smfi_stop: the listener ends, main() returns
        # ... within libmilter's 5 s poll for the stop flag.  Nothing is left
        # for it to do (no connection open, new ones refused): wait briefly,
        # not those 5 s at every restart.
        libmilter.join(1.0)
    finally:
        stop.set()
        committer.close()
        if journal is not None:
            journal.close()  # its open segment handed to the drain
        if keyring is not None:
            keyring.close()
        lookups.shutdown(wait=True)
        db.close()
        log.info("postkeep-milter stopped")


if __name__ == "__main__":
    main()
