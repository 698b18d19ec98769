"""`postkeep spool`: the outage spool's depth, and draining it.

A click adapter over `postkeep.storage.spool`.  The spool directory is
`[milter] outage_spool_directory`; the drain needs the same `[postgres]` and
`[s3]` the milter uses.  postkeep-storage (the sidecar) drains the spool every
`storage.spool_drain_interval_seconds`; `drain` is for an operator (or a host
without the sidecar), `drain --follow` runs the sidecar's loop alone.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from types import FrameType

import click

import postkeep.logs
from postkeep import config as config_mod
from postkeep.cli.common import EXIT_UNAVAILABLE, confirm, destructive, fail
from postkeep.storage.content import sealing
from postkeep.storage.content.spool import DrainResult, Spool, SpoolBusy, SpoolStatus


def format_status(st: SpoolStatus, cfg: config_mod.MilterConfig) -> str:
    """`spool status` as lines of text (pure)."""
    mode = "on" if cfg.outage_spool else "off (backend outages tempfail)"
    oldest = ("-" if st.oldest is None else
              f"{st.oldest:%Y-%m-%d %H:%M:%S} UTC ({st.oldest_age_seconds:.0f} s ago)")
    return "\n".join([
        f"outage spool {st.directory}: {mode}",
        f"  entries      {st.entries} ({st.bytes} bytes)",
        f"  oldest       {oldest}",
        f"  quarantined  {st.quarantined} (in {st.directory}/quarantine)",
        f"  filesystem   {st.fill_percent:.1f}% used, milter spools up to "
        f"{cfg.outage_spool_max_fill_percent:g}%",
    ])


def _progress_line(r: DrainResult) -> str:
    return (f"drained {r.drained}, quarantined {r.quarantined}, rejected {r.rejected}, "
            f"left {r.remaining} ({r.rate:.0f} messages/s over {r.seconds:.1f} s)")


def _config(ctx: click.Context) -> config_mod.Config:
    obj = ctx.find_root().obj or {}
    cfg = config_mod.load(obj.get("config_path"))
    sealing.install_config(cfg.storage)  # sealed content's keys
    return cfg


@click.group("spool")
def spool_group() -> None:
    """The outage spool: messages accepted while S3 or PostgreSQL was down."""


@spool_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Entries waiting, their bytes, the oldest one, quarantined files, disk use."""
    cfg = _config(ctx)
    st = Spool(cfg.milter.outage_spool_directory).status()
    if as_json:
        click.echo(json.dumps({
            "directory": st.directory, "enabled": cfg.milter.outage_spool,
            "entries": st.entries, "bytes": st.bytes,
            "oldest": st.oldest.isoformat() if st.oldest else None,
            "oldest_age_seconds": round(st.oldest_age_seconds, 3),
            "quarantined": st.quarantined, "fill_percent": round(st.fill_percent, 2),
            "max_fill_percent": cfg.milter.outage_spool_max_fill_percent,
        }))
    else:
        click.echo(format_status(st, cfg.milter))


@spool_group.command("drain")
@click.option("--follow", is_flag=True,
              help="Keep draining every --interval seconds until SIGTERM/SIGINT.")
@click.option("--interval", type=click.FloatRange(min=0.05), default=None, metavar="SECONDS",
              help="With --follow: seconds between passes (default: "
              "storage.spool_drain_interval_seconds).")
@click.option("--batch", type=click.IntRange(1, 1000), default=256, show_default=True,
              help="Entries per batch (one INSERT per batch).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Drain at most this many entries (oldest first), then stop.")
@click.option("--metrics-listen", default=None, metavar="HOST:PORT",
              help="Serve Prometheus /metrics (spool depth, oldest age, drained total).")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, metavar="SECONDS",
              help="If another drain (e.g. the sidecar's) is running, wait this long for it.")
