"""`postkeep storage rotate-master-key`: sealed content under a new master key.

A click adapter over storage/content/rotation.py.  The new key file is
checked as storage.master_key_file is at load (mode 0600 or 0400, base64 of
32 bytes) before anything is read from the database.
"""

from __future__ import annotations

import click

from postkeep import config as config_mod
from postkeep.cli.common import EXIT_USAGE, fail, json_flag, say, session
from postkeep.cli.storage import storage
from postkeep.storage.content import rotation, sealing


def next_steps(new_key_file: str, old_key_file: str, previous_configured: bool = False
               ) -> list[str]:
    """What the operator does after a rotation, in order (README "Rotating the
    content master key"); PREVIOUS_CONFIGURED: the configuration already names
    the new key and, as storage.previous_master_key_file, the old one."""
    if previous_configured:
        return [
            "remove storage.previous_master_key_file from postkeep.toml on every host and"
            " restart postkeep-milter and postkeep-storage (every organisation key is under"
            f" {new_key_file} now)",
            f"then destroy the old key file {old_key_file} (and its copies)",
        ]
    return [
        f"point storage.master_key_file at {new_key_file} in postkeep.toml on every host"
        " (milter, postkeep-storage, the postkeep command)",
        "restart postkeep-milter and postkeep-storage now: until then they keep working"
        " with the organisation keys they have already read (in memory), but cannot open"
        " one they had not read yet",
        f"once every host runs with the new file, run this command again with --new-key-file"
        f" {new_key_file} --old-key-file {old_key_file}: it rewraps the keys of organisations"
        " a daemon still on the old key made meanwhile (the rest is skipped)",
        "then destroy the old key file (and its copies): content sealed before is read"
        " through the rewrapped organisation keys",
    ]


@storage.command("rotate-master-key")
@click.option("--new-key-file", required=True, metavar="PATH",
              help="The new master key: base64 of 32 random bytes"
                   " (head -c32 /dev/urandom | base64), mode 0600 or 0400.")
@click.option("--old-key-file", metavar="PATH",
              help="Also rewrap what this (previous) master key wraps: for a run after"
                   " storage.master_key_file already names the new key.")
@json_flag
@click.pass_context
def rotate_master_key(ctx: click.Context, new_key_file: str, old_key_file: str | None) -> None:
    """Rewrap every organisation's content key from the configured master key
    (storage.master_key_file) to the one in --new-key-file, in one transaction.

    Data keys and stored content are untouched (organisation keys wrap them).
    Idempotent and resumable: keys already under the new key are skipped.
    Running daemons keep the organisation keys they have read (in memory)
    and go on working until restarted.
    Prints what to do next: point storage.master_key_file at the new file,
    restart the daemons, then destroy the old file.
    """
    try:
        new = config_mod.read_master_key_file(new_key_file, "--new-key-file")
        also: tuple[bytes, ...] = (
            (config_mod.read_master_key_file(old_key_file, "--old-key-file"),)
            if old_key_file else ())
    except config_mod.ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    with session(ctx) as s:
        old = s.cfg.storage.master_key_bytes()
        if old is None:
            fail("storage.master_key_file is not set: there is no master key to rotate from"
                 " (nothing is sealed without one)", EXIT_USAGE)
        previous = s.cfg.storage.previous_master_key_bytes()
        if previous is not None:  # the configuration already names both (README)
            also += (previous,)
        try:
            done = rotation.rotate(s.conn, old, new, also)
        except sealing.SealError as exc:
            fail(f"nothing changed: {exc}")
        old_file = (old_key_file or s.cfg.storage.previous_master_key_file
                    or s.cfg.storage.master_key_file or "OLD-KEY-FILE")
    steps = next_steps(new_key_file, old_file,
                       previous_configured=previous is not None and old == new)
    text = (f"{done.rewrapped} organisation key(s) rewrapped from master key"
            f" {done.old_master_id} to {done.new_master_id}, {done.already} already under"
            f" it ({done.org_keys} in all). Next:\n"
            + "\n".join(f"  {i}. {step}" for i, step in enumerate(steps, 1)))
    say(text, **done.as_dict(), next_steps=steps)


# The command joins `postkeep storage` (postkeep/cli/storage.py), registered there.
COMMANDS: list[click.Group] = []
