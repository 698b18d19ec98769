"""postkeep.toml loading: defaults, refusals that name the key, secrets.

Golden-style: each refusal is checked against the exact key, the offending
value and what is allowed, because that line is all an operator sees when a
daemon refuses to start.  Secrets must never be echoed back.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postkeep import config
from postkeep.config import ConfigError

pytestmark = pytest.mark.unit

SECRET_ENV = (
    "PGPASSWORD",
    "POSTKEEP_S3_ACCESS_KEY",
    "POSTKEEP_S3_SECRET_KEY",
    "POSTKEEP_DKIM_MASTER_KEY",
    "POSTKEEP_SYSTEM_DKIM_KEY",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stack exports S3 credentials; these tests must not see them."""
    for name in (*SECRET_ENV, "POSTKEEP_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def _refusal(data: dict[str, object]) -> str:
    """The ConfigError text parse() raises for DATA (fails if it accepts it)."""
    with pytest.raises(ConfigError) as info:
        config.parse(data)
    return str(info.value)


def test_empty_file_gives_declared_defaults() -> None:
    cfg = config.parse({})
    assert cfg == config.Config(source="<string>")
    assert (cfg.postgres.port, cfg.postgres.dbname, cfg.postgres.password) == (5432, "postkeep", "")
    assert cfg.milter.unknown_sender == "reject"
    assert cfg.milter.zstd_level == 3
    assert cfg.s3.bucket == "postkeep"
    assert cfg.dkim.master_key == "" and cfg.dkim.system_domains == ()


def test_values_given_override_defaults_and_int_widens_to_float() -> None:
    cfg = config.parse({"postgres": {"port": 6543}, "s3": {"timeout_seconds": 2}})
    assert cfg.postgres.port == 6543
    assert cfg.s3.timeout_seconds == 2.0 and isinstance(cfg.s3.timeout_seconds, float)


def test_unknown_key_is_named_with_allowed_keys() -> None:
    text = _refusal({"postgres": {"prot": 5432}})
    assert text.startswith("postgres.prot: unknown key; allowed keys: ")
    assert "port" in text and "dbname" in text


def test_unknown_section_is_named_with_allowed_sections() -> None:
    assert _refusal({"postgress": {}}) == (
        "[postgress]: unknown section; allowed: dkim, log, milter, policyd, postfix, postgres,"
        " retention, return_path, s3, storage, tags, webhooks"
    )


def test_section_that_is_not_a_table() -> None:
    assert _refusal({"s3": "minio"}) == "[s3]: expected a table, got str"


def test_wrong_type_names_key_value_and_allowed() -> None:
    assert _refusal({"postgres": {"port": "5432"}}) == (
        "postgres.port = '5432': expected a int >= 1 and <= 65535"
    )


def test_bool_is_not_an_int() -> None:
    assert _refusal({"milter": {"zstd_level": True}}).startswith("milter.zstd_level = True:")


def test_choice_outside_the_list() -> None:
    assert _refusal({"milter": {"unknown_sender": "drop"}}) == (
        "milter.unknown_sender = 'drop': expected one of 'reject', 'pass'"
    )


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ("milter", "zstd_level", 23, "a int >= 1 and <= 22"),
        ("milter", "zstd_level", 0, "a int >= 1 and <= 22"),
        ("postgres", "port", 0, "a int >= 1 and <= 65535"),
        ("postgres", "statement_timeout_ms", 0, "a int > 0"),
        ("s3", "timeout_seconds", -1.5, "a float > 0"),
        ("s3", "bucket", "pk", "a str at least 3 characters"),
    ],
)
def test_bounds(section: str, key: str, value: object, allowed: str) -> None:
    assert _refusal({section: {key: value}}) == (
        f"{section}.{key} = {value!r}: expected {allowed}"
    )


def test_bounds_accept_the_limits() -> None:
    cfg = config.parse({"milter": {"zstd_level": 22}, "postgres": {"port": 65535}})
    assert (cfg.milter.zstd_level, cfg.postgres.port) == (22, 65535)


def test_pool_min_above_pool_max_is_refused() -> None:
    assert _refusal({"postgres": {"pool_min": 5, "pool_max": 2}}) == (
        "postgres.pool_min = 5: expected <= postgres.pool_max (2)"
    )


def _secret_file(tmp_path: Path, mode: int, value: str = "s3cr3t-Value") -> Path:
    """A file holding VALUE with permission bits MODE."""
    path = tmp_path / "secret"
    path.write_text(value + "\n")
    os.chmod(path, mode)
    return path


def test_secret_file_private_is_read_and_stripped(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, 0o600)
    cfg = config.parse({"s3": {"secret_key_file": str(path)}})
    assert cfg.s3.secret_key == "s3cr3t-Value"


def test_secret_file_readable_by_others_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, 0o644)
    text = _refusal({"postgres": {"password_file": str(path)}})
    assert text.startswith(f"postgres.password_file = {str(path)!r}:")
    assert "mode 644" in text and "0600" in text
    assert "s3cr3t-Value" not in text


def test_missing_secret_file_names_the_key(tmp_path: Path) -> None:
    text = _refusal({"s3": {"secret_key_file": str(tmp_path / "absent")}})
    assert text.startswith("s3.secret_key_file = ") and "cannot read the file" in text


