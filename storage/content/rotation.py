"""Master-key rotation: every organisation's content key rewrapped.

The master key ([storage] master_key_file) wraps only the org_keys rows
(storage/content/sealing.py); data keys are wrapped by organisation keys, so
they and the sealed bytes stay as they are.  `rotate` rewraps every row from
the configured master key to a new one in one transaction, recording the new
key's id (`master_id`, a hash prefix, never the key) per row.  Rows the new
key already opens are skipped, so a rotation cut short, or run again after
a daemon still holding the old key made a new organisation's key, finishes
the job; so does a run after the configuration already names the new key,
given the old one (`--old-key-file`).  The table is locked against new rows for that transaction (a
capture making a new organisation's key waits for it, milliseconds).

Running daemons keep the organisation keys they have read in memory and go
on working; one restarted before its configuration names the new file cannot
open a key it had not read yet.  `postkeep storage rotate-master-key` prints
the steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from postkeep.storage.content import sealing
from postkeep.storage.metadata.audit import audit


@dataclass(frozen=True)
class Rotation:
    """What one rotation did."""

    old_master_id: str  # the configured key's (or --old-key-file's, if that is the new one)
    new_master_id: str
    org_keys: int  # rows seen
    rewrapped: int  # now under the new key
    already: int  # the new key opened them already (an earlier run)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rotate(conn: psycopg.Connection, old: bytes, new: bytes,
           also: tuple[bytes, ...] = ()) -> Rotation:
    """Rewrap every org_keys row from master key OLD (or one of ALSO: older
    keys still in use somewhere) to NEW (see the module docstring).
    SealError (nothing changed) if a row opens with none of them."""
    new_id = sealing.Keyring(new).master_id
    # OLD may be NEW already (the configuration switched first): then only
    # ALSO rewraps, and a run without it checks every row opens with NEW.
    olds = [k for k in (old, *also) if k != new]
    rewrapped: list[tuple[Any, bytes]] = []
    relabel: list[Any] = []
    old_id = sealing.Keyring(olds[0]).master_id if olds else new_id
    with conn.transaction():
        # SHARE ROW EXCLUSIVE: no new row (Keyring.org_key's INSERT) until commit.
        conn.execute("LOCK TABLE org_keys IN SHARE ROW EXCLUSIVE MODE")
        rows = conn.execute("SELECT org_id, wrapped, master_id FROM org_keys"
                            " ORDER BY org_id").fetchall()
        for org_id, wrapped, master_id in rows:
            again = sealing.rewrap_org_key(org_id, bytes(wrapped), master_id, olds, new)
            if again is not None:
                rewrapped.append((org_id, again))
            elif master_id != new_id:
                relabel.append(org_id)
        if rewrapped:
            conn.execute(
                "UPDATE org_keys k SET wrapped = u.wrapped, master_id = %s"
                " FROM unnest(%s::uuid[], %s::bytea[]) AS u(org_id, wrapped)"
                " WHERE k.org_id = u.org_id",
                (new_id, [r[0] for r in rewrapped], [r[1] for r in rewrapped]))
        if relabel:
            conn.execute("UPDATE org_keys SET master_id = %s WHERE org_id = ANY(%s)",
                         (new_id, relabel))
        audit(conn, None, "master_key_rotated", len(rewrapped), None, None,
              {"from": old_id, "to": new_id, "org_keys": len(rows)})
    return Rotation(old_id, new_id, len(rows), len(rewrapped), len(rows) - len(rewrapped))
