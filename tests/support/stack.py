"""Access to the running test stack (.stack-test/env, sourced by `make test`).

A stack test must never skip: if the stack's variables are missing the test
fails and says how to run it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from postkeep.config import Config, load
from postkeep.storage.content import sealing
from postkeep.storage.content.objects import S3ObjectStore, read_all
from postkeep.storage.content.packs import Location
from postkeep.storage.content.sealed_objects import is_sealed_object, open_object
from postkeep.storage.metadata import directory, dkim_keys

# What `make test` exports from .stack-test/env and every stack test needs.
REQUIRED = (
    "POSTKEEP_CONFIG", "PGHOST", "PGPORT", "PGDATABASE", "PGUSER",
    "POSTKEEP_S3_ENDPOINT", "POSTKEEP_S3_BUCKET", "POSTKEEP_S3_ACCESS_KEY",
    "POSTKEEP_S3_SECRET_KEY", "POSTKEEP_SMTP_HOST", "POSTKEEP_SMTP_PORT", "POSTKEEP_SINK_DIR",
)


def require_env() -> dict[str, str]:
    missing = [k for k in REQUIRED if not os.environ.get(k)]
    if missing:
        raise RuntimeError(
            f"stack test without a stack: {', '.join(missing)} unset; run `make test` "
            "(it starts Postfix, PostgreSQL and MinIO and exports .stack-test/env)"
        )
    return dict(os.environ)


@dataclass
class Stack:
    env: dict[str, str]
    config: Config

    @property
    def smtp(self) -> tuple[str, int]:
        return self.env["POSTKEEP_SMTP_HOST"], int(self.env["POSTKEEP_SMTP_PORT"])

    @property
    def sink_dir(self) -> Path:
        return Path(self.env["POSTKEEP_SINK_DIR"])

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.config.postgres.conninfo(), autocommit=True)

    def sent(self, queue_id: str | None) -> tuple[uuid.UUID, str]:
        """(message id, return path) of the message Postfix queued as QUEUE_ID."""
        assert queue_id, "no queue id: the message was not accepted"
        with self.connect() as conn:
            row = conn.execute("SELECT id, return_path FROM messages WHERE queue_id = %s",
                               (queue_id,)).fetchone()
        assert row is not None, f"no messages row for queue id {queue_id}"
        return uuid.UUID(str(row[0])), str(row[1])

    def objects(self) -> S3ObjectStore:
        return S3ObjectStore(self.config.s3)

    def new_org(self, tier: str = "free", *, dkim: bool = True,
                missing_key: str = "tempfail") -> tuple[uuid.UUID, str]:
        """A fresh organisation owning a fresh domain; returns (id, domain).

        With DKIM (the default) the domain gets an RSA key, selector s1,
        active now, so its mail through the stack is signed.
        """
        tag = uuid.uuid4().hex[:12]
        domain = f"o{tag}.example"
        with self.connect() as conn:
            oid = directory.add_organisation(conn, f"test-{tag}", tier)
            directory.add_domain(conn, oid, domain)
            dkim_keys.set_missing_key_policy(conn, oid, missing_key)
            if dkim:
                dkim_keys.create_key(conn, self.master_key(), domain, "s1", "rsa-sha256",
                                     active_from=datetime.now(UTC))
        return oid, domain

    def master_key(self) -> dkim_keys.MasterKey:
        return dkim_keys.load_master_key(self.config.dkim)

    def public_keys(self) -> dict[bytes, bytes]:
        """Every published DKIM TXT record, by DNS name (for verifier stubs)."""
        with self.connect() as conn:
            keys = dkim_keys.list_keys(conn)
        return {dkim_keys.dns_name(k.domain, k.selector).encode() + b".": k.txt_value.encode()
                for k in keys}

    def sink_copy(self, token: str, timeout: float = 60.0) -> bytes:
        """The bytes the sink received for the message carrying TOKEN."""
        needle = b"X-Test-Token: " + token.encode() + b"\r\n"
        deadline = time.monotonic() + timeout
        seen: set[Path] = set()
        while time.monotonic() < deadline:
            for path in sorted(self.sink_dir.glob("*.eml")):
                if path in seen:
                    continue
                data = path.read_bytes()
                if needle in data:
                    return data
                seen.add(path)
            time.sleep(0.2)
        raise AssertionError(f"sink never received the message with token {token}")

    def _entry(self, key: str) -> tuple[Location, uuid.UUID] | None:
        """KEY's one message if KEY is a pack (storage/content/packs.py): tests
        name a message by its row's object_key; a pack of several is ambiguous."""
        from postkeep.storage.content.packs import is_pack_key

        if not is_pack_key(key):
            return None
        with self.connect() as conn:
            rows = conn.execute("SELECT pack_offset, length, format, message_id"
                                " FROM message_packs WHERE pack_key = %s", (key,)).fetchall()
        assert len(rows) == 1, f"pack {key} holds {len(rows)} messages: name one by id"
        return Location(key, rows[0][0], rows[0][1], rows[0][2]), rows[0][3]

    def stored(self, key: str) -> bytes:
        """The object at KEY as stored (compressed; maybe a container); for a
        pack of one message, that message's entry, opened if it is sealed
        (storage/content/sealing.py: the compressed object inside); a sealed
        single object opened likewise (storage/content/sealed_objects.py)."""
        from postkeep.storage.content.packs import open_entry

        found = self._entry(key)
        if found is not None:
            where, mid = found
            chunks = self.objects().get_range(key, where.offset, where.length)
            with self.connect() as conn:
                return b"".join(open_entry(where.format, key, chunks, conn, mid))
        data = read_all(self.objects(), key)
        if is_sealed_object(data):  # a sealed single object: the compressed object inside
            name = uuid.UUID(key.rsplit("/", 1)[-1].split(".", 1)[0])
            with sealing.using(self.config.storage.master_key_bytes()), self.connect() as conn:
                return b"".join(open_object(conn, name, iter([data]), key))
        return data

    def raw_entry(self, key: str) -> bytes:
        """The bytes of KEY's one message's entry exactly as in S3 (sealed or not)."""
        found = self._entry(key)
        assert found is not None, f"{key} is not a pack"
        where = found[0]
        return b"".join(self.objects().get_range(key, where.offset, where.length))

    def restored(self, key: str, message_id: uuid.UUID | None = None) -> bytes:
        """The message bytes of the object at KEY, parts and dictionary included
        (MESSAGE_ID: that message of the pack KEY)."""
        from postkeep.storage.content.restore import restore_message, restore_object

        if message_id is None and (found := self._entry(key)) is not None:
            message_id = found[1]
        # This stack's content key (the pgha and cluster tests run stacks of
        # their own beside the test stack, each with its own key).
        with sealing.using(self.config.storage.master_key_bytes()):
            if message_id is not None:
                with self.connect() as conn:
                    return b"".join(restore_message(conn, self.objects(), message_id, key))
            # Sealed parts and dictionaries: their keys; a sealed own object:
            # its message's, the id read from its key.
            with self.connect() as conn:
                return b"".join(restore_object(conn, self.objects(), key))

    def stack_ctl(self, action: str, service: str) -> None:
        """Stop or start one real service of the stack (devstack/stack.sh)."""
        script = Path(__file__).resolve().parents[2] / "devstack" / "stack.sh"
        subprocess.run(["bash", str(script), action, self.env["POSTKEEP_STACK_DIR"], service],
                       check=True, timeout=120)


def load_stack() -> Stack:
    env = require_env()
    cfg = load(env["POSTKEEP_CONFIG"])
    sealing.install_config(cfg.storage)  # sealed content's keys
    return Stack(env, cfg)


def strip_received(message: bytes) -> bytes:
    """The message without its first header field if that is Postfix's Received:."""
    m = re.match(rb"Received:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", message)
    assert m, "the delivered copy does not start with Postfix's Received: header"
    return message[m.end():]
