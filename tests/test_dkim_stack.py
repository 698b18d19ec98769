"""DKIM through real Postfix: what the sink receives verifies, what is stored is it.

Every corpus message is signed by postkeep-milter with its domain's key from
PostgreSQL; the copy the sink received verifies with dkimpy (DNS answered from
the stored keys) and with OpenDKIM's own verifier, and fails both once a body
byte changes.  The stored object is the signed message.  Refusals, untrusted
clients, system mail with both backends down and key rotation without a
restart are checked here too.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from support import corpus, smtp
from support.stack import Stack, strip_received

from postkeep import signing_keys
from postkeep.milter import dkim as pkdkim
from postkeep.storage.metadata import dkim_keys

# Markers per test: one test here stops PostgreSQL and MinIO (outage), the rest
# only use the stack.


@pytest.fixture(scope="module")
def org(stack: Stack) -> tuple[uuid.UUID, str]:
    return stack.new_org("pro")


def _dns(stack: Stack, extra: dict[bytes, bytes] | None = None):  # type: ignore[no-untyped-def]
    records = stack.public_keys()
    records.update(extra or {})

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return lookup


def _opendkim(stack: Stack, tmp: Path, message: bytes,
              extra: dict[bytes, bytes] | None = None) -> str:
    exe = shutil.which("opendkim") or "/usr/sbin/opendkim"
    records = stack.public_keys()
    records.update(extra or {})
    (tmp / "keys").write_text("".join(f"{n.decode().rstrip('.')} {v.decode()}\n"
                                      for n, v in records.items()))
    (tmp / "opendkim.conf").write_text(
        f"Mode v\nTestPublicKeys {tmp / 'keys'}\nSyslog no\nLogResults yes\n")
    (tmp / "msg.eml").write_bytes(message)
    r = subprocess.run([exe, "-x", str(tmp / "opendkim.conf"), "-t", str(tmp / "msg.eml")],
                       capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def _tamper(message: bytes) -> bytes:
    at = message.index(b"\r\n\r\n") + 4
    if at < len(message):
        flipped = b"Y" if message[at:at + 1] != b"Y" else b"Z"
        return message[:at] + flipped + message[at + 1:]
    return message + b"tampered\r\n"


def _row(stack: Stack, queue_id: str) -> tuple[str, bytes]:
    with stack.connect() as conn:
        row = conn.execute("SELECT object_key, sha256 FROM messages WHERE queue_id = %s",
                           (queue_id,)).fetchone()
    assert row is not None, f"no row for queue id {queue_id}"
    return row[0], bytes(row[1])


CASES = [c.name for c in corpus.build("s@x.example", "t")]


@pytest.mark.stack
@pytest.mark.parametrize("case_name", CASES)
def test_corpus_signed_verifies_with_dkimpy_and_opendkim(
        stack: Stack, org: tuple[uuid.UUID, str], case_name: str, tmp_path: Path) -> None:
    _, domain = org
    token = uuid.uuid4().hex
    sender = f"sender@{domain}"
    case = next(c for c in corpus.build(sender, token) if c.name == case_name)
    reply = smtp.send(*stack.smtp, sender, list(case.rcpts), case.data)
    delivered = stack.sink_copy(f"{token}-{case_name}")
    dns = _dns(stack)

    assert delivered.count(b"\nDKIM-Signature:") == 1
    assert dkimpy.verify(delivered, dnsfunc=dns), f"dkimpy rejects {case_name}"
    verdict = _opendkim(stack, tmp_path, delivered)
    assert "succeeded" in verdict and f"d={domain}" in verdict, verdict

    tampered = _tamper(delivered)
    assert not dkimpy.verify(tampered, dnsfunc=dns)
    assert "succeeded" not in _opendkim(stack, tmp_path, tampered)

    key, _sha = _row(stack, reply.queue_id or "")
    stored = stack.restored(key)
    assert stored == strip_received(delivered)  # the stored object is the signed message
    assert stored.startswith(b"DKIM-Signature:")
    headers, body = pkdkim.split_message(stored)
    bh = re.search(rb"bh=([^;]+);", re.sub(rb"\r\n[ \t]+", b"", headers))
    assert bh and base64.b64decode(bh.group(1)) == pkdkim.body_hash(body)


@pytest.mark.stack
def test_two_from_headers_refused_and_a_missing_one_is_added_by_postfix(
        stack: Stack, org: tuple[uuid.UUID, str]) -> None:
    _, domain = org
    sender = f"r@{domain}"
    two_froms = (f"From: a@{domain}\r\nFrom: b@{domain}\r\nSubject: two\r\n\r\nx\r\n").encode()
    with pytest.raises(smtp.SMTPError) as err:
        smtp.send(*stack.smtp, sender, ["r@sink.test"], two_froms)
    assert err.value.reply.code == 550 and err.value.reply.enhanced == "5.6.0"
    assert "2 From: headers" in err.value.reply.text
    # Without From:, Postfix's cleanup adds one (from the envelope sender)
    # before the milter sees the headers: the message is signed over it.
    token = uuid.uuid4().hex
    smtp.send(*stack.smtp, sender, ["r@sink.test"],
              f"Subject: none\r\nX-Test-Token: {token}\r\n\r\nx\r\n".encode())
    delivered = stack.sink_copy(token)
    assert delivered.count(b"\nFrom: ") == 1
    assert dkimpy.verify(delivered, dnsfunc=_dns(stack))


@pytest.mark.stack
def test_missing_key_tempfails_or_sends_unsigned_by_org_setting(stack: Stack) -> None:
    _, strict = stack.new_org("free", dkim=False, missing_key="tempfail")
    with pytest.raises(smtp.SMTPError) as err:
        smtp.send(*stack.smtp, f"a@{strict}", ["r@sink.test"],
                  f"From: a@{strict}\r\n\r\nx\r\n".encode())
    assert err.value.reply.code == 451 and err.value.reply.enhanced == "4.7.5"
    assert strict in err.value.reply.text

    _, lax = stack.new_org("free", dkim=False, missing_key="unsigned")
    token = uuid.uuid4().hex
    reply = smtp.send(*stack.smtp, f"a@{lax}", ["r@sink.test"],
                      f"From: a@{lax}\r\nX-Test-Token: {token}\r\n\r\nx\r\n".encode())
    delivered = stack.sink_copy(token)
    assert b"DKIM-Signature" not in delivered
    _row(stack, reply.queue_id or "")  # captured all the same


@pytest.mark.stack
def test_untrusted_client_is_captured_but_never_signed(
        stack: Stack, org: tuple[uuid.UUID, str]) -> None:
    _, domain = org
    token = uuid.uuid4().hex
    client = smtp.Client(*stack.smtp)
    try:
        client.xclient("203.0.113.9")
        reply = client.send(f"spoof@{domain}", ["r@sink.test"],
                            f"From: spoof@{domain}\r\nX-Test-Token: {token}\r\n\r\nx\r\n".encode())
    finally:
        client.close()
    delivered = stack.sink_copy(token)
    assert b"DKIM-Signature" not in delivered
    _row(stack, reply.queue_id or "")


@pytest.mark.stack
def test_from_domain_of_another_org_is_not_signed_with_its_key(stack: Stack) -> None:
    _, mine = stack.new_org("free", missing_key="unsigned")
    _, theirs = stack.new_org("free")
    token = uuid.uuid4().hex
    smtp.send(*stack.smtp, f"a@{mine}", ["r@sink.test"],
              f"From: ceo@{theirs}\r\nX-Test-Token: {token}\r\n\r\nx\r\n".encode())
    assert f"d={theirs}".encode() not in stack.sink_copy(token)


def _system_dns(stack: Stack) -> dict[bytes, bytes]:
    pem = Path(stack.config.dkim.system_key_file).read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    value = dkim_keys.dns_txt_value(signing_keys.algorithm_of(key),  # type: ignore[arg-type]
                                    dkim_keys.public_key_bytes(key))  # type: ignore[arg-type]
    domain = stack.config.dkim.system_domains[0]
    return {f"{stack.config.dkim.system_selector}._domainkey.{domain}.".encode(): value.encode()}


@pytest.mark.outage
def test_system_mail_signed_not_stored_and_flows_with_backends_down(
        stack: Stack, tmp_path: Path) -> None:
    domain = stack.config.dkim.system_domains[0]
    sender = f"no-reply@{domain}"
    stack.stack_ctl("stop", "postgres")
    stack.stack_ctl("stop", "minio")
    try:
        tokens = []
        for _ in range(3):
            token = uuid.uuid4().hex
            smtp.send(*stack.smtp, sender, ["user@sink.test"],
                      (f"From: Platform <{sender}>\r\nSubject: your code\r\n"
                       f"X-Test-Token: {token}\r\n\r\n123456\r\n").encode())
            tokens.append(token)
        delivered = [stack.sink_copy(t) for t in tokens]
    finally:
        stack.stack_ctl("start", "minio")
        stack.stack_ctl("start", "postgres")
    extra = _system_dns(stack)
    for message in delivered:
        assert dkimpy.verify(message, dnsfunc=_dns(stack, extra))
        assert "succeeded" in _opendkim(stack, tmp_path, message, extra)
        assert b"X-Postkeep-Id" not in message  # never tracked
    with stack.connect() as conn:
        assert conn.execute("SELECT count(*) FROM messages WHERE envelope_from = %s",
                            (sender,)).fetchone() == (0,)


@pytest.mark.stack
def test_rotation_without_restart(stack: Stack, tmp_path: Path) -> None:
    _, domain = stack.new_org("free")
    pid = int(Path(stack.env["POSTKEEP_STACK_DIR"], "milter", "milter.pid").read_text())

    def send() -> bytes:
        token = uuid.uuid4().hex
        smtp.send(*stack.smtp, f"a@{domain}", ["r@sink.test"],
                  f"From: a@{domain}\r\nSubject: rot\r\nX-Test-Token: {token}\r\n\r\nx\r\n"
                  .encode())
        return stack.sink_copy(token)

    before = send()
    assert b"s=s1;" in before
    with stack.connect() as conn:  # stage s2, then activate it with a grace period
        dkim_keys.create_key(conn, stack.master_key(), domain, "s2", "rsa-sha256")
        dkim_keys.activate(conn, domain, "s2", datetime.now(UTC), timedelta(days=7))
    deadline = time.monotonic() + 60  # keys reload every 5 s (dkim_reload_seconds)
    after = send()
    while b"s=s2;" not in after and time.monotonic() < deadline:
        time.sleep(1)
        after = send()
    assert b"s=s2;" in after, "the new selector was never used"
    assert int(Path(stack.env["POSTKEEP_STACK_DIR"], "milter", "milter.pid").read_text()) == pid
    os.kill(pid, 0)
    # During the grace period both records stay published and both verify.
    dns = _dns(stack)
    assert dkimpy.verify(before, dnsfunc=dns) and dkimpy.verify(after, dnsfunc=dns)
    out = subprocess.run([Path(stack.env["POSTKEEP_STACK_VENV"], "bin", "postkeep"),
                          "dkim", "dns", domain], capture_output=True, text=True, check=True,
                         env={**os.environ}).stdout
    assert "s1._domainkey" in out and "s2._domainkey" in out


@pytest.mark.stack
def test_dual_signed_rsa_and_ed25519_both_verify(stack: Stack, tmp_path: Path) -> None:
    # Both keys in one transaction: the milter's background reload never sees
    # the RSA key alone (it would sign once until its next reload).
    _, domain = stack.new_org("pro", dkim=False)
    with stack.connect() as conn, conn.transaction():
        now = datetime.now(UTC)
        dkim_keys.create_key(conn, stack.master_key(), domain, "s1", "rsa-sha256",
                             active_from=now)
        dkim_keys.create_key(conn, stack.master_key(), domain, "ed1", "ed25519-sha256",
                             active_from=now)
    token = uuid.uuid4().hex
    smtp.send(*stack.smtp, f"a@{domain}", ["r@sink.test"],
              f"From: a@{domain}\r\nSubject: dual\r\nX-Test-Token: {token}\r\n\r\nbody\r\n"
              .encode())
    delivered = stack.sink_copy(token)
    assert delivered.count(b"\nDKIM-Signature:") == 2
    assert b"a=rsa-sha256" in delivered and b"a=ed25519-sha256" in delivered
    dns = _dns(stack)
    # dkimpy verifies one signature per call, by index; both must hold.
    assert dkimpy.DKIM(delivered).verify(idx=0, dnsfunc=dns)
    assert dkimpy.DKIM(delivered).verify(idx=1, dnsfunc=dns)
    # OpenDKIM reports one signature when given two; each on its own is
    # tests/test_dkim_opendkim.py's.  Here: it finds nothing wrong.
    verdict = _opendkim(stack, tmp_path, delivered)
    assert verdict.count("succeeded") >= 1 and "failed" not in verdict, verdict
