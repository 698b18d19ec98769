"""A campaign-like corpus: one template, per-recipient personalisation, a shared PDF.

Used by the dedup/dictionary tests and by bench/storage_bench.py.  Everything
is deterministic from the seed, so two runs (or two organisations) build the
same PDF bytes, and the PDF's base64 is wrapped the same way each time (as a
mailing tool sending one attachment to every recipient would).
"""

from __future__ import annotations

import base64
import random
import zlib

BOUNDARY_ALT = "alt-7f3a9c"
BOUNDARY_MIX = "mix-0b44e1"


def fake_pdf(size: int = 300 * 1024, seed: int = 7) -> bytes:
    """SIZE bytes shaped like a PDF: a header, deflated (incompressible) streams."""
    rng = random.Random(seed)
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    n = 1
    while len(out) < size - 64:
        text = " ".join(rng.choice(("invoice", "total", "EUR", "item", "qty", str(rng.random())))
                        for _ in range(400)).encode()
        stream = zlib.compress(text + rng.randbytes(2000), 9)
        out += b"%d 0 obj\n<< /Length %d /Filter /FlateDecode >>\nstream\n" % (n, len(stream))
        out += stream + b"\nendstream\nendobj\n"
        n += 1
    out = out[: size - 6] + b"%%EOF\n"
    return bytes(out)


def _b64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


FIRST = ("Anna", "Ben", "Chloé", "Dmitri", "Eva", "Farid", "Grace", "Hugo", "Ines", "Jonas")
LAST = ("Martin", "Schmidt", "García", "Rossi", "Nowak", "Dubois", "Jensen", "Silva")
CITIES = ("Lyon", "Berlin", "Porto", "Gdańsk", "Turku", "Ghent", "Bologna", "Cork")


def message(i: int, domain: str, *, pdf: bytes | None = None, token: str = "") -> bytes:
    """Recipient I's copy of the campaign (with the PDF attached if given)."""
    rng = random.Random(i)
    first, last = rng.choice(FIRST), rng.choice(LAST)
    city = rng.choice(CITIES)
    rcpt = f"{first.lower()}.{last.lower()}{i}@customers.example"
    code = f"{rng.getrandbits(40):010X}"
    link = f"https://{domain}/o/{rng.getrandbits(64):016x}"
    amount = f"{rng.randint(5, 999)}.{rng.randint(0, 99):02d}"
    text = (
        f"Dear {first} {last},\r\n\r\n"
        f"Thank you for shopping with us in {city}. Your order {code} of EUR {amount}\r\n"
        "has been confirmed and will be shipped within two working days. You can\r\n"
        f"follow your parcel at any time here:\r\n\r\n  {link}\r\n\r\n"
        "Our winter collection is now online: warm coats, knitwear and boots for\r\n"
        "the whole family, with free delivery on every order above EUR 50 until\r\n"
        "the end of the month. Members of our loyalty programme collect double\r\n"
        "points on every purchase this week.\r\n\r\n"
        "If you have any question about your order, simply reply to this message\r\n"
        "or call our customer service, Monday to Saturday from 8:00 to 20:00.\r\n\r\n"
        "Kind regards,\r\nThe Example Shop team\r\n\r\n"
        f"You receive this message because you are a customer of {domain}.\r\n"
        f"Unsubscribe: https://{domain}/u/{code.lower()}\r\n"
    ).encode()
    html = (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Your order</title>"
        "<style>body{font-family:Arial,sans-serif;color:#222}.btn{background:#0a6;color:#fff;"
        "padding:10px 18px;border-radius:4px;text-decoration:none}.foot{font-size:11px;"
        "color:#888}</style></head><body>\r\n"
        f"<table width=\"600\" align=\"center\"><tr><td><h1>Hello {first}!</h1>\r\n"
        f"<p>Thank you for shopping with us in {city}. Your order <b>{code}</b> of "
        f"<b>EUR {amount}</b> has been confirmed and will be shipped within two working "
        "days.</p>\r\n"
        f"<p><a class=\"btn\" href=\"{link}\">Track my parcel</a></p>\r\n"
        "<p>Our winter collection is now online: warm coats, knitwear and boots for the "
        "whole family, with free delivery on every order above EUR 50 until the end of the "
        "month.</p>\r\n<p>Members of our loyalty programme collect double points on every "
        "purchase this week.</p>\r\n"
        f"<p class=\"foot\">You receive this message because you are a customer of {domain}."
        f" <a href=\"https://{domain}/u/{code.lower()}\">Unsubscribe</a></p>\r\n"
        "</td></tr></table></body></html>\r\n"
    ).encode()
    headers = (
        f"From: Example Shop <news@{domain}>\r\n"
        f"To: {first} {last} <{rcpt}>\r\n"
        f"Subject: {first}, your order {code} is confirmed\r\n"
        f"Date: Wed, 25 Nov 2026 {8 + i % 10:02d}:{i % 60:02d}:{(i * 7) % 60:02d} +0000\r\n"
        f"Message-ID: <{code}.{i}@{domain}>\r\n"
        + (f"X-Test-Token: {token}\r\n" if token else "")
        + "MIME-Version: 1.0\r\n"
        f"List-Unsubscribe: <https://{domain}/u/{code.lower()}>\r\n"
    ).encode()
    alternative = (
        f"Content-Type: multipart/alternative; boundary=\"{BOUNDARY_ALT}\"\r\n\r\n"
        f"--{BOUNDARY_ALT}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + text + (
        f"--{BOUNDARY_ALT}\r\nContent-Type: text/html; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + html + f"--{BOUNDARY_ALT}--\r\n".encode()
    if pdf is None:
        return headers + alternative
    return headers + (
        f"Content-Type: multipart/mixed; boundary=\"{BOUNDARY_MIX}\"\r\n\r\n"
        f"--{BOUNDARY_MIX}\r\n"
    ).encode() + alternative + (
        f"--{BOUNDARY_MIX}\r\nContent-Type: application/pdf; name=\"winter-catalogue.pdf\"\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        "Content-Disposition: attachment; filename=\"winter-catalogue.pdf\"\r\n\r\n"
    ).encode() + _b64_lines(pdf) + f"--{BOUNDARY_MIX}--\r\n".encode()
