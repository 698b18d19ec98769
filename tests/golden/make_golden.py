"""How the golden files in this directory were made (see README.md).

Run once, by hand, to add a golden file that does not exist yet:

    PYTHONPATH=tests .venv/bin/python tests/golden/make_golden.py

It writes only files that are missing and never overwrites one: a golden
file holds bytes an older postkeep wrote, and tests/test_golden_formats.py
checks that every later version still reads them.  Regenerating one to make
a test pass would hide exactly the break these tests are there to catch.

The inputs are fixed (below) but the outputs are not all reproducible: zstd
dictionaries and compressed frames depend on the zstd version, RSA and
Ed25519 keys and AES-GCM nonces are random.  That is why the files are
checked in rather than made at test time.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import zstandard
from support.feed import fed

from postkeep.envelope import mail_from_params, return_path
from postkeep.milter.capture import StoredContent
from postkeep.signing_keys import Algorithm
from postkeep.storage.content.container import DictionaryRef
from postkeep.storage.content.dictionaries import LoadedDictionary, train
from postkeep.storage.content.objects import message_key
from postkeep.storage.content.parts import compress_part
from postkeep.storage.content.spool import Spool
from postkeep.storage.metadata import dkim_keys
from postkeep.storage.metadata.messages import CapturedMessage

HERE = Path(__file__).resolve().parent

# --- the fixed inputs (tests/test_golden_formats.py repeats them as literals) ---

ORG = "0190a6c3-7e2f-7c41-9a5b-3f1d2e4c5b6a"
DICT_VERSION = 3
MESSAGE_ID = uuid.UUID("0190a6c3-8f10-7d2e-b3a4-5c6d7e8f9a0b")
CREATED = datetime(2024, 7, 1, 12, 34, 56, 789012, tzinfo=UTC)
BOUNCE_DOMAIN = "bounces.golden.example"
SPLIT_THRESHOLD = 4096
DICTIONARY_MAX = 64 * 1024
# Upload ids of the two part objects (part_key() makes a fresh uuid7 per upload).
UPLOAD_IDS = ("0190a6c3-9a00-7000-8000-000000000001", "0190a6c3-9a00-7000-8000-000000000002")
# The test master key: 32 fixed bytes, for these files only.
MASTER_KEY = hashlib.sha256(b"postkeep golden test master key; never a real one").digest()
DKIM_DOMAIN, DKIM_SELECTOR = "golden.example", "g2024"
# The test return-path key ([return_path] key, used as its UTF-8 bytes).
RETURN_PATH_KEY = b"postkeep-golden-test-return-path-key-not-a-real-one"


def _write(rel: str, data: bytes) -> None:
    path = HERE / rel
    if path.exists():
        print(f"kept {rel} (golden files are never regenerated)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"wrote {rel} ({len(data)} bytes)")


# --- messages ----------------------------------------------------------------------


def _b64(n: int, seed: bytes) -> bytes:
    """N pseudo-random bytes, base64 in 76-column CRLF lines (an attachment body)."""
    raw = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest()
                   for i in range(n // 32 + 1))[:n]
    return base64.encodebytes(raw).replace(b"\n", b"\r\n")


def _note(i: int) -> bytes:
    """A small templated message (what dictionaries are for)."""
    return (
        f"From: Golden Shop <news@{DKIM_DOMAIN}>\r\nTo: customer{i}@customers.example\r\n"
        f"Subject: Your order {1000 + i} is confirmed\r\nDate: Mon, 01 Jul 2024 12:{i % 60:02d}:00"
        f" +0000\r\nMessage-ID: <order-{1000 + i}@{DKIM_DOMAIN}>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        f"Dear customer {i},\r\n\r\nThank you for your order {1000 + i} of EUR"
        f" {i * 7 % 500}.{i % 100:02d}."
        " It will be shipped within two working days.\r\n\r\nKind regards,\r\n"
        "The Golden Shop team\r\n"
    ).encode()


PLAIN = (
    b"From: Alice <alice@golden.example>\r\nTo: bob@elsewhere.example\r\n"
    b"Subject: =?utf-8?q?Caf=C3=A9?= plans\r\nDate: Mon, 01 Jul 2024 12:34:56 +0000\r\n"
    b"Message-ID: <plain-1@golden.example>\r\nX-Folded: one\r\n\ttwo\r\n\r\n"
    b"Hello Bob,\r\n\r\nlunch at noon?\r\n\r\n-- \r\nAlice\r\n"
)


def _split_message(with_tail_part: bool) -> bytes:
    head = (b"From: Reports <reports@golden.example>\r\nTo: finance@elsewhere.example\r\n"
            b"Subject: Quarterly figures\r\nMessage-ID: <split-1@golden.example>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"gold-BB\"\r\n\r\n"
            b"This is a multi-part message in MIME format.\r\n")
    text = b"--gold-BB\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nFigures attached.\r\n"
    pdf = (b"--gold-BB\r\nContent-Type: application/pdf; name=\"q2.pdf\"\r\n"
           b"Content-Disposition: attachment; filename=\"q2.pdf\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(9000, b"q2.pdf"))
    if not with_tail_part:
        return head + text + pdf + b"--gold-BB--\r\nepilogue\r\n"
    # The last part has no closing delimiter: it runs to the end of the message,
    # so its offset is the skeleton's very end.
    csv = (b"--gold-BB\r\nContent-Type: text/csv; name=\"q2.csv\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(6000, b"q2.csv"))
    return head + text + pdf + csv


def _capture(message: bytes, *, threshold: int = 0,
             dictionary: LoadedDictionary | None = None) -> StoredContent:
    """MESSAGE through the milter's MessageCapture, fed as Postfix feeds it."""
    cap = fed(message)
    return cap.finish(split_threshold=threshold, dictionary=dictionary,
                      dictionary_max=DICTIONARY_MAX)


