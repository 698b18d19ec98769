"""The storage probe's decisions (storage/content/probe.py) over a dict-backed
server that can be made to lack or break each capability, and erasure's
reading of a delete Object Lock refused."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from postkeep.config import ConfigError, S3Config
from postkeep.storage.content import probe
from postkeep.storage.content.objects import S3ObjectStore
from postkeep.storage.content.probe import (
    FAILED,
    MISSING,
    OK,
    Check,
    ProbeError,
    ProbeReport,
    refusal,
    run_probe,
)
from postkeep.storage.lifecycle import conformance
from postkeep.storage.lifecycle.erasure import split_locked

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


class FakeServer:
    """A ProbeStore in memory; each flag removes or breaks one capability."""

    def __init__(self, *, lifecycle: list[str] | None = None, ignores_range: bool = False,
                 multipart: bool = True, locked_bucket: bool = False,
                 enforces_lock: bool = True, down: bool = False) -> None:
        self.objects: dict[str, bytes] = {}
        self.lifecycle = lifecycle
        self.ignores_range = ignores_range
        self.multipart = multipart
        self.locked_bucket = locked_bucket
        self.enforces_lock = enforces_lock
        self.down = down
        self.retained: dict[str, datetime] = {}

    def _up(self) -> None:
        if self.down:
            raise ProbeError(None, "connection refused")

    def put(self, key: str, data: bytes) -> None:
        self._up()
        self.objects[key] = data

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self._up()
        body = self.objects[key]
        if self.ignores_range or (offset == 0 and length is None):
            return body
        return body[offset:offset + (length or len(body))]

    def put_multipart(self, key: str, parts: list[bytes]) -> None:
        if not self.multipart:
            raise ProbeError("NotImplemented", "multipart upload: NotImplemented")
        self.objects[key] = b"".join(parts)

    def list_keys(self, prefix: str) -> list[str]:
        return [k for k in self.objects if k.startswith(prefix)]

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def lifecycle_rule_ids(self) -> list[str] | None:
        return self.lifecycle

    def object_lock_enabled(self) -> bool:
        return self.locked_bucket

    def put_retained(self, key: str, data: bytes, until: datetime) -> str:
        self.objects[key] = data
        self.retained[key] = until
        return "v1"

    def delete_version(self, key: str, version_id: str, bypass_governance: bool) -> str | None:
        if key in self.retained and self.enforces_lock and not bypass_governance:
            return "AccessDenied"
        self.objects.pop(key, None)
        return None


def _run(server: FakeServer, object_lock: str = "off", wanted: list[str] | None = None
         ) -> probe.ProbeReport:
    return run_probe(server, "s3.test:9000", "postkeep", object_lock, wanted, lambda: NOW)


def _status(report: probe.ProbeReport) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def test_a_full_server_is_ok_everywhere_and_the_probe_leaves_nothing_behind() -> None:
    server = FakeServer(lifecycle=["postkeep-content-1d", "theirs"], locked_bucket=True)
    report = _run(server, "compliance", ["postkeep-content-1d"])
    assert _status(report) == {"put_get": OK, "ranged_get": OK, "multipart": OK,
                               "listing": OK, "lifecycle": OK, "object_lock": OK}
    assert refusal(report) is None
    assert report.get("lifecycle").detail == "all 1 postkeep rules installed"  # type: ignore[union-attr]
    assert server.objects == {}


def test_no_lifecycle_is_missing_with_the_sweeper_named_and_no_refusal() -> None:
    report = _run(FakeServer(lifecycle=None))
    assert _status(report)["lifecycle"] == MISSING
    assert "sweeper" in report.line()
    assert refusal(report) is None
    assert not report.has("lifecycle")


def test_lifecycle_accepted_without_postkeeps_rules_says_so() -> None:
    report = _run(FakeServer(lifecycle=[]), wanted=["postkeep-content-1d", "postkeep-content-2d"])
    check = report.get("lifecycle")
    assert check is not None and check.status == OK
    assert "0 of 2 postkeep rules installed" in check.detail


def test_a_server_ignoring_range_fails_ranged_get_naming_it() -> None:
    report = _run(FakeServer(lifecycle=[], ignores_range=True))
    check = report.get("ranged_get")
    assert check is not None and check.status == FAILED
    assert "ignored the Range header" in check.detail
    # Packed messages are restored by ranged GET: the daemons refuse, naming it.
    why = refusal(report)
    assert why is not None and "ranged_get" in why


def test_multipart_not_implemented_is_missing_and_listing_still_checked() -> None:
    report = _run(FakeServer(lifecycle=[], multipart=False))
    assert _status(report)["multipart"] == MISSING
    assert _status(report)["listing"] == OK


def test_object_lock_is_checked_only_when_configured() -> None:
    assert "object_lock" not in _status(_run(FakeServer(lifecycle=[])))


def test_compliance_on_a_bucket_without_lock_refuses_naming_it() -> None:
    report = _run(FakeServer(lifecycle=[]), "compliance")
    assert _status(report)["object_lock"] == MISSING
    why = refusal(report)
    assert why is not None and "object_lock missing" in why
    assert "bucket has no Object Lock configuration" in why


def test_a_lock_the_server_does_not_enforce_is_failed_and_refused() -> None:
    report = _run(FakeServer(lifecycle=[], locked_bucket=True, enforces_lock=False),
                  "compliance")
    assert _status(report)["object_lock"] == FAILED
    why = refusal(report)
    assert why is not None and "not enforced" in why


def test_an_unreachable_server_is_reported_failed_but_not_refused() -> None:
    report = _run(FakeServer(down=True), "compliance")
    assert set(_status(report).values()) == {FAILED}
    assert all(not c.answered for c in report.checks)
    assert refusal(report) is None  # an outage: the daemons tempfail, they do not refuse


def test_status_of_error_tells_not_implemented_from_failures() -> None:
    assert probe.status_of_error("NotImplemented") == MISSING
    assert probe.status_of_error("MethodNotAllowed") == MISSING
    assert probe.status_of_error("AccessDenied") == FAILED
    assert probe.status_of_error(None) == FAILED


def test_check_at_start_refuses_with_config_error_naming_the_key(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    locked = _run(FakeServer(lifecycle=[]), "compliance")
    monkeypatch.setattr(conformance, "probe", lambda _store: locked)
    store = S3ObjectStore(S3Config(access_key="k", secret_key="s" * 8, object_lock="compliance"))
    pauses: list[float] = []
    with pytest.raises(ConfigError, match=r"object_lock missing.*\(s3\.object_lock\)"):
        conformance.check_at_start(store, logging.getLogger("t"), sleep=pauses.append)
    assert pauses == [conformance.START_PAUSE] * (conformance.START_ATTEMPTS - 1)
    fine = _run(FakeServer(lifecycle=None))
    monkeypatch.setattr(conformance, "probe", lambda _store: fine)
    with caplog.at_level(logging.INFO):
        assert conformance.check_at_start(store, logging.getLogger("t")) is fine
    assert "lifecycle=missing" in caplog.text


def test_check_at_start_probes_a_refusal_again_before_stopping_the_daemon(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A distributed MinIO answers a read just after the write with NoSuchKey
    # while a returning node is not yet seen by its peers: the next probe passes.
    passing = _run(FakeServer())
    flaky = ProbeReport(passing.endpoint, passing.bucket,
                        (Check("put_get", FAILED, "get: NoSuchKey", True, True),
                         *passing.checks[1:]))
    assert refusal(flaky) is not None and refusal(passing) is None
    reports = iter([flaky, passing])
    monkeypatch.setattr(conformance, "probe", lambda _store: next(reports))
    store = S3ObjectStore(S3Config(access_key="k", secret_key="s" * 8))
    pauses: list[float] = []
    with caplog.at_level(logging.INFO):
        assert conformance.check_at_start(store, logging.getLogger("t"),
                                          sleep=pauses.append) is passing
    assert pauses == [conformance.START_PAUSE]
    assert "put_get=failed" in caplog.text and "probing again in 2s (attempt 1 of 3)" \
        in caplog.text


def test_erasure_tells_a_locked_object_from_a_failed_delete() -> None:
    until = NOW + timedelta(days=30)
    locked, failed = split_locked(["a", "b", "c"], {"a": until, "b": NOW - timedelta(days=1),
                                                   "c": None}, NOW)
    assert locked == ["a"]
    assert failed == ["b", "c"]


def test_a_locking_store_keeps_its_objects_out_of_snowball_batches() -> None:
    plain = S3ObjectStore(S3Config(access_key="k", secret_key="s" * 8))
    locking = S3ObjectStore(S3Config(access_key="k", secret_key="s" * 8,
                                     object_lock="compliance"))
    assert not plain.locks_objects
    assert locking.locks_objects and locking.can_batch() is False


def test_versioned_buckets_get_a_noncurrent_rule_and_locked_ones_no_class_rules() -> None:
    from postkeep.storage.lifecycle.rules import NONCURRENT_RULE, planned_rules

    plain = planned_rules()
    assert all(not r.noncurrent for r in plain) and len(plain) == 15
    versioned = planned_rules(versioned=True)
    assert versioned[:-1] == plain
    assert (versioned[-1].rule_id, versioned[-1].prefix, versioned[-1].noncurrent) == (
        NONCURRENT_RULE, "messages/", True)
    assert [r.rule_id for r in planned_rules(object_lock=True)] == [NONCURRENT_RULE]
