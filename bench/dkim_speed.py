"""DKIM signing speed: postkeep's signer against plain dkimpy, one core.

    .venv/bin/python bench/dkim_speed.py [--seconds 3] [--size 5120]

For each algorithm it signs the same message repeatedly for a fixed time and
prints signatures per second for:

  dkimpy          dkim.sign(message, ..., canonicalize=(relaxed, relaxed)),
                  which parses the PEM key and computes RSA in pure Python
  postkeep        postkeep.milter.dkim.sign_message (body hash + header
                  signing through OpenSSL), the key loaded once as the milter
                  holds it
  postkeep sign   postkeep.milter.dkim.sign alone, the body hash already
                  computed while the body streamed (what end of message costs)
  crypto only     the bare OpenSSL signature over a digest (the floor)

and checks once that postkeep's header equals dkimpy's for the same time.
The three are measured in alternation for --rounds rounds and the median of
each is printed, so a noisy neighbour hurts all of them alike.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import time
from collections.abc import Callable
from unittest import mock

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from postkeep import signing_keys
from postkeep.milter import dkim as pkdkim

DOMAIN, SELECTOR, T = "example.org", "bench", 1767225600


def make_message(size: int) -> bytes:
    headers = (
        b"From: Sender <sender@example.org>\r\nTo: rcpt@example.net\r\n"
        b"Subject: benchmark message\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        b"Message-ID: <bench@example.org>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    line = b"The quick brown fox  jumps over the lazy dog,\tagain and again.\r\n"
    return headers + line * max(1, (size - len(headers)) // len(line))


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls of FN per second over about SECONDS."""
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(10):
            fn()
        n += 10
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    ap.add_argument("--size", type=int, default=5120, help="message size in bytes")
    ap.add_argument("--rounds", type=int, default=5, help="alternated rounds (median printed)")
    args = ap.parse_args()
    message = make_message(args.size)
    header_block, body = pkdkim.split_message(message)
    digest = pkdkim.body_hash(body)
    keys: list[tuple[signing_keys.Algorithm, signing_keys.PrivateKey, bytes]] = []
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys.append(("rsa-sha256", rsa_key, rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())))
    ed_key = ed25519.Ed25519PrivateKey.generate()
    keys.append(("ed25519-sha256", ed_key, base64.b64encode(ed_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
        serialization.NoEncryption()))))

    print(f"message {len(message)} bytes, {args.rounds} rounds x {args.seconds:g} s per"
          " measurement, one thread, medians")
    print(f"{'algorithm':16} {'dkimpy/s':>10} {'postkeep/s':>11} {'sign only/s':>12}"
          f" {'crypto only/s':>14} {'postkeep/dkimpy':>16}")
    include = pkdkim.signed_header_names(pkdkim.parse_headers(header_block))
    for algorithm, key, dkimpy_key in keys:

        def plain(alg: str = algorithm, k: bytes = dkimpy_key) -> bytes:
            return bytes(dkim.sign(message, SELECTOR.encode(), DOMAIN.encode(), k,
                                   include_headers=include,
                                   canonicalize=(b"relaxed", b"relaxed"),
                                   signature_algorithm=alg.encode()))

        def ours(alg: signing_keys.Algorithm = algorithm,
                 k: signing_keys.PrivateKey = key) -> bytes:
            return pkdkim.sign_message(message, k, DOMAIN, SELECTOR, alg, T)

        def eom(alg: signing_keys.Algorithm = algorithm, k: signing_keys.PrivateKey = key) -> bytes:
            return pkdkim.sign(header_block, digest, k, DOMAIN, SELECTOR, alg, T)

        def crypto(k: signing_keys.PrivateKey = key) -> bytes:
            if isinstance(k, rsa.RSAPrivateKey):
                return k.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
            return k.sign(digest)

        with mock.patch.object(dkim.time, "time", return_value=float(T)):
            if plain() != ours():
                raise SystemExit(f"{algorithm}: postkeep's signature differs from dkimpy's")
        rates: dict[str, list[float]] = {"plain": [], "ours": [], "eom": [], "crypto": []}
        for _ in range(args.rounds):
            rates["plain"].append(rate(plain, args.seconds))
            rates["ours"].append(rate(ours, args.seconds))
            rates["eom"].append(rate(eom, args.seconds))
            rates["crypto"].append(rate(crypto, args.seconds))
        r_plain, r_ours, r_eom, r_crypto = (
            statistics.median(rates[k]) for k in ("plain", "ours", "eom", "crypto")
        )
        print(f"{algorithm:16} {r_plain:10.0f} {r_ours:11.0f} {r_eom:12.0f} {r_crypto:14.0f}"
              f" {r_ours / r_plain:15.1f}x")


if __name__ == "__main__":
    main()