def _sealed(content: StoredContent, part_files: dict[str, bytes]) -> bytes:
    """Seal CONTENT as the committer does, its parts under fixed upload ids."""
    keys = []
    for p in content.parts:
        upload = UPLOAD_IDS[0] if p.filename == "q2.pdf" else UPLOAD_IDS[1]
        key = f"parts/{ORG}/{p.sha256.hex()}/{upload}.zst"
        part_files[key] = compress_part(p.data).read()
        keys.append(key)
    content.seal(keys)
    data = content.stream.read()
    assert len(data) == content.compressed_size
    return data


def make_container() -> None:
    samples = [_note(i) for i in range(60)]
    d = train(samples, 8 * 1024)
    raw = d.as_bytes()
    loaded = zstandard.ZstdCompressionDict(raw)
    loaded.precompute_compress(level=3)
    ref = LoadedDictionary(DictionaryRef(ORG, DICT_VERSION), loaded)
    _write("container/dictionary-v3.zdict", raw)
    parts: dict[str, bytes] = {}
    cases: dict[str, tuple[bytes, Callable[[], StoredContent]]] = {
        "plain": (PLAIN, lambda: _capture(PLAIN)),
        "dict": (_note(61), lambda: _capture(_note(61), dictionary=ref)),
        "split": (_split_message(True),
                  lambda: _capture(_split_message(True), threshold=SPLIT_THRESHOLD)),
        "split-dict": (_split_message(False),
                       lambda: _capture(_split_message(False), threshold=SPLIT_THRESHOLD,
                                        dictionary=ref)),
    }
    for name, (message, capture) in cases.items():
        content = capture()
        data = _sealed(content, parts)
        content.close()
        _write(f"container/{name}.eml", message)
        _write(f"container/{name}.eml.zst", data)
    for key, blob in parts.items():
        upload = key.rsplit("/", 1)[1].removesuffix(".zst")
        _write(f"container/part-{upload[-1]}.zst", blob)


