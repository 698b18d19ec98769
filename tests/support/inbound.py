"""Mail arriving from outside the stack's trusted networks (inbound capture)."""

from __future__ import annotations

from support import smtp
from support.stack import Stack
from support.wait import until

OUTSIDE = "198.51.100.23"  # TEST-NET-2: off the stack's trusted networks


def send_inbound(stack: Stack, rcpt: str, data: bytes, sender: str, *, outside: bool = True,
                 client_ip: str = OUTSIDE) -> None:
    """One message to RCPT; from CLIENT_IP (XCLIENT) when OUTSIDE, else from the
    trusted loopback; retried while Postfix is still re-reading its maps (a
    domain just given an inbound route is refused as a relay until then)."""
    def attempt() -> bool:
        client = smtp.Client(*stack.smtp)
        try:
            if outside:
                client.xclient(client_ip, "mx.sender.example")
            else:
                client.command("EHLO test.example", 250)
            client.send(sender, [rcpt], data)
            return True
        except smtp.SMTPError as exc:
            if "Relay access denied" not in str(exc):
                raise
            return False
        finally:
            client.close()
    until(attempt, f"Postfix accepts mail for {rcpt}")
