"""DKIM signing: byte-identical to dkimpy, verifiable, and streaming-safe.

The reference is dkimpy itself, choosing its own header list (its default,
never postkeep's `signed_header_names`): signing that list at the same time,
`postkeep.milter.dkim.sign` must produce exactly the header line
`dkim.sign(..., canonicalize=(b'relaxed', b'relaxed'))` produces, and the
list postkeep chooses must sign every header dkimpy's default does, as often.
The body hash must not depend on how the body is cut into chunks, and
dkimpy's verifier, given the TXT record postkeep publishes, must accept the
signature and reject it once a body byte changes.  OpenDKIM, a verifier
written apart from both, checks every message of the corpus signed by the
milter (tests/test_dkim_opendkim.py).
"""

from __future__ import annotations

import base64
import random
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import CanonicalizationPolicy

from postkeep import signing_keys
from postkeep.milter import dkim as pkdkim
from postkeep.storage.metadata import dkim_keys

pytestmark = pytest.mark.unit

DOMAIN = "example.org"
SELECTOR = "s2026"
T = 1767225600  # 2026-01-01T00:00:00Z

MESSAGES: dict[str, bytes] = {
    "plain": (
        b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
        b"Subject: hello\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        b"Message-ID: <1@example.org>\r\n\r\nHello Bob.\r\n"
    ),
    "8bit": (
        b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.org>\r\nTo: bob@example.net\r\n"
        b"Subject: Gr\xc3\xbc\xc3\x9fe \xe9t\xe9\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\nlatin-1 \xe9\xe8\xff\r\n\x00nul\r\n"
    ),
    "trailing-empty-lines": (
        b"From: a@example.org\r\nSubject: t\r\n\r\nbody\r\n\r\n  \r\n\t\r\n\r\n"
    ),
    "whitespace-runs": (
        b"From: a@example.org\r\nSubject:   spaced \t out  \r\n\r\n"
        b"a  b\t\tc \t d   \r\n   leading\r\n\t\r\nmid  \r\n x \r\n"
    ),
    "empty-body": b"From: a@example.org\r\nSubject: nothing\r\n\r\n",
    "crlf-only-body": b"From: a@example.org\r\nSubject: nothing\r\n\r\n\r\n",
    "no-final-crlf": b"From: a@example.org\r\n\r\nlast line  ",
    "bare-cr-and-lf": b"From: a@example.org\r\n\r\nx\ry\r\nbare\nlf\r\r\n",
    "folded-headers": (
        b"From: Alice\r\n  <alice@example.org>\r\nTo: one@example.net,\r\n\ttwo@example.net,"
        b"\r\n    three@example.net\r\nSubject: a very long subject that goes on\r\n"
        b" and on\r\n\tand on\r\nContent-Type: multipart/alternative;\r\n"
        b' boundary="b1"\r\nMIME-Version: 1.0\r\n\r\n--b1\r\n'
        b"Content-Type: text/plain\r\n\r\nplain\r\n--b1--\r\n"
    ),
    "duplicate-headers": (
        b"Received: from a by b\r\nReceived: from c by d\r\nFrom: a@example.org\r\n"
        b"To: x@example.net\r\nCc: y@example.net\r\nCc: z@example.net\r\n"
        b"References: <1@x>\r\nIn-Reply-To: <1@x>\r\nList-Id: <l.example.org>\r\n"
        b"List-Unsubscribe: <mailto:u@example.org>\r\nsubject: lower\r\nSUBJECT: upper\r\n"
        b"Reply-To: r@example.org\r\nX-Postkeep-Id: 0192\r\nNo-Space:after-colon\r\n\r\n"
        b"body\r\n"
    ),
}

