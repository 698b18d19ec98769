"""`postkeep`: the operator's command line.

Each area registers its own click group here; the commands live next to the
code they drive (the Postfix bundle in postkeep.postfix_bundle, database and
message commands in postkeep.admin).
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
    from postkeep import (
        admin,
        dict_cli,
        dkim_cli,
        limits_cli,
        postfix_bundle,
        reports_cli,
        retention_cli,
        spool_cli,
    )

    for group in (*admin.COMMANDS, *dkim_cli.COMMANDS, *limits_cli.COMMANDS,
                  *reports_cli.COMMANDS, *retention_cli.COMMANDS, *dict_cli.COMMANDS,
                  *spool_cli.COMMANDS,
                  postfix_bundle.postfix):
        cli.add_command(group)


def main() -> None:
    """Entry point: configuration errors are one line naming the key, exit 2."""
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
    if isinstance(status, int) and status != 0:
        sys.exit(status)