def test_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "from-env-pg")
    monkeypatch.setenv("POSTKEEP_S3_ACCESS_KEY", "AKIAENV")
    monkeypatch.setenv("POSTKEEP_S3_SECRET_KEY", "from-env-s3")
    cfg = config.parse({})
    assert cfg.postgres.password == "from-env-pg"
    assert (cfg.s3.access_key, cfg.s3.secret_key) == ("AKIAENV", "from-env-s3")


def test_file_value_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTKEEP_S3_SECRET_KEY", "from-env")
    assert config.parse({"s3": {"secret_key": "from-file"}}).s3.secret_key == "from-file"


def test_secret_value_never_appears_in_refusals() -> None:
    text = _refusal({"s3": {"secret_key": 98765432}})
    assert text == "s3.secret_key = <secret>: expected a str"
    assert "98765432" not in text
    text = _refusal({"postgres": {"password": ["hunter2-pw"]}})
    assert "hunter2-pw" not in text and text.startswith("postgres.password = <secret>")


def test_conninfo_carries_the_timeouts() -> None:
    cfg = config.parse({"postgres": {"host": "db.internal", "statement_timeout_ms": 750}})
    info = cfg.postgres.conninfo()
    assert "host=db.internal" in info and "statement_timeout=750" in info
    assert "jit=off" in info  # JIT over hundreds of partitions: seconds per query


def test_load_reads_the_named_file(tmp_path: Path) -> None:
    path = tmp_path / "postkeep.toml"
    path.write_text('[milter]\nunknown_sender = "pass"\n')
    cfg = config.load(str(path))
    assert (cfg.milter.unknown_sender, cfg.source) == ("pass", str(path))


def test_load_uses_postkeep_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.toml"
    path.write_text("[postgres]\nport = 7000\n")
    monkeypatch.setenv("POSTKEEP_CONFIG", str(path))
    assert config.load().postgres.port == 7000


def test_load_missing_and_invalid_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        config.load(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[postgres\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid TOML"):
        config.load(str(bad))


def test_list_of_strings_is_read_as_a_tuple() -> None:
    cfg = config.parse(
        {"dkim": {"system_domains": ["platform.example", "mail.platform.example"],
                  "system_selector": "sys1", "system_key": "PEM"}}
    )
    assert cfg.dkim.system_domains == ("platform.example", "mail.platform.example")


@pytest.mark.parametrize("value", ["platform.example", ["ok.example", 3]])
def test_list_of_strings_refuses_anything_else(value: object) -> None:
    assert _refusal({"dkim": {"system_domains": value}}) == (
        f"dkim.system_domains = {value!r}: expected a list of strings"
    )


def test_system_domains_need_a_selector_and_a_key() -> None:
    text = _refusal({"dkim": {"system_domains": ["platform.example"]}})
    assert text.startswith("dkim.system_domains = ['platform.example']: system mail needs")
    assert "dkim.system_selector" in text and "POSTKEEP_SYSTEM_DKIM_KEY" in text


def test_dkim_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTKEEP_DKIM_MASTER_KEY", "bWFzdGVy")
    monkeypatch.setenv("POSTKEEP_SYSTEM_DKIM_KEY", "-----BEGIN PRIVATE KEY-----")
    cfg = config.parse({})
    assert cfg.dkim.master_key == "bWFzdGVy"
    assert cfg.dkim.system_key == "-----BEGIN PRIVATE KEY-----"


def test_dkim_master_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, 0o644, "bWFzdGVyLWtleS1tYXRlcmlhbA==")
    text = _refusal({"dkim": {"master_key_file": str(path)}})
    assert text.startswith(f"dkim.master_key_file = {str(path)!r}:")
    assert "mode 644" in text and "bWFzdGVy" not in text
    path.chmod(0o400)
    assert config.parse({"dkim": {"master_key_file": str(path)}}).dkim.master_key == (
        "bWFzdGVyLWtleS1tYXRlcmlhbA=="
    )


def test_no_secret_shows_in_the_configs_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Config printed or logged whole (a traceback's locals, a debug line) names no
    secret: every field marked secret is left out of repr."""
    import base64
    import dataclasses

    defaults = config.Config()
    marked = {f"{section.name}.{f.name}"
              for section in dataclasses.fields(defaults)
              if dataclasses.is_dataclass(value := getattr(defaults, section.name))
              for f in dataclasses.fields(value) if f.metadata.get("secret")}
    assert {"postgres.password", "s3.secret_key", "dkim.master_key", "dkim.system_key",
            "return_path.key", "storage.master_key"} <= marked
    values = {"PGPASSWORD": "pg-secret-1", "POSTKEEP_S3_SECRET_KEY": "s3-secret-2",
              "POSTKEEP_DKIM_MASTER_KEY": base64.b64encode(b"d" * 32).decode(),
              "POSTKEEP_RETURN_PATH_KEY": "r" * 40,
              "POSTKEEP_STORAGE_MASTER_KEY": base64.b64encode(b"m" * 32).decode()}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    cfg = config.parse({})
    assert cfg.postgres.password == "pg-secret-1" and cfg.s3.secret_key == "s3-secret-2"
    shown = repr(cfg)
    for value in values.values():
        assert value not in shown