BODIES = [
    b"", b"\r\n", b"\r\n\r\n", b"x", b"x\r\n", b" \r\n", b"  x  \r\n\r\n  ", b"a\r\r\n",
    b"a \r b\r\n", b"\t\t\r\n\r\nz\r\n\r\n\r\n", b"a\nb\n\n", b"\r", b"a\r", b"  ",
    b"line1\r\n   \r\n\tline3\t \r\n",
]


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def _dkimpy_key(key: signing_keys.PrivateKey) -> bytes:
    """The private key in the form dkimpy's sign() takes."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(raw)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _dkimpy_sign(message: bytes, key: signing_keys.PrivateKey, algorithm: str) -> bytes:
    """dkimpy's own signature over MESSAGE at time T, with the headers dkimpy
    chooses by default (RFC 6376's recommended ones present, From once more)."""
    with mock.patch.object(dkim.time, "time", return_value=float(T)):
        return bytes(dkim.sign(
            message, SELECTOR.encode(), DOMAIN.encode(), _dkimpy_key(key),
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=algorithm.encode(),
        ))


def signed_headers(signature: bytes) -> list[bytes]:
    """The h= list of a DKIM-Signature header line, as written."""
    m = re.search(rb"[; ]h=([^;]*);", re.sub(rb"\r\n[ \t]+", b" ", signature))
    assert m, signature
    return [name.strip() for name in m.group(1).split(b":")]


@contextmanager
def headers_chosen_by(signature: bytes) -> Iterator[list[bytes]]:
    """postkeep signing the headers SIGNATURE (dkimpy's) lists, instead of its own
    choice, so that everything else can be compared byte for byte."""
    chosen = signed_headers(signature)

    def choose(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
        return chosen

    with mock.patch.object(pkdkim, "signed_header_names", choose):
        yield chosen


def _dnsfunc(key: signing_keys.PrivateKey) -> object:
    """A resolver stub answering the selector's TXT record as postkeep publishes it."""
    value = dkim_keys.dns_txt_value(signing_keys.algorithm_of(key), dkim_keys.public_key_bytes(key))
    # What a resolver returns: the record's strings concatenated.
    answer = "".join(dkim_keys.dns_txt_strings(value)).encode()
    expected = f"{SELECTOR}._domainkey.{DOMAIN}.".encode()

    def get_txt(name: bytes, timeout: int = 5) -> bytes | None:
        return answer if name == expected else None

    return get_txt


def _dkimpy_body_hash(body: bytes) -> bytes:
    """The relaxed body hash dkimpy computes for BODY inside a message."""
    import hashlib

    _, parsed = dkim.rfc822_parse(b"From: a@example.org\r\n\r\n" + body)
    canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed").canonicalize_body(parsed)
    return hashlib.sha256(canon).digest()


@pytest.mark.parametrize("name", sorted(MESSAGES))
@pytest.mark.parametrize("algorithm", signing_keys.ALGORITHMS)
def test_signature_is_byte_identical_to_dkimpy(
    name: str, algorithm: signing_keys.Algorithm, rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    key: signing_keys.PrivateKey = rsa_key if algorithm == "rsa-sha256" else ed_key
    message = MESSAGES[name]
    theirs = _dkimpy_sign(message, key, algorithm)
    with headers_chosen_by(theirs) as chosen:
        assert pkdkim.sign_message(message, key, DOMAIN, SELECTOR, algorithm, T) == theirs
    ours = pkdkim.sign_message(message, key, DOMAIN, SELECTOR, algorithm, T)
    assert ours.startswith(b"DKIM-Signature: v=1; a=" + algorithm.encode())
    assert ours.endswith(b"\r\n") and f"t={T};".encode() in ours and b" l=" not in ours
    # postkeep's own choice signs whatever dkimpy's default signs, at least as often
    missing = Counter(chosen) - Counter(signed_headers(ours))
    assert not missing, missing


@pytest.mark.parametrize("name", sorted(MESSAGES))
@pytest.mark.parametrize("algorithm", signing_keys.ALGORITHMS)
def test_dkimpy_verifies_with_published_record_and_rejects_a_changed_byte(
    name: str, algorithm: signing_keys.Algorithm, rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    key: signing_keys.PrivateKey = rsa_key if algorithm == "rsa-sha256" else ed_key
    message = MESSAGES[name]
    signed = pkdkim.sign_message(message, key, DOMAIN, SELECTOR, algorithm, T) + message
    dnsfunc = _dnsfunc(key)
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    # Change one body byte (append one if the body is empty): verification fails.
    header_end = signed.index(b"\r\n\r\n") + 4
    if header_end < len(signed) and signed[header_end:].strip():
        pos = header_end + next(i for i, c in enumerate(signed[header_end:]) if c > 0x20)
        tampered = signed[:pos] + bytes([signed[pos] ^ 0x01]) + signed[pos + 1 :]
    else:
        tampered = signed + b"x\r\n"
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)


def test_signed_headers_are_recommended_present_plus_oversigned() -> None:
    headers = pkdkim.parse_headers(pkdkim.split_message(MESSAGES["duplicate-headers"])[0])
    names = pkdkim.signed_header_names(headers)
    present = [
        b"from", b"to", b"cc", b"cc", b"references", b"in-reply-to", b"list-id",
        b"list-unsubscribe", b"subject", b"subject", b"reply-to",
    ]
    assert names == present + list(pkdkim.OVERSIGNED)
    assert b"received" not in names and b"x-postkeep-id" not in names
    # each oversigned header is listed once more than it occurs
    for h in pkdkim.OVERSIGNED:
        occurs = sum(1 for n, _ in headers if n.lower() == h)
        assert names.count(h) == occurs + 1


def test_adding_an_oversigned_header_breaks_the_signature(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    message = MESSAGES["plain"]
    signed = pkdkim.sign_message(message, rsa_key, DOMAIN, SELECTOR, "rsa-sha256", T) + message
    assert dkim.verify(signed, dnsfunc=_dnsfunc(rsa_key))
    added = signed.replace(b"\r\n\r\n", b"\r\nReply-To: evil@example.com\r\n\r\n", 1)
    assert not dkim.verify(added, dnsfunc=_dnsfunc(rsa_key))


@pytest.mark.parametrize("body", BODIES + [m.split(b"\r\n\r\n", 1)[-1] for m in MESSAGES.values()])
def test_body_hash_matches_dkimpy_for_every_split_point(body: bytes) -> None:
    expected = _dkimpy_body_hash(body)
    assert pkdkim.body_hash(body) == expected
    for cut in range(len(body) + 1):
        h = pkdkim.BodyHasher()
        h.update(body[:cut])
        h.update(b"")
        h.update(body[cut:])
        assert h.digest() == expected, f"split at {cut}"
    h = pkdkim.BodyHasher()
    for i in range(len(body)):
        h.update(body[i : i + 1])
    assert h.digest() == expected, "byte by byte"


def test_body_hash_matches_dkimpy_on_random_bodies_and_chunkings() -> None:
    rng = random.Random(6376)
    alphabet = [b"a", b"b", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\xff"]
    for _ in range(3000):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        expected = _dkimpy_body_hash(body)
        h = pkdkim.BodyHasher()
        pos = 0
        while pos < len(body):
            step = rng.randrange(1, 6)
            h.update(body[pos : pos + step])
            pos += step
        assert h.digest() == expected, body


def test_large_body_in_64k_chunks_matches_one_shot() -> None:
    line = b"Lorem  ipsum\t dolor sit amet, \xc3\xa9 consectetur   \r\n"
    body = line * 40000 + b"\r\n" * 5
    h = pkdkim.BodyHasher()
    for i in range(0, len(body), 65535):
        h.update(body[i : i + 65535])
    assert h.digest() == _dkimpy_body_hash(body)


def test_streamed_header_block_and_body_hash_sign_like_the_whole_message(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    message = MESSAGES["folded-headers"]
    header_block, body = pkdkim.split_message(message)
    h = pkdkim.BodyHasher()
    for i in range(0, len(body), 7):
        h.update(body[i : i + 7])
    # the header block with or without its empty line gives the same signature
    with_blank = header_block + b"\r\n"
    theirs = _dkimpy_sign(message, rsa_key, "rsa-sha256")
    with headers_chosen_by(theirs):
        a = pkdkim.sign(header_block, h.digest(), rsa_key, DOMAIN, SELECTOR, "rsa-sha256", T)
        b = pkdkim.sign(with_blank, h.digest(), rsa_key, DOMAIN, SELECTOR, "rsa-sha256", T)
    assert a == b == theirs


def test_refusals_name_the_problem(
    rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    digest = pkdkim.body_hash(b"x\r\n")
    with pytest.raises(signing_keys.DkimError, match="exactly one From"):
        pkdkim.sign(b"To: a@b.c\r\n", digest, rsa_key, DOMAIN, SELECTOR, "rsa-sha256", T)
    with pytest.raises(signing_keys.DkimError, match="exactly one From"):
        pkdkim.sign(b"From: a@b.c\r\nFrom: d@e.f\r\n", digest, rsa_key, DOMAIN, SELECTOR,
                    "rsa-sha256", T)
    with pytest.raises(signing_keys.DkimError, match="does not match"):
        pkdkim.sign(b"From: a@b.c\r\n", digest, ed_key, DOMAIN, SELECTOR, "rsa-sha256", T)
    with pytest.raises(signing_keys.DkimError, match="header block not parseable"):
        pkdkim.sign(b"From: a@b.c\r\nno colon here\r\n", digest, rsa_key, DOMAIN, SELECTOR,
                    "rsa-sha256", T)
    with pytest.raises(signing_keys.DkimError, match="32-byte"):
        pkdkim.sign(b"From: a@b.c\r\n", b"short", rsa_key, DOMAIN, SELECTOR, "rsa-sha256", T)


def test_load_private_key_accepts_pem_and_refuses_garbage_without_echoing_it(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    loaded = signing_keys.load_private_key(pem)
    assert signing_keys.algorithm_of(loaded) == "rsa-sha256"
    with pytest.raises(signing_keys.DkimError) as info:
        signing_keys.load_private_key(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXN0dWZm\n-----END")
    assert "c2VjcmV0LXN0dWZm" not in str(info.value)


def test_dns_record_is_split_into_255_byte_strings(rsa_key: rsa.RSAPrivateKey) -> None:
    value = dkim_keys.dns_txt_value("rsa-sha256", dkim_keys.public_key_bytes(rsa_key))
    assert value.startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    strings = dkim_keys.dns_txt_strings(value)
    assert all(len(s) <= 255 for s in strings) and "".join(strings) == value
    assert len(strings) == 2
    line = dkim_keys.zone_record(DOMAIN, SELECTOR, value)
    assert line == f'{SELECTOR}._domainkey.{DOMAIN}. IN TXT ( "{strings[0]}" "{strings[1]}" )'
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_value = dkim_keys.dns_txt_value("ed25519-sha256", dkim_keys.public_key_bytes(ed))
    assert ed_value.startswith("v=DKIM1; k=ed25519; p=") and len(ed_value) == 22 + 44
