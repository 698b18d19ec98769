"""postkeep-policyd: the process.

Loads and checks the configuration, opens the PostgreSQL pool (lazily: the
daemon starts and answers in degraded mode even if PostgreSQL is down),
serves /metrics on loopback, listens for Postfix, tells systemd it is ready
(READY=1 once it listens), pings systemd's watchdog from its event loop, and
on SIGTERM stops accepting and lets in-flight requests finish.  SIGHUP (the
unit's ExecReload) re-reads the configuration file for policyd.log_level and
forgets the organisations and limits cached (policyd.directory_cache_seconds).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import sys
from collections.abc import MutableMapping
from typing import Any

import click

import postkeep.logs
from postkeep import __version__
from postkeep.config import Config, ConfigError, load
from postkeep.policyd.protocol import Limits
from postkeep.policyd.server import PolicyServer
from postkeep.policyd.service import PgBackend, PolicyService
from postkeep.process import (
    bind_error,
    ensure_port_free,
    fail,
    notify_systemd,
    reload_log_level,
    split_hostport,
    supervise,
)
from postkeep.ttlcache import TtlCache

log = logging.getLogger("postkeep.policyd")
NAME = "postkeep-policyd"

# sd_listen_fds(3): systemd passes sockets from fd 3 on.
LISTEN_FDS_START = 3


def inherited_socket(environ: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The listening socket systemd's socket activation passed us, else None.

    As sd_listen_fds(3): only if LISTEN_PID names this process (the variables
    may have been inherited by a child that was not meant to have them); the
    variables are then removed so nothing this process starts inherits them.
    policyd listens on one socket: LISTEN_FDS other than 1, or fd 3 not a
    listening stream socket, is a configuration error.  While systemd holds the
    socket, Postfix's connections wait in its backlog across a restart of
    policyd instead of being refused (README, "When policyd is down").
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()) or "LISTEN_FDS" not in env:
        return None
    count = env.pop("LISTEN_FDS")
    env.pop("LISTEN_PID", None)
    env.pop("LISTEN_FDNAMES", None)
    if count != "1":
        raise ConfigError(f"LISTEN_FDS={count!r}: postkeep-policyd takes exactly one socket"
                          " (one ListenStream= in postkeep-policyd.socket)")
    try:
        sock = socket.socket(fileno=LISTEN_FDS_START)
    except OSError as exc:
        raise ConfigError(f"LISTEN_FDS=1 but fd {LISTEN_FDS_START} is not a socket: {exc}"
                          ) from exc
    os.set_inheritable(LISTEN_FDS_START, False)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET,
                                                               socket.SO_ACCEPTCONN):
        sock.detach()
        raise ConfigError(f"fd {LISTEN_FDS_START} passed by LISTEN_FDS is not a listening"
                          " stream socket")
    return sock


async def serve(cfg: Config, sock: socket.socket | None = None,
                config_path: str | None = None) -> None:
    """Run until SIGTERM or SIGINT."""
    pcfg = cfg.policyd
    backend = PgBackend(cfg)
    await backend.open()
    service = PolicyService(cfg, backend, suppressions=backend)
    server = PolicyServer(service.decide, Limits(pcfg.max_line_bytes, pcfg.max_request_bytes,
                                                 pcfg.max_attributes), pcfg.read_timeout_seconds)
    try:
        port = await server.start(pcfg.listen_host, pcfg.listen_port, sock)
    except OSError as exc:
        await backend.close()
        raise ConfigError(bind_error("policyd.listen_port",
                                     f"{pcfg.listen_host}:{pcfg.listen_port}", exc)) from exc
    host = pcfg.listen_host if sock is None else sock.getsockname()[0]
    upkeep = asyncio.create_task(service.lease_upkeep()) if pcfg.lease_tiers else None
    log.info("postkeep-policyd listening on %s:%d%s (degraded mode %s, shadow %s, lease tiers"
             " %s, config %s)", host, port, " (inherited socket)" if sock else "",
             pcfg.degraded_mode, pcfg.shadow, ",".join(pcfg.lease_tiers) or "none", cfg.source)
    stop = asyncio.Event()

    def reload() -> None:
        reload_log_level(config_path, "policyd", log)
        service._cache = TtlCache()  # the next decisions ask PostgreSQL afresh

    watchdog = supervise(stop, reload)
    notify_systemd("READY=1")
    await stop.wait()
    log.info("postkeep-policyd stopping")
    notify_systemd("STOPPING=1")
    if watchdog is not None:
        watchdog.cancel()
    await server.stop()
    if upkeep is not None:
        upkeep.cancel()
        await service.give_back(everything=True)
    await backend.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=NAME)
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
        sock = inherited_socket()
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

    try:
        if sock is None:  # an inherited socket is the port, held open by systemd
            ensure_port_free("policyd.listen_port", cfg.policyd.listen_host,
                             cfg.policyd.listen_port)
        ensure_port_free("policyd.metrics_listen", metrics_host, metrics_port)
        try:
            start_http_server(metrics_port, addr=metrics_host)
        except OSError as exc:
            raise ConfigError(bind_error("policyd.metrics_listen", cfg.policyd.metrics_listen,
                                         exc)) from exc
        asyncio.run(serve(cfg, sock, config_path))
    except ConfigError as exc:
        fail(NAME, f"start-up refused: {exc}")
    except Exception as exc:
        fail(NAME, f"failed: {type(exc).__name__}: {exc}", 1)