# --- the spool entry -----------------------------------------------------------------


def make_spool() -> None:
    obj = (HERE / "container/plain.eml.zst").read_bytes()
    c_exp, m_exp = CREATED + timedelta(days=90), CREATED + timedelta(days=365)
    m = CapturedMessage(
        id=MESSAGE_ID, org_id=uuid.UUID(ORG), domain="golden.example", queue_id="4XyZ1k2Lmn",
        envelope_from="alice@golden.example",
        recipients=("bob@elsewhere.example", "carol@elsewhere.example"),
        size=len(PLAIN), sha256=hashlib.sha256(PLAIN).digest(),
        object_key=message_key(ORG, str(MESSAGE_ID), CREATED, 90),
        compressed_size=len(obj), created_at=CREATED, content_expires_at=c_exp,
        metadata_expires_at=m_exp, message_id_header="<plain-1@golden.example>",
        header_from="Alice <alice@golden.example>",
        # A lone surrogate: an undecodable header byte, kept as the milter reads it.
        subject="Café plans \udce9", direction="outbound",
        return_path=return_path(MESSAGE_ID, m_exp, BOUNCE_DOMAIN, RETURN_PATH_KEY),
        notify=("SUCCESS,FAILURE", None), extra={"golden": "1"},
    )
    spool_dir = HERE / "spool-tmp"
    spool = Spool(spool_dir)
    spool.ensure()
    path = spool.write(m, io.BytesIO(obj), "s3", now=CREATED + timedelta(seconds=1))
    _write(f"spool/{path.name}", path.read_bytes())
    path.unlink()
    for d in (spool.tmp, spool.quarantine_dir, spool_dir):
        d.rmdir()


# --- the return path ---------------------------------------------------------------


def make_envelope() -> None:
    """return-path-v2.txt.  return-path-v1.txt (no MAC) was written by this same
    function at commit 6dc0f82, before return paths were signed, as
    `return_path(MESSAGE_ID, expiry, BOUNCE_DOMAIN)`: it cannot be made again."""
    expiry = CREATED + timedelta(days=365)
    lines = [
        "# what postkeep writes (postkeep/envelope.py): return path (signed with the golden"
        " test key), then MAIL FROM parameters",
        return_path(MESSAGE_ID, expiry, BOUNCE_DOMAIN, RETURN_PATH_KEY),
        mail_from_params(MESSAGE_ID),
    ]
    _write("envelope/return-path-v2.txt", ("\n".join(lines) + "\n").encode())


# --- sealed DKIM keys ----------------------------------------------------------------


def make_dkim() -> None:
    _write("dkim/master-key.b64", base64.b64encode(MASTER_KEY) + b"\n")
    master = dkim_keys.MasterKey.from_bytes(MASTER_KEY)
    algorithms: tuple[Algorithm, ...] = ("rsa-sha256", "ed25519-sha256")
    for algorithm in algorithms:
        key = dkim_keys.generate_private_key(algorithm)
        sealed = dkim_keys.seal_private_key(master, key, DKIM_DOMAIN, DKIM_SELECTOR)
        public = dkim_keys.public_key_bytes(key)
        row = {
            "_what": "a dkim_keys row as store_key writes it (bytea columns in hex)",
            "domain": DKIM_DOMAIN, "selector": DKIM_SELECTOR, "algorithm": algorithm,
            "private_key_enc": sealed.ciphertext.hex(), "nonce": sealed.nonce.hex(),
            "master_key_id": sealed.master_key_id, "public_key": public.hex(),
            "dns_txt": dkim_keys.dns_txt_value(algorithm, public),
        }
        _write(f"dkim/{algorithm}.json", (json.dumps(row, indent=2) + "\n").encode())


if __name__ == "__main__":
    make_container()
    make_spool()
    make_envelope()
    make_dkim()
