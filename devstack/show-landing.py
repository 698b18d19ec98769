"""show-landing.py - send one demo message through the dev stack and show where it landed.

Reads the stack's settings from the environment (source DIR/env first).  Makes
sure a demo organisation owns the sender's domain (`postkeep org add` /
`postkeep domain add`, when those commands exist), sends one message to
Postfix with smtplib, waits for it at the sink, then prints:
  - the sink file (what the next hop received),
  - the `messages` row and its `message_recipients` rows (psql), when the
    schema exists,
  - the object key, size and compressed size in the object store.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import subprocess
import sys
import time
import uuid
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

ORG = "demo"
DOMAIN = "demo.postkeep.test"


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        sys.exit(f"show-landing: ${name} is not set: source the stack's env file first")
    return value


def postkeep(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("postkeep")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=False)


def ensure_demo_org() -> None:
    """Create the demo organisation, domain and DKIM key once; ignore 'already exists'."""
    for args in (("org", "add", ORG, "--tier", "free"), ("domain", "add", ORG, DOMAIN),
                 ("dkim", "keygen", DOMAIN, "--selector", "demo", "--active-from", "now")):
        done = postkeep(*args)
        if done.returncode != 0 and "exist" not in (done.stderr + done.stdout).lower():
            print(f"  (postkeep {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()})")


def send() -> str:
    msg = EmailMessage()
    message_id = f"<demo-{uuid.uuid4().hex[:12]}@{DOMAIN}>"
    msg["From"] = f"Demo Sender <noreply@{DOMAIN}>"
    msg["To"] = "alice@example.net, bob@example.org"
    msg["Subject"] = "postkeep demo message"
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = message_id
    msg.set_content(
        "Hello from postkeep's dev stack.\n\nThis message was captured on its way out.\n"
    )
    with smtplib.SMTP(env("POSTKEEP_SMTP_HOST"), int(env("POSTKEEP_SMTP_PORT")), timeout=60) as s:
        s.send_message(
            msg, from_addr=f"noreply@{DOMAIN}", to_addrs=["alice@example.net", "bob@example.org"]
        )
    return message_id


def wait_in_sink(message_id: str, timeout: float = 60) -> Path | None:
    sink = Path(env("POSTKEEP_SINK_DIR"))
    needle = message_id.encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for meta in sorted(sink.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
            eml = meta.with_suffix(".eml")
            if eml.exists() and needle in eml.read_bytes()[:65536]:
                return eml
        time.sleep(0.2)
    return None


def psql(sql: str, *options: str) -> str:
    exe = shutil.which("psql") or "/usr/bin/psql"
    done = subprocess.run(
        [exe, "-X", "-P", "pager=off", *options, "-c", sql],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout if done.returncode == 0 else f"  (psql: {done.stderr.strip()})\n"


def has_table(name: str) -> bool:
    exe = shutil.which("psql") or "/usr/bin/psql"
    done = subprocess.run(
        [exe, "-XAtqc", f"select to_regclass('{name}') is not null"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() == "t"


def main() -> None:
    print("== postkeep demo: one message through Postfix ==")
    ensure_demo_org()
    try:
        message_id = send()
    except (OSError, smtplib.SMTPException) as exc:
        sys.exit(f"show-landing: sending to Postfix failed: {exc}")
    print(f"sent Message-ID {message_id} from noreply@{DOMAIN} to 2 recipients")

    eml = wait_in_sink(message_id)
    if eml is None:
        print(f"NOT at the sink after 60 s; Postfix log: {env('POSTKEEP_POSTFIX_LOG')}")
        sys.exit(1)
    meta = json.loads(eml.with_suffix(".json").read_text())
    print(f"\n-- next hop (sink): {eml} ({eml.stat().st_size} bytes)")
    print(f"   envelope: from {meta['mail_from']} to {', '.join(meta['rcpt_tos'])}")

    if not has_table("messages"):
        print("\n-- database: no `messages` table yet (schema not migrated)")
        return
    mid = message_id.replace("'", "''")
    row = f"(select * from messages where message_id_header = '{mid}')"
    print("\n-- PostgreSQL: messages row")
    print(psql(f"select * from {row} m", "-x"), end="")
    # Postfix's success notice reaches postkeep-storage within a second or so.
    query = (f"select r.recipient, r.status, r.dsn_status, r.diagnostic from message_recipients r"
             f" join {row} m on m.id = r.message_id order by 1")
    for _ in range(50):
        if "queued" not in psql(query):
            break
        time.sleep(0.2)
    print("-- PostgreSQL: message_recipients rows (outcome: Postfix DSN via postkeep-storage)")
    print(psql(query), end="")
    print(f"-- object store (bucket {env('POSTKEEP_S3_BUCKET')} at {env('POSTKEEP_S3_ENDPOINT')})")
    exe = shutil.which("psql") or "/usr/bin/psql"
    found = subprocess.run(
        [exe, "-XAtqF", " ", "-c", f"select object_key, size, compressed_size from {row} m"],
        capture_output=True,
        text=True,
        check=False,
    )
    if not found.stdout.strip():
        print("   no messages row for this Message-ID (is the milter running?)")
        return
    key, size, compressed = found.stdout.split()[:3]
    from minio import Minio

    client = Minio(
        env("POSTKEEP_S3_ENDPOINT"),
        access_key=env("POSTKEEP_S3_ACCESS_KEY"),
        secret_key=env("POSTKEEP_S3_SECRET_KEY"),
        secure=False,
    )
    stat = client.stat_object(env("POSTKEEP_S3_BUCKET"), key)
    print(
        f"   key {key}\n   message size {size} bytes, compressed {compressed} bytes,"
        f" object in store {stat.size} bytes"
    )


if __name__ == "__main__":
    main()
