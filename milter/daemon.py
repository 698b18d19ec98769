"""postkeep-milter: the process.

Loads and checks the configuration (refusing bad values with the key),
opens the PostgreSQL pool and the S3 client, serves /metrics, tells systemd
it is ready and hands the socket to libmilter.  libmilter runs one thread per
Postfix connection and handles SIGTERM itself: it stops accepting, lets the
main loop return, and we close the pool after in-flight callbacks finish.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys

import click

import postkeep.logs
from postkeep.config import ConfigError, load
from postkeep.milter.service import system_signing
from postkeep.milter.signing import parse_networks
from postkeep.process import notify_systemd, split_hostport
from postkeep.signing_keys import DkimError


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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
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
    log = logging.getLogger("postkeep.milter")
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
    db.open()
    spooler = None
    if mcfg.outage_spool:
        # The spool's gauges are served by its drain (postkeep-storage), not here too:
        # a sum() over every target would count each entry twice.
        spool = Spool(mcfg.outage_spool_directory)
        spooler = OutageSpooler(spool, mcfg.outage_spool_max_fill_percent)
    start_http_server(metrics_port, addr=metrics_host)
    lookups = ThreadPoolExecutor(mcfg.backend_threads, thread_name_prefix="lookup")
    committer = GroupCommitter(db, objects, workers=mcfg.commit_threads,
                               max_batch=mcfg.commit_batch_max,
                               linger=mcfg.commit_linger_ms / 1000,
                               spool_dir=mcfg.spool_directory, level=mcfg.zstd_level,
                               timeout=mcfg.commit_timeout_seconds)
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
        spooler=spooler, return_path_key=cfg.return_path.key_bytes())
    Milter.factory = CaptureMilter
    log.info("postkeep-milter starting: listen=%s metrics=%s config=%s outage_spool=%s",
             mcfg.listen, mcfg.metrics_listen, cfg.source,
             mcfg.outage_spool_directory if mcfg.outage_spool else "off")
    notify_systemd("READY=1")
    try:
        Milter.runmilter("postkeep", mcfg.listen, timeout=mcfg.mta_timeout_seconds)
    finally:
        notify_systemd("STOPPING=1")
        committer.close()
        if keyring is not None:
            keyring.close()
        lookups.shutdown(wait=True)
        db.close()
        log.info("postkeep-milter stopped")


if __name__ == "__main__":
    main()
