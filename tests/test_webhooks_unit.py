"""Webhook signatures, the README's verification example, retry delays and secret sealing."""

from __future__ import annotations

import random
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from postkeep import webhooks as signing
from postkeep.storage.metadata import webhooks as store
from postkeep.storage.metadata.dkim_keys import MasterKey

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[1] / "README.md"
BODY = b'{"id":"e1","type":"delivered","message_id":"m1"}'


def _readme_verify() -> Any:
    """The `verify` of README's Webhooks section, run as documented."""
    text = README.read_text()
    section = text[text.index("## Webhooks (delivery events)"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "README's Webhooks section has no Python example"
    assert len(code.group(1).strip().splitlines()) <= 12
    ns: dict[str, Any] = {}
    exec(compile(code.group(1), "README.md", "exec"), ns)
    return ns["verify"]


def test_signature_verifies_and_tampering_fails() -> None:
    secret = signing.new_secret()
    header = signing.signature_header([secret], 1_700_000_000, BODY)
    assert re.fullmatch(r"t=1700000000,v1=[0-9a-f]{64}", header)
    assert signing.verify(secret, header, BODY, now=1_700_000_010)
    assert not signing.verify(secret, header, BODY.replace(b"e1", b"e2"), now=1_700_000_010)
    assert not signing.verify(signing.new_secret(), header, BODY, now=1_700_000_010)
    assert not signing.verify(secret, header, BODY, now=1_700_000_000 + 301)  # replay
    forged = header.replace("t=1700000000", "t=1700000001")
    assert not signing.verify(secret, forged, BODY, now=1_700_000_010)


def test_readme_example_agrees_with_the_signer() -> None:
    verify = _readme_verify()
    secret = signing.new_secret()
    header = signing.signature_header([secret], int(time.time()), BODY)
    assert verify(secret, header, BODY)
    assert not verify(secret, header, BODY + b" ")
    assert not verify(secret, header, BODY.replace(b"delivered", b"bounced"))


def test_rotation_overlap_signs_with_both_secrets() -> None:
    old, new = signing.new_secret(), signing.new_secret()
    header = signing.signature_header([new, old], 1_700_000_000, BODY)
    assert header.count("v1=") == 2
    live = signing.signature_header([new, old], int(time.time()), BODY)
    for s in (old, new):
        assert signing.verify(s, header, BODY, now=1_700_000_000)
        assert _readme_verify()(s, live, BODY)


def test_retry_delay_doubles_with_jitter_and_cap() -> None:
    rnd = random.Random(7)
    for attempts, base in ((1, 5), (2, 10), (3, 20), (20, 3600)):
        for _ in range(50):
            d = signing.retry_delay(attempts, 5, 3600, rnd)
            assert base / 2 <= d <= base
    # 24 h of retries is a bounded number of attempts (not a hot loop, not forever)
    total, n = 0.0, 0
    while total < 86400:
        n += 1
        total += signing.retry_delay(n, 5, 3600, rnd)
    assert 20 < n < 60


def test_event_type_filter_names_an_unknown_type() -> None:
    assert store.check_event_types(["delivered,bounced", "bounced"]) == ("delivered", "bounced")
    assert store.check_event_types([]) is None
    with pytest.raises(ValueError, match=r"--events 'bounce': unknown event type"):
        store.check_event_types(["delivered,bounce"])


def test_sealed_secret_opens_only_for_its_endpoint_and_key() -> None:
    master = MasterKey.from_bytes(bytes(range(32)))
    eid = uuid.uuid4()
    sealed, nonce = store.seal(master, eid, "whsec_x")
    assert b"whsec_x" not in sealed
    assert store.unseal(master, eid, sealed, nonce, master.key_id) == "whsec_x"
    with pytest.raises(store.WebhookError, match="does not open"):
        store.unseal(master, uuid.uuid4(), sealed, nonce, master.key_id)
    other = MasterKey.from_bytes(bytes(32))
    with pytest.raises(store.WebhookError, match="master key id"):
        store.unseal(other, eid, sealed, nonce, master.key_id)


def test_post_result_labels() -> None:
    assert signing.PostResult(204, None, 0).result == "ok"
    assert signing.PostResult(503, None, 0).result == "http_5xx"
    assert signing.PostResult(None, "ReadTimeoutError: Read timed out.", 0).result == "timeout"
    assert signing.PostResult(None, "NewConnectionError: refused", 0).result == "connection"


def test_an_event_wakes_only_its_organisations_endpoints() -> None:
    import asyncio

    from postkeep.storage.sidecar.webhooks import Worker

    async def run() -> None:
        w = Worker.__new__(Worker)  # no database: only the wake-up routing
        w.changed = asyncio.Event()
        org_a, org_b = uuid.uuid4(), uuid.uuid4()
        wakes = {name: asyncio.Event() for name in ("a1", "a2", "b")}
        w.tasks = {uuid.uuid4(): (None, wakes["a1"], org_a),  # type: ignore[dict-item]
                   uuid.uuid4(): (None, wakes["a2"], org_a),
                   uuid.uuid4(): (None, wakes["b"], org_b)}
        w._wake(f"{org_a}:42")
        assert {n for n, e in wakes.items() if e.is_set()} == {"a1", "a2"}
        assert not w.changed.is_set()
        for e in wakes.values():
            e.clear()
        w._wake("garbage")  # unparsable: everyone looks, no harm done
        assert all(e.is_set() for e in wakes.values()) and not w.changed.is_set()
        for e in wakes.values():
            e.clear()
        w._wake(None)  # endpoints changed / reconnected: all, and the endpoint list
        assert all(e.is_set() for e in wakes.values()) and w.changed.is_set()

    asyncio.run(run())
