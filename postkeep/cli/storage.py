"""`postkeep storage probe`: what the configured S3 server does for postkeep.

An adapter over storage/lifecycle/conformance.py (the probe itself is
storage/content/probe.py).  Needs only [s3], no database.
"""

from __future__ import annotations

import json

import click

from postkeep import config as config_mod
from postkeep.cli.common import EXIT_FAILED
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.content.probe import refusal
from postkeep.storage.lifecycle.conformance import probe


@click.group("storage")
def storage() -> None:
    """Object storage: what the S3 server supports (probe), the content layout
    (repack, compact: see README, Packs)."""


@storage.command("probe")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def storage_probe(ctx: click.Context, as_json: bool) -> None:
    """Exercise put/get, ranged GET, multipart, listing, lifecycle rules and
    (with s3.object_lock) Object Lock enforcement on the configured bucket.

    Each capability is ok, missing (the server does not implement it) or
    failed, with the reason.  Exit 1 if the daemons would refuse to start on
    this server (a capability postkeep needs is not ok), 0 otherwise.
    Writes and deletes a few small objects under postkeep-probe/.
    """
    obj = ctx.find_root().obj or {}
    cfg = config_mod.load(obj.get("config_path"))
    config_mod.require(cfg, "s3")
    report = probe(S3ObjectStore(cfg.s3))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo(f"S3 {report.endpoint}, bucket {report.bucket}")
        for c in report.checks:
            status = c.status + (" (required)" if c.required else "")
            click.echo(f"  {c.name:<12} {status:<18} {c.detail}".rstrip())
    why = refusal(report)
    if why is not None:
        if not as_json:
            click.echo(f"postkeep: {why}", err=True)
        ctx.exit(EXIT_FAILED)


COMMANDS: list[click.Group] = [storage]
