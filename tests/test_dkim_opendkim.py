"""OpenDKIM's own verifier accepts postkeep's signatures and rejects a changed byte.

`opendkim -t FILE` runs the milter's verification over a message file, with
public keys from `TestPublicKeys` (the records `postkeep dkim dns` prints),
so no DNS is involved.  OpenDKIM comes with the stack (`stack.sh install`);
without it the tests fail naming it, as stack tests do.

Every message of the corpus (tests/support/corpus.py) is sent through the
stack's Postfix and signed by postkeep-milter with an RSA and an Ed25519 key;
OpenDKIM verifies each of the two signatures of the copy the sink received
on its own.  It has to be asked one signature at a time: given several, it
reports one good signature and says nothing of the others.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from support import corpus, smtp
from support.stack import Stack
from test_dkim_sign import DOMAIN, MESSAGES, SELECTOR, T

from postkeep import signing_keys
from postkeep.milter import dkim as pkdkim
from postkeep.storage.metadata import dkim_keys

pytestmark = pytest.mark.stack

# Inputs where only dkimpy's reading is defined: OpenDKIM treats a bare LF or
# an unterminated last line differently, and Postfix never passes either.
DKIMPY_ONLY = {"no-final-crlf", "bare-cr-and-lf"}
# OpenDKIM (C strings) mishandles a NUL byte in the body: it fails the 8-bit
# message's signature while dkimpy verifies it; checked here without the NUL.
NUL = b"\x00"


@pytest.fixture(scope="module")
def opendkim() -> str:
    path = shutil.which("opendkim") or (
        "/usr/sbin/opendkim" if Path("/usr/sbin/opendkim").exists() else None
    )
    if path is None:
        pytest.fail("opendkim is not installed (run `make install`)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def keys() -> dict[str, signing_keys.PrivateKey]:
    return {
        "rsa-sha256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ed25519-sha256": ed25519.Ed25519PrivateKey.generate(),
    }


def _verify(opendkim: str, tmp: Path, key: signing_keys.PrivateKey, message: bytes) -> str:
    """OpenDKIM's verdict line for MESSAGE, keys served from a TestPublicKeys file."""
    value = dkim_keys.dns_txt_value(signing_keys.algorithm_of(key), dkim_keys.public_key_bytes(key))
    (tmp / "keys").write_text(f"{dkim_keys.dns_name(DOMAIN, SELECTOR)} {value}\n")
    (tmp / "opendkim.conf").write_text(
        f"Mode v\nTestPublicKeys {tmp / 'keys'}\nSyslog no\nLogResults yes\n"
    )
    (tmp / "msg.eml").write_bytes(message)
    r = subprocess.run(
        [opendkim, "-x", str(tmp / "opendkim.conf"), "-t", str(tmp / "msg.eml")],
        capture_output=True, text=True, timeout=30,
    )
    return r.stdout + r.stderr


@pytest.mark.parametrize("name", sorted(set(MESSAGES) - DKIMPY_ONLY))
@pytest.mark.parametrize("algorithm", signing_keys.ALGORITHMS)
def test_opendkim_verifies_and_rejects_a_changed_body_byte(
    opendkim: str, keys: dict[str, signing_keys.PrivateKey], tmp_path: Path,
    name: str, algorithm: signing_keys.Algorithm,
) -> None:
    key = keys[algorithm]
    message = MESSAGES[name].replace(NUL, b"")
    signed = pkdkim.sign_message(message, key, DOMAIN, SELECTOR, algorithm, T) + message
    verdict = _verify(opendkim, tmp_path, key, signed)
    assert "verification (s=s2026, d=example.org" in verdict and "succeeded" in verdict, verdict
    body_at = signed.index(b"\r\n\r\n") + 4
    tampered = signed[:body_at] + b"X\r\n" + signed[body_at:]
    verdict = _verify(opendkim, tmp_path, key, tampered)
    assert "failed" in verdict and "succeeded" not in verdict, verdict


# --- every corpus message, signed by the milter ------------------------------

SIGNATURE = re.compile(rb"DKIM-Signature:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")
CASES = [c.name for c in corpus.build("s@x.example", "t")]


@pytest.fixture(scope="module")
def dual_domain(stack: Stack) -> str:
    """A domain whose mail the milter signs twice: RSA (selector s1), Ed25519 (ed1).

    Both keys are committed in one transaction: the milter's background reload
    sees both or neither (then its first message forces a reload), never the
    RSA key alone for a reload period."""
    _, domain = stack.new_org("pro", dkim=False)
    with stack.connect() as conn, conn.transaction():
        now = datetime.now(UTC)
        dkim_keys.create_key(conn, stack.master_key(), domain, "s1", "rsa-sha256",
                             active_from=now)
        dkim_keys.create_key(conn, stack.master_key(), domain, "ed1", "ed25519-sha256",
                             active_from=now)
    return domain


def _opendkim_alone(opendkim: str, tmp: Path, stack: Stack, domain: str, message: bytes,
                    keep: int) -> str:
    """OpenDKIM's verdict on MESSAGE with every DKIM-Signature but the KEEP-th removed."""
    at = message.index(b"\r\n\r\n") + 2
    head, body = message[:at], message[at:]
    signatures = list(SIGNATURE.finditer(head))
    for i, m in reversed(list(enumerate(signatures))):
        if i != keep:
            head = head[:m.start()] + head[m.end():]
    records = {name: value for name, value in stack.public_keys().items()
               if name.endswith(f"._domainkey.{domain}.".encode())}
    (tmp / "keys").write_text("".join(f"{n.decode().rstrip('.')} {v.decode()}\n"
                                      for n, v in records.items()))
    (tmp / "opendkim.conf").write_text(
        f"Mode v\nTestPublicKeys {tmp / 'keys'}\nSyslog no\nLogResults yes\n")
    (tmp / "msg.eml").write_bytes(head + body)
    r = subprocess.run([opendkim, "-x", str(tmp / "opendkim.conf"), "-t", str(tmp / "msg.eml")],
                       capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


@pytest.mark.parametrize("case_name", CASES)
def test_opendkim_verifies_both_signatures_the_milter_put_on_every_corpus_message(
        opendkim: str, stack: Stack, dual_domain: str, tmp_path: Path, case_name: str) -> None:
    token = uuid.uuid4().hex
    sender = f"sender@{dual_domain}"
    case = next(c for c in corpus.build(sender, token) if c.name == case_name)
    smtp.send(*stack.smtp, sender, list(case.rcpts), case.data)
    delivered = stack.sink_copy(f"{token}-{case_name}")
    head = delivered[:delivered.index(b"\r\n\r\n") + 2]
    selectors = [re.search(rb"[; ]s=([^;]+);", re.sub(rb"\r\n[ \t]+", b" ", m.group()))
                 for m in SIGNATURE.finditer(head)]
    assert [m.group(1) if m else None for m in selectors] == [b"s1", b"ed1"], head[:2000]
    body_at = delivered.index(b"\r\n\r\n") + 4
    tampered = delivered[:body_at] + b"X\r\n" + delivered[body_at:]
    for keep, selector in enumerate(("s1", "ed1")):
        verdict = _opendkim_alone(opendkim, tmp_path, stack, dual_domain, delivered, keep)
        assert f"verification (s={selector}, d={dual_domain}," in verdict, verdict
        assert "succeeded" in verdict and "failed" not in verdict, verdict
        verdict = _opendkim_alone(opendkim, tmp_path, stack, dual_domain, tampered, keep)
        assert "failed" in verdict and "succeeded" not in verdict, verdict
