"""DKIM private keys as both the milter and storage handle them: types and loading.

The milter signs with these keys (milter/dkim.py); storage seals them at rest
and rotates them (storage/metadata/dkim_keys.py); the CLI generates them.  The
types and the loader live here, on the ground floor, so that none of those
layers imports another for them.

Pure: no I/O; an exception never carries key material.
"""

from __future__ import annotations

from typing import Final, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("rsa-sha256", "ed25519-sha256")
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class DkimError(Exception):
    """The message or key cannot be signed; the text says why (no key material)."""


def algorithm_of(key: PrivateKey) -> Algorithm:
    """The DKIM algorithm a private key signs with."""
    return "ed25519-sha256" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa-sha256"


def load_private_key(pem: bytes) -> PrivateKey:
    """An RSA or Ed25519 private key from PEM (PKCS#1 or PKCS#8), e.g. the system key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        # The exception text never contains key material.
        raise DkimError(f"not a usable PEM private key: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise DkimError(f"RSA key of {key.key_size} bits: DKIM needs at least 1024")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise DkimError(f"unsupported key type {type(key).__name__}: expected RSA or Ed25519")
