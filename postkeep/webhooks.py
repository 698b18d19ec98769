"""Webhook signatures, retry delays and one signed POST (issue 18).

Pure functions plus one blocking HTTP call; the worker (storage/sidecar/
webhooks.py) and `postkeep webhook test` share them.

Signature header (README, "Webhooks"):

    Postkeep-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

During a secret rotation's overlap there is one `v1=` per valid secret; a
receiver accepts the request if any of them matches its secret.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import urllib3

SIGNATURE_HEADER = "Postkeep-Signature"
EVENT_ID_HEADER = "Postkeep-Event-Id"
SECRET_PREFIX = "whsec_"
# A receiver should refuse a signature older than this (replays).
DEFAULT_TOLERANCE_SECONDS = 300


def new_secret() -> str:
    """A fresh endpoint secret: 32 random bytes, URL-safe base64, prefixed."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of "<timestamp>." + body under SECRET (its UTF-8 bytes)."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secrets_: Sequence[str], timestamp: int, body: bytes) -> str:
    """The Postkeep-Signature value: t=..., then v1=... for each secret given."""
    return ",".join([f"t={timestamp}", *(f"v1={signature(s, timestamp, body)}"
                                         for s in secrets_)])


def verify(secret: str, header: str, body: bytes, *, now: float | None = None,
           tolerance: float = DEFAULT_TOLERANCE_SECONDS) -> bool:
    """True if HEADER signs BODY with SECRET and its timestamp is within TOLERANCE
    seconds of NOW: the receiver's check, exactly as README documents it."""
    fields = [part.split("=", 1) for part in header.split(",") if "=" in part]
    stamps = [v for k, v in fields if k.strip() == "t"]
    if len(stamps) != 1 or not stamps[0].strip().isdigit():
        return False
    t = int(stamps[0])
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    want = signature(secret, t, body)
    return any(k.strip() == "v1" and hmac.compare_digest(v.strip(), want) for k, v in fields)


def retry_delay(attempts: int, initial: float, maximum: float,
                rand: random.Random | None = None) -> float:
    """Seconds before the next try after ATTEMPTS failed ones: INITIAL doubled per
    failure, capped at MAXIMUM, minus up to half of it at random (so endpoints
    that failed together do not all retry together)."""
    base = min(maximum, initial * 2 ** min(max(attempts - 1, 0), 40))
    jitter: float = (rand or random.Random()).random() if rand else random.random()
    return float(base * (1 - 0.5 * jitter))


@dataclass(frozen=True)
class PostResult:
    """One POST's outcome: `status` is the HTTP status (None if none came)."""

    status: int | None
    error: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def result(self) -> str:
        """The metric label: ok, http_4xx, http_5xx, http_other, timeout or connection."""
        if self.status is None:
            return "timeout" if self.error and "timed out" in self.error.lower() else "connection"
        if self.ok:
            return "ok"
        return f"http_{self.status // 100}xx" if self.status >= 400 else "http_other"


_POOL = urllib3.PoolManager(num_pools=256, maxsize=1, block=False, retries=False)


def post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> PostResult:
    """POST BODY to URL, never raising: the answer's status or why none came.

    No redirects are followed (a 3xx is a failure: the endpoint's URL is
    what the operator registered) and the answer's body is read up to 64 KiB
    and dropped.
    """
    started = time.monotonic()
    try:
        resp = _POOL.request("POST", url, body=body, headers=dict(headers),
                             timeout=urllib3.Timeout(connect=timeout, read=timeout),
                             redirect=False, preload_content=False)
        try:
            resp.read(65536)
        finally:
            resp.release_conn()
        return PostResult(resp.status, None, time.monotonic() - started)
    except Exception as exc:  # every transport failure is a failed attempt
        return PostResult(None, _reason(exc), time.monotonic() - started)


def _reason(exc: BaseException) -> str:
    cur: BaseException = exc
    # urllib3 wraps the cause (MaxRetryError(reason=...)); name the innermost.
    reason = getattr(cur, "reason", None)
    if isinstance(reason, BaseException):
        cur = reason
    text = str(cur).strip().splitlines()
    return f"{type(cur).__name__}: {text[0] if text else ''}"[:300]
