"""`postkeep`: the operator's command line.

One module per command group, each a thin click adapter over postkeep.storage
(or, for `postfix`, over Postfix's own postconf): `db`, `directory` (org,
domain, submitter), `messages`, `dkim`, `limits`, `reports`, `retention`
(retention, erase, hold), `dictionaries` (dict), `spool`, `tenants` (tenant),
`suppression`, `storage` (probe, repack, compact), `stats`, `webhooks` (webhook),
`postfix`.  What they share (a session, one-line failures, time and domain
parsing) is `common`.
The CLI stands on storage and the ground floor; it never imports a daemon.
"""

from __future__ import annotations

import sys

import click

from postkeep import __version__
from postkeep.config import ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="postkeep")
@click.option(
    "--config",
    "config_path",
    envvar="POSTKEEP_CONFIG",
    default=None,
    metavar="FILE",
    help="postkeep.toml to use (default: $POSTKEEP_CONFIG, else /etc/postkeep/postkeep.toml).",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Operate postkeep: database, organisations, captured messages, Postfix bundle."""
    ctx.obj = {"config_path": config_path}


def _register() -> None:
    from postkeep.cli import (
        db,
        dictionaries,
        directory,
        dkim,
        limits,
        master_key,
        messages,
        packs,
        postfix,
        reports,
        retention,
        spool,
        stats,
        storage,
        suppression,
        tenants,
        webhooks,
    )

    for module in (db, directory, messages, dkim, limits, reports, retention, dictionaries,
                   spool, tenants, suppression, storage, stats, packs, webhooks, master_key):
        for group in module.COMMANDS:
            cli.add_command(group)
    cli.add_command(postfix.postfix)


def main() -> None:
    """Entry point: configuration errors are one line naming the key, exit 2;
    a backend failure no command caught is one line too, exit 3 if unreachable
    (the statuses are postkeep.cli.common's)."""
    from postkeep.cli.common import BACKEND_ERRORS, backend_message

    _register()
    try:
        # Outside standalone mode click returns (not raises) the status of an
        # explicit Exit, e.g. a command's one-line refusal: pass it on.
        status = cli.main(standalone_mode=False)
    except ConfigError as exc:
        click.echo(f"postkeep: configuration error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BACKEND_ERRORS as exc:
        line, code = backend_message(exc)
        click.echo(f"postkeep: {line}", err=True)
        sys.exit(code)
    if isinstance(status, int) and status != 0:
        sys.exit(status)
