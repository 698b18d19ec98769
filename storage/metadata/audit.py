"""The `retention_audit` table: one row per destructive or protective action.

Retention runs, erasure, legal holds and lifecycle rule changes all record
what they did here (the run's id, the action, how many, the organisation,
never an address in the clear).
"""

from __future__ import annotations

import uuid

import psycopg
from psycopg.types.json import Jsonb


def audit(conn: psycopg.Connection, run_id: uuid.UUID | None, action: str, count: int,
          org_id: uuid.UUID | None = None, target: str | None = None,
          detail: dict[str, object] | None = None) -> None:
    """One retention_audit row: what was done, to what, how many, when (now)."""
    conn.execute(
        "INSERT INTO retention_audit (run_id, action, org_id, target, count, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (run_id, action, org_id, target, count, Jsonb(detail or {})),
    )
