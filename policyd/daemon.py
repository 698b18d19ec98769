"""postkeep-policyd: the process.

Loads and checks the configuration, opens the PostgreSQL pool (lazily: the
daemon starts and answers in degraded mode even if PostgreSQL is down),
serves /metrics on loopback, listens for Postfix, tells systemd it is ready,
and on SIGTERM stops accepting and lets in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from typing import Any

import click

import postkeep.logs
from postkeep.config import Config, ConfigError, load
from postkeep.policyd.protocol import Limits
from postkeep.policyd.server import PolicyServer
from postkeep.policyd.service import PgBackend, PolicyService
from postkeep.process import notify_systemd, split_hostport

log = logging.getLogger("postkeep.policyd")




async def serve(cfg: Config) -> None:
    """Run until SIGTERM or SIGINT."""
    pcfg = cfg.policyd
    backend = PgBackend(cfg)
    await backend.open()
    service = PolicyService(cfg, backend)
    server = PolicyServer(service.decide, Limits(pcfg.max_line_bytes, pcfg.max_request_bytes,
                                                 pcfg.max_attributes), pcfg.read_timeout_seconds)
    port = await server.start(pcfg.listen_host, pcfg.listen_port)
    upkeep = asyncio.create_task(service.lease_upkeep()) if pcfg.lease_tiers else None
    log.info("postkeep-policyd listening on %s:%d (degraded mode %s, shadow %s, lease tiers"
             " %s, config %s)", pcfg.listen_host, port, pcfg.degraded_mode, pcfg.shadow,
             ",".join(pcfg.lease_tiers) or "none", cfg.source)
    notify_systemd("READY=1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("postkeep-policyd stopping")
    notify_systemd("STOPPING=1")
    await server.stop()
    if upkeep is not None:
        upkeep.cancel()
        await service.give_back(everything=True)
    await backend.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="POSTKEEP_CONFIG", default=None,
              metavar="FILE", help="postkeep.toml (default: $POSTKEEP_CONFIG, "
              "else /etc/postkeep/postkeep.toml).")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Override policyd.listen_host and listen_port.")
@click.option("--metrics", default=None, metavar="HOST:PORT",
              help="Override policyd.metrics_listen.")
@click.option("--check-config", is_flag=True,
              help="Load and check the configuration, print a summary and exit.")
def main(config_path: str | None, listen: str | None, metrics: str | None,
         check_config: bool) -> None:
    """Run postkeep-policyd: tier rate limits for Postfix (check_policy_service)."""
    try:
        cfg = load(config_path)
        overrides: dict[str, Any] = {}
        if listen:
            overrides["listen_host"], overrides["listen_port"] = split_hostport("--listen",
                                                                                 listen)
        if metrics:
            split_hostport("--metrics", metrics)
            overrides["metrics_listen"] = metrics
        if overrides:
            cfg = dataclasses.replace(cfg, policyd=dataclasses.replace(cfg.policyd,
                                                                       **overrides))
        metrics_host, metrics_port = split_hostport("policyd.metrics_listen",
                                                     cfg.policyd.metrics_listen)
    except ConfigError as exc:
        click.echo(f"postkeep-policyd: configuration error: {exc}", err=True)
        sys.exit(2)
    if check_config:
        p = cfg.policyd
        click.echo(f"configuration OK ({cfg.source}): listen {p.listen_host}:{p.listen_port},"
                   f" metrics {p.metrics_listen}, degraded mode {p.degraded_mode}")
        return
    postkeep.logs.setup("postkeep-policyd", cfg.policyd.log_level, cfg.log.format)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    from prometheus_client import start_http_server

    start_http_server(metrics_port, addr=metrics_host)
    asyncio.run(serve(cfg))
