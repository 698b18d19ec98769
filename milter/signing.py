"""Who gets signed, and with what: pure decisions over plain data.

Signing is a privilege of mail the platform vouches for: a client on a
trusted network, mail injected locally (sendmail), or a SASL login that is a
registered submitter, for its own organisation only.  Mail that merely
claims a customer's or the platform's domain from anywhere else is never
signed, and neither is mail from a login that is no registered submitter
(whatever it authenticated as) or from a client with no address.  The
signing domain is the From: header's domain (what DMARC aligns with), and it
must belong to the organisation the message was attributed to, so one
organisation can never get another's signature.  The platform's own key
(system mail) is for trusted networks and local submission only: a
customer's login never makes the platform's signature.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from postkeep.milter.dkim import sign
from postkeep.signing_keys import PrivateKey
from postkeep.storage.metadata.dkim_keys import SigningKey

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(key: str, values: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings to networks; ValueError naming KEY and the bad value."""
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError as exc:
            raise ValueError(f"{key}: {v!r} is not an IP network ({exc})") from exc
    return tuple(out)


def is_trusted(client_addr: str | None, local: bool, networks: Sequence[Network]) -> bool:
    """Is the client itself vouched for: local submission or a trusted network?

    A SASL login is no part of this: a login vouches for its client only once
    it is known to be a registered submitter, and then only for that
    submitter's organisation (`milter.decide.Decision.via_login`).  A client
    with no (usable) address is not trusted.
    """
    if local:
        return True
    if not client_addr:
        return False
    try:
        addr = ipaddress.ip_address(client_addr.strip("[]").removeprefix("IPv6:"))
    except ValueError:
        return False
    return any(addr in net for net in networks)


@dataclass(frozen=True)
class Signature:
    """One DKIM-Signature header to insert, as Postfix should write it."""

    algorithm: str
    selector: str
    line: bytes  # "DKIM-Signature: ...\r\n", folded with CRLF

    @property
    def milter_value(self) -> str:
        """The value for insheader: after "DKIM-Signature: ", LF folding, no final EOL."""
        value = self.line.split(b":", 1)[1].removeprefix(b" ").removesuffix(b"\r\n")
        return value.replace(b"\r\n", b"\n").decode("ascii")


def sign_all(header_block: bytes, body_digest: bytes,
             keys: Sequence[tuple[str, str, str, PrivateKey]], timestamp: int) -> list[Signature]:
    """Sign with every (domain, selector, algorithm, key); top-down order.

    Raises postkeep.signing_keys.DkimError (e.g. not exactly one From: header).
    """
    out = []
    for domain, selector, algorithm, key in keys:
        line = sign(header_block, body_digest, key, domain, selector,
                    algorithm,  # type: ignore[arg-type]
                    timestamp)
        out.append(Signature(algorithm, selector, line))
    return out


def customer_keys(keys: Sequence[SigningKey]) -> list[tuple[str, str, str, PrivateKey]]:
    return [(k.domain, k.selector, k.algorithm, k.private_key) for k in keys]

