"""Sealed content without services: the master key's configuration errors,
the sealed entry format, the key chain (storage/content/sealing.py).

What needs the database (keys in message_keys, erasure, restore) is
tests/test_sealing_stack.py's.
"""

from __future__ import annotations

import base64
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from postkeep import config as config_mod
from postkeep.storage.content import packs, sealing

pytestmark = pytest.mark.unit

KEY = base64.b64encode(bytes(range(32))).decode()


def _config(tmp_path: Path, key_path: Path) -> str:
    path = tmp_path / "postkeep.toml"
    path.write_text(f'[storage]\nmaster_key_file = "{key_path}"\n')
    path.chmod(0o600)
    return str(path)


def _key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "content-master.key"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def test_the_master_key_file_is_read_and_never_shown(tmp_path: Path) -> None:
    cfg = config_mod.load(_config(tmp_path, _key_file(tmp_path, KEY)))
    assert cfg.storage.master_key_bytes() == bytes(range(32))
    ring = sealing.Keyring(bytes(range(32)))
    assert KEY not in repr(cfg.storage) and "\\x00\\x01" not in repr(ring)


@pytest.mark.parametrize("case,expect", [
    ("missing", "storage.master_key_file = .*cannot read the file"),
    ("directory", "storage.master_key_file = .*cannot read the file"),
    ("world-readable", "storage.master_key_file = .*readable by other users.*0600"),
    ("short", "storage.master_key_file = .*decodes to 16 bytes; expected base64 of 32"),
    ("not-base64", "storage.master_key_file = .*not valid base64"),
])
def test_a_bad_master_key_file_is_a_config_error_naming_the_key(
        tmp_path: Path, case: str, expect: str) -> None:
    if case == "missing":
        key_path = tmp_path / "absent.key"
    elif case == "directory":
        key_path = tmp_path / "a-directory"
        key_path.mkdir()
    elif case == "world-readable":
        key_path = _key_file(tmp_path, KEY, 0o644)
    elif case == "short":
        key_path = _key_file(tmp_path, base64.b64encode(os.urandom(16)).decode())
    else:
        key_path = _key_file(tmp_path, "not base64 at all!")
    with pytest.raises(config_mod.ConfigError, match=expect) as info:
        config_mod.load(_config(tmp_path, key_path))
    assert KEY not in str(info.value)


def test_no_master_key_means_no_sealing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The process's keyring comes back after the test (stack tests in the same run use it).
    monkeypatch.setattr(sealing, "_ring", sealing.keyring())
    assert config_mod.parse({}).storage.master_key_bytes() is None
    assert sealing.install(None) is None
    assert packs.seal_entry(None, b"z") == (packs.FORMAT_PLAIN, b"z")
    with pytest.raises(sealing.SealError, match=r"storage\.master_key_file"):
        sealing.required()


def test_a_sealed_entry_hides_its_bytes_and_binds_its_expiry() -> None:
    org, mid = uuid.uuid4(), uuid.uuid4()
    expires = datetime(2027, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
    plain = b"confidential " * 50
    key = sealing.DataKey(mid, org, expires, os.urandom(32), b"")
    fmt, entry = packs.seal_entry(key, plain)
    assert fmt == packs.FORMAT_SEALED and sealing.is_sealed(entry)
    assert len(entry) == len(plain) + sealing.OVERHEAD
    assert b"confidential" not in entry
    # The header names the key's partition to the microsecond (PostgreSQL's precision).
    micros = int.from_bytes(entry[5:13], "big")
    assert sealing._expiry(micros) == expires
    assert sealing._expiry(sealing._micros(expires + timedelta(microseconds=1))) != expires
    # Two seals of the same bytes differ (fresh nonce).
    assert packs.seal_entry(key, plain)[1] != entry


def test_data_keys_are_fresh_and_wrapped_under_their_organisation() -> None:
    ring = sealing.Keyring(os.urandom(32))
    org, mid = uuid.uuid4(), uuid.uuid4()
    ring._orgs[org] = os.urandom(32)  # as if read from org_keys
    at = datetime.now(UTC)
    a, b = ring.new_data_keys([(mid, org, at), (mid, org, at)])
    assert a.key != b.key and a.wrapped != b.wrapped and len(a.wrapped) == 12 + 32 + 16
    assert a.key not in a.wrapped
    with pytest.raises(sealing.SealError, match="not read first"):
        ring.new_data_keys([(mid, uuid.uuid4(), at)])


class OrgKeysConn:
    """org_keys as a dict: what Keyring.org_key reads and writes."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, tuple[bytes, str]] = {}

    def execute(self, sql: str, params: tuple[object, ...]) -> object:
        if sql.startswith("INSERT INTO org_keys"):
            org, wrapped, mid = params
            self.rows.setdefault(org, (wrapped, mid))  # type: ignore[index, arg-type]
            return None
        row = self.rows.get(params[0])  # type: ignore[arg-type]
        return type("R", (), {"fetchone": lambda _self: row})()


def test_during_a_rotation_org_keys_still_under_the_previous_key_open_new_ones_use_the_new(
        tmp_path: Path) -> None:
    old, new, other = os.urandom(32), os.urandom(32), os.urandom(32)
    conn = OrgKeysConn()
    before, after = uuid.uuid4(), uuid.uuid4()
    made = sealing.Keyring(old).org_key(conn, before, create=True)  # type: ignore[arg-type]
    # storage.master_key_file = new, storage.previous_master_key_file = old
    both = sealing.Keyring(new, previous=old)
    assert both.org_key(conn, before, create=False) == made  # type: ignore[arg-type]
    made_after = both.org_key(conn, after, create=True)  # type: ignore[arg-type]
    assert conn.rows[after][1] == sealing.master_id(new)  # wrapped by the new key only
    assert sealing.Keyring(new).org_key(conn, after, create=False) == made_after  # type: ignore[arg-type]
    with pytest.raises(sealing.SealError, match="does not open with the configured"):
        sealing.Keyring(old).org_key(conn, after, create=False)  # type: ignore[arg-type]
    # Neither key opens it: the error names both ids, never a key.
    with pytest.raises(sealing.SealError, match=f"nor storage.previous_master_key"
                       f" \\(id {sealing.master_id(other)}\\)") as info:
        sealing.Keyring(new, previous=other).org_key(conn, before,  # type: ignore[arg-type]
                                                     create=False)
    assert base64.b64encode(old).decode() not in str(info.value)


def test_the_previous_master_key_file_is_read_checked_and_needs_a_current_key(
        tmp_path: Path) -> None:
    key_path = _key_file(tmp_path, KEY)
    prev = tmp_path / "previous.key"
    prev.write_text(base64.b64encode(bytes(32)).decode() + "\n")
    prev.chmod(0o600)
    path = tmp_path / "postkeep.toml"
    path.write_text(f'[storage]\nmaster_key_file = "{key_path}"\n'
                    f'previous_master_key_file = "{prev}"\n')
    path.chmod(0o600)
    cfg = config_mod.load(str(path))
    assert cfg.storage.previous_master_key_bytes() == bytes(32)
    assert "previous_master_key='" not in repr(cfg.storage)
    prev.chmod(0o644)
    with pytest.raises(config_mod.ConfigError,
                       match=r"storage\.previous_master_key_file = .*readable by other users"):
        config_mod.load(str(path))
    prev.chmod(0o600)
    path.write_text(f'[storage]\nprevious_master_key_file = "{prev}"\n')
    with pytest.raises(config_mod.ConfigError,
                       match=r"previous_master_key_file is set but storage\.master_key_file"):
        config_mod.load(str(path))
