"""OpenDKIM's own verifier accepts postkeep's signatures and rejects a changed byte.

`opendkim -t FILE` runs the milter's verification over a message file, with
public keys from `TestPublicKeys` (the records `postkeep dkim dns` prints),
so no DNS is involved.  OpenDKIM comes with the stack (`stack.sh install`);
without it the tests fail naming it, as stack tests do.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
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
