"""postkeep-storage: the process.

Loads and checks the configuration, opens PostgreSQL and the object store
(lazily: reports tempfail with 451 until they are reachable), serves
/metrics on loopback, listens for Postfix's LMTP, tells systemd it is ready
(READY=1 once it listens), pings systemd's watchdog from its event loop, and
on SIGTERM stops accepting and lets in-flight reports finish.  SIGHUP (the
unit's ExecReload) re-reads the configuration file for storage.log_level.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

import postkeep.logs
from postkeep import __version__
from postkeep.config import Config, ConfigError, load, require
from postkeep.process import (
    bind_error,
    ensure_port_free,
    fail,
    notify_systemd,
    reload_log_level,
    split_hostport,
    supervise,
)
from postkeep.storage.content import sealing

log = logging.getLogger("postkeep.storage")
NAME = "postkeep-storage"


async def serve(cfg: Config, config_path: str | None = None) -> None:
    """Run until SIGTERM or SIGINT."""
    from aiosmtpd.lmtp import LMTP

    from postkeep.storage.content.objects import S3ObjectStore
    from postkeep.storage.metadata.db import BackendError, Database
    from postkeep.storage.metadata.events import maintain_event_partitions
    from postkeep.storage.reports.outcomes import maintain_report_partitions
    from postkeep.storage.sidecar.lmtp import Batcher, ReportHandler, record_with
    from postkeep.storage.sidecar.upkeep import Job, run_jobs

    scfg = cfg.storage
    db = Database(cfg.postgres)
    db.open()
    objects = S3ObjectStore(cfg.s3)
    try:
        await asyncio.to_thread(objects.ensure_bucket)
    except BackendError as exc:  # not fatal: unmatched reports tempfail until it is back
        log.warning("object store not ready at start: %s", exc)
    from postkeep.storage.lifecycle.conformance import check_at_start

    try:
        await asyncio.to_thread(check_at_start, objects, log)
    except ConfigError:
        db.close()
        raise
    batcher = Batcher(record_with(db), scfg.batch_max, scfg.batch_writers)
    batcher.start()
    spool_stop, spool_task, spool, spool_wake = _start_spool_drain(cfg, db, objects)
    relay = split_hostport("storage.forward_relay", scfg.forward_relay) \
        if scfg.forward_relay else None
    handler = ReportHandler(db, objects, batcher, relay, cfg.return_path.key_bytes(),
                            spooled=spool.holds, drain_now=spool_wake.set,
                            spool_wait=scfg.spool_report_wait_seconds)
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(
            lambda: LMTP(handler, data_size_limit=scfg.max_report_bytes, enable_SMTPUTF8=True,
                         ident="postkeep-storage", timeout=300),
            host=scfg.lmtp_host, port=scfg.lmtp_port, reuse_address=True)
    except OSError as exc:
        spool_stop.set()
        spool_wake.set()
        await batcher.stop()
        await spool_task
        db.close()
        raise ConfigError(bind_error("storage.lmtp_port", f"{scfg.lmtp_host}:{scfg.lmtp_port}",
                                     exc)) from exc
    log.info("postkeep-storage listening for LMTP on %s:%d (config %s)", scfg.lmtp_host,
             scfg.lmtp_port, cfg.source)
    stop = asyncio.Event()
    watchdog = supervise(stop, lambda: reload_log_level(config_path, "storage", log))
    notify_systemd("READY=1")
    jobs = [
        Job("report-partitions", scfg.maintenance_seconds,
            lambda: f"{db.run(lambda c: maintain_report_partitions(c, scfg.report_days))}"
                    f" report partitions created or dropped"),
        Job("event-partitions", scfg.maintenance_seconds,
            lambda: f"{db.run(lambda c: maintain_event_partitions(c, scfg.event_days))}"
                    f" event partitions created or dropped"),
    ]
    if scfg.dictionary_check_seconds:
        from datetime import UTC, datetime

        from postkeep.storage.content.dictionaries import train_due

        def train() -> str:
            trained = db.run(lambda c: train_due(c, objects, datetime.now(UTC)))
            return f"{len(trained)} organisation dictionary(ies) trained"

        jobs.append(Job("dictionaries", scfg.dictionary_check_seconds, train))
    jobs.append(_orphan_job(db, objects, spool, scfg.maintenance_seconds))
    # Suppression lists (issue 17): expired entries, stale soft-bounce counts.
    jobs.append(Job("suppression-purge", scfg.maintenance_seconds, _purge_suppressions(db)))
    # A run in progress at shutdown stops at its next batch (its thread sees
    # retention_stop); the next start carries on.
    retention_stop = threading.Event()
    if cfg.retention.in_sidecar:
        from postkeep.storage.sidecar.retention_job import retention_job

        jobs.append(retention_job(db, objects, cfg.retention, retention_stop))
        log.info("retention runs every %gs (retention.interval_seconds)",
                 cfg.retention.interval_seconds)
    upkeep = asyncio.create_task(run_jobs(jobs, stop), name="upkeep")
    # Webhooks (issue 18): the event outbox delivered to each organisation's endpoints.
    from postkeep.storage.sidecar import webhooks

    webhook_task = webhooks.start(cfg, stop)
    await stop.wait()
    log.info("postkeep-storage stopping")
    notify_systemd("STOPPING=1")
    if watchdog is not None:
        watchdog.cancel()
    retention_stop.set()
    server.close()
    await server.wait_closed()
    await batcher.stop()
    await upkeep
    if webhook_task is not None:
        await webhook_task
    spool_stop.set()  # a drain pass stops between batches
    spool_wake.set()
    await spool_task
    db.close()


def _orphan_job(db: Any, objects: Any, spool: Any, interval: float) -> Any:
    """Delete message objects no row names (storage/lifecycle/orphans.py), hourly."""
    from prometheus_client import Counter

    from postkeep.storage.lifecycle.orphans import sweep_orphans
    from postkeep.storage.lifecycle.rules import S3Retention
    from postkeep.storage.sidecar.upkeep import Job

    deleted = Counter("postkeep_storage_orphan_objects_deleted_total",
                      "Message objects deleted because no row named them")
    store = S3Retention(objects.client, objects.bucket, objects.locks_objects)

    def sweep() -> str:
        result = db.run(lambda c: sweep_orphans(c, store, spool.holds))
        deleted.inc(result.deleted)
        if result.failed:
            raise RuntimeError(f"{len(result.failed)} orphan object(s) not deleted,"
                               f" e.g. {result.failed[0]}")
        return f"{result.deleted} orphan object(s) deleted of {result.examined} examined"

    return Job("orphans", interval, sweep)


def _purge_suppressions(db: Any) -> Callable[[], str]:
    from postkeep.storage.metadata.suppression import purge

    def run() -> str:
        done = db.run(purge)
        return (f"{done.expired} expired suppression(s), {done.soft_bounces} stale soft-bounce"
                " count(s) deleted")

    return run


def _start_spool_drain(cfg: Config, db: Any, objects: Any
                       ) -> tuple[threading.Event, asyncio.Future[None], Any, threading.Event]:
    """Drain the milter's outage spool every storage.spool_drain_interval_seconds
    (storage/content/spool.py), on a thread of its own, and at once when the
    last event returned is set (a report waiting for an entry); spool gauges
    on /metrics.  Stopping sets both events."""
    from prometheus_client import REGISTRY

    from postkeep.storage.content import spool as spool_mod
    from postkeep.storage.reports.inbound import link_each

    spool = spool_mod.Spool(cfg.milter.outage_spool_directory)
    REGISTRY.register(spool_mod.SpoolCollector(spool))
    stop, wake = threading.Event(), threading.Event()
    interval = cfg.storage.spool_drain_interval_seconds
    log.info("draining the outage spool %s every %gs", spool.dir, interval)
    task = asyncio.ensure_future(asyncio.to_thread(
        spool_mod.drain_forever, spool, objects, spool_mod.record_with(db, link_each),
        interval=interval, stop=stop, on_pass=spool_mod.log_pass,
        packing=spool_mod.packing_for(cfg, db), wake=wake))
    return stop, task, spool, wake


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=NAME)
@click.option("--config", "config_path", envvar="POSTKEEP_CONFIG", default=None,
              metavar="FILE", help="postkeep.toml (default: $POSTKEEP_CONFIG, "
              "else /etc/postkeep/postkeep.toml).")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Override storage.lmtp_host and lmtp_port.")
@click.option("--metrics", default=None, metavar="HOST:PORT",
              help="Override storage.metrics_listen.")
@click.option("--check-config", is_flag=True,
              help="Load and check the configuration, print a summary and exit.")
def main(config_path: str | None, listen: str | None, metrics: str | None,
         check_config: bool) -> None:
    """Run postkeep-storage: delivery reports (DSNs, bounces) in over LMTP,
    each recipient's outcome recorded in PostgreSQL."""
    try:
        cfg = load(config_path)
        sealing.install_config(cfg.storage)  # sealed content's keys
        overrides: dict[str, Any] = {}
        if listen:
            overrides["lmtp_host"], overrides["lmtp_port"] = split_hostport("--listen", listen)
        if metrics:
            split_hostport("--metrics", metrics)
            overrides["metrics_listen"] = metrics
        if overrides:
            cfg = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, **overrides))
        metrics_host, metrics_port = split_hostport("storage.metrics_listen",
                                                     cfg.storage.metrics_listen)
        if cfg.storage.forward_relay:
            split_hostport("storage.forward_relay", cfg.storage.forward_relay)
        require(cfg, "s3")
    except ConfigError as exc:
        click.echo(f"postkeep-storage: configuration error: {exc}", err=True)
        sys.exit(2)
    s = cfg.storage
    if check_config:
        click.echo(f"configuration OK ({cfg.source}): LMTP {s.lmtp_host}:{s.lmtp_port},"
                   f" metrics {s.metrics_listen}, forward relay {s.forward_relay or '-'}")
        return
    postkeep.logs.setup("postkeep-storage", s.log_level, cfg.log.format)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command lines
    from prometheus_client import start_http_server

    try:
        ensure_port_free("storage.lmtp_port", s.lmtp_host, s.lmtp_port)
        ensure_port_free("storage.metrics_listen", metrics_host, metrics_port)
        try:
            start_http_server(metrics_port, addr=metrics_host)
        except OSError as exc:
            raise ConfigError(bind_error("storage.metrics_listen", s.metrics_listen,
                                         exc)) from exc
        asyncio.run(serve(cfg, config_path))
    except ConfigError as exc:
        fail(NAME, f"start-up refused: {exc}")
    except Exception as exc:
        fail(NAME, f"failed: {type(exc).__name__}: {exc}", 1)
