"""Mail still flows, counted, after `postkeep postfix apply` merges into a host list.

The stack's Postfix is turned into a host with its own old-style recipient
restrictions (no postkeep policy check, permit_mynetworks before the relay
decision), `postkeep postfix apply` merges the bundle into it, and a message
from a trusted client is sent: delivered to the sink, captured, and counted by
postkeep-policyd (which it would not be had apply put the policy check after
permit_mynetworks).  main.cf and apply's record are restored afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from support import smtp
from support.stack import Stack
from support.wait import until

pytestmark = pytest.mark.stack

HOST_LIST = "reject_non_fqdn_recipient, permit_mynetworks, reject_unauth_destination"


def _counted(stack: Stack, oid: uuid.UUID) -> dict[str, int]:
    with stack.connect() as conn:
        return dict(conn.execute("SELECT kind, used FROM rate_counters WHERE org_id = %s",
                                 (oid,)).fetchall())


def test_mail_flows_and_is_counted_after_apply_to_a_host_list(stack: Stack) -> None:
    pfdir = Path(stack.env["POSTKEEP_POSTFIX_CONFIG_DIR"])
    state = pfdir / "postkeep-backup" / "state.json"
    saved = {p: p.read_bytes() for p in (pfdir / "main.cf", state) if p.exists()}
    postkeep = Path(sys.executable).with_name("postkeep")
    try:
        subprocess.run(["postconf", "-c", str(pfdir), "-e",
                        f"smtpd_recipient_restrictions = {HOST_LIST}"], check=True)
        done = subprocess.run([str(postkeep), "--config", stack.env["POSTKEEP_CONFIG"],
                               "postfix", "apply"], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        value = subprocess.run(["postconf", "-c", str(pfdir), "-h",
                                "smtpd_recipient_restrictions"],
                               capture_output=True, text=True, check=True).stdout.strip()
        policy = f"check_policy_service {stack.config.postfix.policy_address}"
        assert value == (f"reject_non_fqdn_recipient, {policy}, permit_mynetworks,"
                         " reject_unauth_destination")
        # a restart, not a reload: no smtpd of the old configuration may take the test mail
        stack.stack_ctl("stop", "postfix")
        stack.stack_ctl("start", "postfix")

        oid, domain = stack.new_org("basic")
        token = uuid.uuid4().hex
        msg = (f"From: app@{domain}\r\nTo: r@sink.test\r\nSubject: merged\r\n"
               f"X-Test-Token: {token}\r\n\r\nmerged\r\n").encode()
        reply = smtp.send(*stack.smtp, f"app@{domain}", ["r@sink.test"], msg)
        assert reply.code == 250, reply
        assert b"merged" in stack.sink_copy(token)
        with stack.connect() as conn:
            assert conn.execute("SELECT 1 FROM messages WHERE queue_id = %s",
                                (reply.queue_id,)).fetchone()
        counted = until(lambda: _counted(stack, oid).get("messages"), "policyd's count")
        assert counted == 1
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
        stack.stack_ctl("stop", "postfix")
        stack.stack_ctl("start", "postfix")