@click.option("-v", "--verbose", is_flag=True, help="Log every drained message (id, queue id).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@destructive
@click.pass_context
def drain_cmd(ctx: click.Context, follow: bool, interval: float | None, batch: int,
              limit: int | None, metrics_listen: str | None, wait: float,
              verbose: bool, as_json: bool, yes: bool, dry_run: bool) -> None:
    """Store spooled messages (oldest first) and remove them from the spool.

    Safe to interrupt or kill at any point and to run again: each entry's
    object is put, then its rows are inserted (ON CONFLICT DO NOTHING), then
    it is removed.  Damaged entries are moved to quarantine/ and named in
    the log.  Exit 3 if a backend is still down (entries stay).
    """
    cfg = _config(ctx)
    try:
        st = Spool(cfg.milter.outage_spool_directory).status()
    except OSError as exc:
        fail(f"spool {cfg.milter.outage_spool_directory}: {exc.strerror or exc}")
    what = (f"store {min(st.entries, limit) if limit else st.entries} spooled entries"
            f" ({st.bytes} bytes in {st.directory}) and remove each from the spool once stored")
    if dry_run:
        if as_json:
            click.echo(json.dumps({"dry_run": True, "entries": st.entries, "bytes": st.bytes,
                                   "would_drain": min(st.entries, limit) if limit
                                   else st.entries}))
        else:
            click.echo(f"would {what}" + (" (and keep following)" if follow else ""))
        return
    confirm(what + (", then keep draining until stopped" if follow else ""), yes)
    postkeep.logs.setup("postkeep-spool", "info" if verbose or follow else "warning",
                        cfg.log.format)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    from postkeep.storage.content.objects import S3ObjectStore
    from postkeep.storage.content.spool import (
        SpoolCollector,
        drain,
        drain_forever,
        log_pass,
        packing_for,
        record_with,
    )
    from postkeep.storage.metadata.db import Database
    from postkeep.storage.reports.inbound import link_each

    spool = Spool(cfg.milter.outage_spool_directory)
    if metrics_listen:
        from prometheus_client import REGISTRY, start_http_server

        from postkeep.process import split_hostport

        host, port = split_hostport("--metrics-listen", metrics_listen)
        REGISTRY.register(SpoolCollector(spool))
        start_http_server(port, addr=host)
    db = Database(cfg.postgres, min_size=1)
    objects = S3ObjectStore(cfg.s3)

    record = record_with(db, link_each)
    last = [0.0]

    def progress(r: DrainResult) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            click.echo(_progress_line(r), err=as_json)

    try:
        if follow:
            stop = threading.Event()

            def on_signal(signum: int, frame: FrameType | None) -> None:
                stop.set()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            every = interval or cfg.storage.spool_drain_interval_seconds
            logging.getLogger("postkeep.spool").info(
                "spool drain following %s every %gs", spool.dir, every)
            drain_forever(spool, objects, record, interval=every, stop=stop,
                          batch_size=batch, on_pass=log_pass, packing=packing_for(cfg, db))
            return
        with spool.drain_lock(wait=wait):
            spool.remove_stale_tmp()
            result = drain(spool, objects, record, batch_size=batch, limit=limit,
                           progress=progress, packing=packing_for(cfg, db))
    except SpoolBusy as exc:
        fail(str(exc))
    finally:
        db.close()
    if as_json:
        click.echo(json.dumps({
            "dry_run": False, "drained": result.drained, "quarantined": result.quarantined,
            "rejected": result.rejected, "remaining": result.remaining,
            "seconds": round(result.seconds, 3),
            "stopped": None if result.stopped is None else str(result.stopped)}))
    else:
        click.echo(_progress_line(result))
    if result.stopped is not None:
        # A pass stops only for a backend outage: always "unavailable".
        fail(f"drain stopped: {result.stopped.backend} unavailable ({result.stopped.reason});"
             f" {result.remaining} entries wait", EXIT_UNAVAILABLE)


COMMANDS = (spool_group,)
