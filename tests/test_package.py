"""The Debian package as an admin gets it: install, run as the units do, capture, purge.

`make test` builds postkeep_<version>_<arch>.deb ($POSTKEEP_DEB) first.  This
file installs it with apt-get on the test machine, checks every installed unit
with `systemd-analyze verify`, runs postkeep-milter, postkeep-policyd and
postkeep-storage as their installed units say (ExecStart, User, Group, UMask,
NoNewPrivileges; ProtectSystem=strict with ReadWritePaths=, PrivateTmp= and
ProtectHome= emulated in a private mount namespace; the working directory /, a
fresh environment, $NOTIFY_SOCKET for Type=notify) with
/etc/postkeep/postkeep.toml pointing at the test stack's PostgreSQL and MinIO,
sends a message through a private Postfix instance made from Debian's stock
main.cf and configured by the installed `postkeep postfix apply`, checks it
landed (row and object), then purges the package and checks the purge removed
what the package created and nothing else.

The tests run in file order on one installation (module fixture); the last
one purges.  Ports: the stack's SMTP port + 15 .. + 21 (17040.. for 17025).
"""

from __future__ import annotations

import configparser
import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import smtp
from support.stack import Stack, strip_received

pytestmark = pytest.mark.stack

UNIT_DIR = Path("/lib/systemd/system")
# Every unit in the repository's systemd/ folder is shipped.
UNITS = tuple(sorted(p.name for p in (Path(__file__).resolve().parents[1] / "systemd").iterdir()
                     if p.suffix in (".service", ".timer", ".socket", ".path")))
DAEMONS = ("postkeep-milter", "postkeep-policyd", "postkeep-storage")
CONFIG = Path("/etc/postkeep/postkeep.toml")
SECRETS = Path("/etc/postkeep/secrets")
# What the package ships and what its postinst creates.
SHIPPED = ("/opt/postkeep/bin/python", "/usr/bin/postkeep", "/usr/bin/postkeep-milter",
           "/usr/bin/postkeep-policyd", "/usr/bin/postkeep-storage",
           "/usr/lib/sysusers.d/postkeep.conf", "/usr/lib/tmpfiles.d/postkeep.conf",
           "/usr/share/postkeep/postfix-conf/main.cf", "/usr/share/doc/postkeep/README.md",
           "/usr/share/postkeep/monitoring/postkeep-alerts.yml",
           "/usr/share/postkeep/monitoring/postkeep-dashboard.json",
           "/usr/share/doc/postkeep/copyright", *(str(UNIT_DIR / u) for u in UNITS))
# Made by postinst; purge removes /var/spool/postkeep (and the user and group)
# only if postinst made them, /etc/postkeep and /var/lib/postkeep always.
SPOOL = "/var/spool/postkeep"
CREATED = ("/var/lib/postkeep", "/etc/postkeep")
APT = ("apt-get", "-q", "-y", "-o", "DPkg::Lock::Timeout=300")
ENV = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def run(*args: str, cwd: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert out.returncode == 0, (
        f"{shlex.join(args)}: exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def installed() -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "postkeep"],
                         capture_output=True, text=True, timeout=60)
    return "install ok installed" in out.stdout


def accounts() -> tuple[str, str]:
    return Path("/etc/passwd").read_text(), Path("/etc/group").read_text()


def host_postfix(name: str) -> bytes:
    """/etc/postfix/NAME without alternate_config_directories (the test instance's
    registration, as devstack/stack.sh does it for the stack's own)."""
    lines = Path("/etc/postfix", name).read_bytes().splitlines(keepends=True)
    return b"".join(x for x in lines if not x.startswith(b"alternate_config_directories"))


@dataclass
class Package:
    deb: Path
    before: tuple[str, str]  # /etc/passwd and /etc/group before the install
    had_spool: bool  # /var/spool/postkeep existed before the install
    host_postfix: dict[str, bytes] = field(default_factory=dict)


@pytest.fixture(scope="module")
def package() -> Iterator[Package]:
    deb = Path(os.environ.get("POSTKEEP_DEB", ""))
    assert deb.is_file(), f"POSTKEEP_DEB={deb}: no package; run `make test` (it runs `make deb`)"
    if installed():  # left over by an interrupted run
        run(*APT, "purge", "postkeep", env=ENV)
    for path in (*SHIPPED, *CREATED):
        assert not os.path.lexists(path), f"{path} exists before the package is installed"
    pkg = Package(deb, accounts(), os.path.lexists(SPOOL),
                  {n: host_postfix(n) for n in ("main.cf", "master.cf")})
    run(*APT, "install", str(deb), env=ENV)
    try:
        yield pkg
    finally:
        if installed():
            subprocess.run([*APT, "purge", "postkeep"], env=ENV, capture_output=True, timeout=300)


def unit_service(name: str) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT_DIR / name)
    return dict(parser["Service"])


def verify(path: Path) -> tuple[int, str]:
    """systemd-analyze verify: its status, and what it said (a warning is a failure:
    systemd 252 exits 0 on an unknown key or an unparsable value)."""
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                         capture_output=True, text=True, timeout=120)
    return out.returncode, (out.stdout + out.stderr).strip()


def test_package_is_installed_the_debian_way(package: Package) -> None:
    for path in SHIPPED:
        assert os.path.exists(path), path
    for name in (*DAEMONS, "postkeep"):
        assert os.readlink(f"/usr/bin/{name}") == f"/opt/postkeep/bin/{name}"
    # the venv runs Debian's interpreter, never one found earlier on PATH (pyenv)
    assert os.path.realpath("/opt/postkeep/bin/python").startswith("/usr/bin/python3")
    fields = run("dpkg-deb", "-f", str(package.deb), "Depends").stdout
    assert "python3 (>= 3.11)" in fields and "python3 (<< 3.12)" in fields, fields
    assert run("dpkg-query", "-W", "-f=${Conffiles}", "postkeep").stdout.split()[0] == str(CONFIG)
    st = os.stat(SPOOL)
    assert (st.st_mode & 0o7777, st.st_uid) == (0o700, int(run("id", "-u", "postkeep").stdout))
    run("id", "-g", "postkeep")
    # The shipped configuration loads as the daemons' user reads it: policyd's
    # defaults work as they are; the milter refuses it, in one line naming the
    # first key an admin must fill in (S3 credentials are required).
    as_postkeep = ("setpriv", "--reuid=postkeep", "--regid=postkeep", "--init-groups", "--")
    run(*as_postkeep, "/usr/bin/postkeep-policyd", "--config", str(CONFIG), "--check-config",
        cwd="/", env=ENV)
    milter = subprocess.run([*as_postkeep, "/usr/bin/postkeep-milter", "--config", str(CONFIG),
                             "--check-config"], capture_output=True, text=True, timeout=300,
                            cwd="/", env=ENV)
    said = milter.stderr.strip().splitlines()
    assert milter.returncode == 2 and len(said) == 1 and "s3.access_key" in said[0], (
        milter.returncode, milter.stderr)


def test_every_installed_unit_verifies(package: Package) -> None:
    for unit in UNITS:
        rc, said = verify(UNIT_DIR / unit)
        assert (rc, said) == (0, ""), f"{unit}: {said}"


@pytest.mark.parametrize("broken", [
    ("ExecStart=/usr/bin/postkeep-milter", "ExecStart=/usr/bin/postkeep-nosuch"),
    ("Type=notify", "Type=notifyish"),
    ("ProtectSystem=strict", "ProtectSytem=strict"),
])
def test_verify_catches_a_broken_unit(package: Package, broken: tuple[str, str],
                                      tmp_path: Path) -> None:
    """The check above can fail: the installed milter unit with one line broken."""
    text = (UNIT_DIR / "postkeep-milter.service").read_text()
    assert broken[0] in text
    unit = tmp_path / "postkeep-milter.service"
    unit.write_text(text.replace(broken[0], broken[1]))
    rc, said = verify(unit)
    assert rc != 0 or said, f"systemd-analyze verify accepted {broken[1]}"


# ---------------------------------------------------------------- running
def secret(path: Path, value: str) -> str:
    path.write_text(value + "\n")
    shutil.chown(path, "postkeep", "postkeep")
    path.chmod(0o600)
    return str(path)


def write_config(stack: Stack, base: int, pfdir: Path) -> None:
    c = stack.config
    SECRETS.mkdir(mode=0o750, exist_ok=True)
    shutil.chown(SECRETS, "root", "postkeep")
    pg = secret(SECRETS / "pg.password", c.postgres.password)
    s3 = secret(SECRETS / "s3.secret", c.s3.secret_key)
    master = secret(SECRETS / "dkim-master.key", c.dkim.master_key)
    CONFIG.write_text(f"""# Written by tests/test_package.py: the test stack's backends.
[postgres]
host = "{c.postgres.host}"
port = {c.postgres.port}
dbname = "{c.postgres.dbname}"
user = "{c.postgres.user}"
password_file = "{pg}"

[s3]
endpoint = "{c.s3.endpoint}"
bucket = "{c.s3.bucket}"
access_key = "{c.s3.access_key}"
secret_key_file = "{s3}"

[milter]
listen = "inet:{base}@127.0.0.1"
metrics_listen = "127.0.0.1:{base + 1}"
spool_directory = "/var/spool/postkeep"

[policyd]
listen_port = {base + 2}
metrics_listen = "127.0.0.1:{base + 3}"

[storage]
lmtp_port = {base + 4}
metrics_listen = "127.0.0.1:{base + 5}"

[postfix]
config_directory = "{pfdir}"
milter_address = "inet:127.0.0.1:{base}"
policy_address = "inet:127.0.0.1:{base + 2}"
storage_lmtp_address = "inet:127.0.0.1:{base + 4}"

[dkim]
master_key_file = "{master}"
""")


def sandbox(unit: dict[str, str]) -> str:
    """A shell script giving its command (\"$@\") the unit's file system view, in a
    private mount namespace: ProtectSystem=strict (every mount read-only but /dev,
    /proc, /sys), ReadWritePaths= writable, PrivateTmp= and ProtectHome= as empty
    tmpfs.  Then the daemon can write only where its unit lets it."""
    assert unit.get("ProtectSystem") == "strict", unit.get("ProtectSystem")
    rw = []
    for path in unit.get("ReadWritePaths", "").split():
        optional = path.startswith("-")
        path = path.removeprefix("-")
        assert optional or os.path.isdir(path), f"ReadWritePaths={path} missing"
        if os.path.isdir(path):
            rw.append(path)
    lines = [f"mount --bind {shlex.quote(p)} {shlex.quote(p)}" for p in rw]
    private = []
    if unit.get("PrivateTmp") == "yes":
        private += ["/tmp", "/var/tmp"]
        lines += [f"mount -t tmpfs -o mode=1777 tmpfs {d}" for d in ("/tmp", "/var/tmp")]
    if unit.get("ProtectHome") == "yes":
        for home in ("/home", "/root", "/run/user"):
            if os.path.isdir(home):
                private.append(home)
                lines.append(f"mount -t tmpfs -o mode=0755,ro tmpfs {home}")
    keep = " | ".join(shlex.quote(p) for p in (*rw, *private)) or "''"
    lines += [
        "mount -o remount,bind,ro /",
        "awk '{print $2}' /proc/self/mounts | while read -r m; do",
        "  case \"$m\" in /|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac",
        f"  case \"$m\" in {keep}) continue ;; esac",
        "  mount -o remount,bind,ro \"$m\" 2>/dev/null || true",
        "done",
        '[ -z "${LISTEN_FDS:-}" ] || export LISTEN_PID=$$',
        'exec "$@"',
    ]
    return "\n".join(lines)


class Daemon:
    """One daemon started as its installed unit would start it."""

    def __init__(self, name: str, notify_dir: Path,
                 listen: tuple[str, int] | None = None) -> None:
        unit = unit_service(f"{name}.service")
        self.argv = shlex.split(unit["ExecStart"])
        assert self.argv[0] == f"/usr/bin/{name}", unit["ExecStart"]
        self.user, self.group = unit["User"], unit["Group"]
        self.sock_path = notify_dir / f"{name}.notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock_path.chmod(0o666)
        # closed in stop()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        setpriv = ["setpriv", f"--reuid={self.user}", f"--regid={self.group}", "--init-groups"]
        if unit.get("NoNewPrivileges") == "yes":
            setpriv.append("--no-new-privs")
        env = {**ENV, "LANG": "C.UTF-8", "NOTIFY_SOCKET": str(self.sock_path)}
        # Socket activation, where the package ships NAME.socket: the listening
        # socket as fd 3, LISTEN_FDS=1 and LISTEN_PID (set by the script below,
        # in the process that execs the daemon).  Its address is the test's.
        self.listener: socket.socket | None = None
        if listen is not None:
            self.listener = socket.create_server(listen, backlog=1024)
            env["LISTEN_FDS"] = "1"
            lfd = self.listener.fileno()
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-euc",
             sandbox(unit), "sandbox", *setpriv, "--", *self.argv],
            cwd="/", stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True,
            umask=int(unit.get("UMask", "0022"), 8), env=env,
            pass_fds=(3,) if self.listener else (),
            preexec_fn=(lambda: os.dup2(lfd, 3)) if self.listener else None)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.argv[0]} exited:\n{self.output()}"
            self.sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                if b"READY=1" in self.sock.recv(4096).split(b"\n"):
                    return
        raise AssertionError(f"{self.argv[0]}: no READY=1 in {timeout} s\n{self.output()}")

    def uid_gid(self) -> tuple[str, str]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        uid = next(line.split()[1] for line in status if line.startswith("Uid:"))
        gid = next(line.split()[1] for line in status if line.startswith("Gid:"))
        return uid, gid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.sock.close()
        self.log.close()
        if self.listener:
            self.listener.close()


def stock_postfix(pfdir: Path, base: int, sink_port: int, stack_dir: Path) -> str:
    """A Postfix instance whose main.cf is what Debian's postinst writes (main.cf.debian,
    main.cf.tls, its postconf -e settings), in its own directories; returns the log path."""
    spool, data = stack_dir / "pkg-postfix" / "spool", stack_dir / "pkg-postfix" / "data"
    for d in (pfdir, spool, data):
        d.mkdir(parents=True, exist_ok=True)
    shutil.chown(data, "postfix", "postfix")
    main = Path("/usr/share/postfix/main.cf.debian").read_text()
    main += Path("/usr/share/postfix/main.cf.tls").read_text()
    (pfdir / "main.cf").write_text(main)
    shutil.copy("/usr/share/postfix/master.cf.dist", pfdir / "master.cf")
    log = f"/var/log/postkeep-pkgtest-{base}.log"
    pc = ("postconf", "-c", str(pfdir))
    run(*pc, "-e",  # Debian's postinst (non-interactive "Internet Site")
        "smtpd_relay_restrictions=permit_mynetworks permit_sasl_authenticated"
        " defer_unauth_destination",
        "myhostname=pkgtest.localdomain", "alias_maps=hash:/etc/aliases",
        "alias_database=hash:/etc/aliases",
        "mydestination=$myhostname, pkgtest.localdomain, localhost",
        "relayhost=", "mynetworks=127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128",
        "mailbox_size_limit=0", "recipient_delimiter=+",
        "inet_interfaces=all", "inet_protocols=all")
    # this instance's own directories and log (any second instance needs these)
    run(*pc, "-e", f"queue_directory={spool}", f"data_directory={data}",
        f"syslog_name=postfix-pkgtest-{base}", f"maillog_file={log}")
    return log


def finish_instance(pfdir: Path, base: int, sink_port: int) -> None:
    """After `postkeep postfix apply`: loopback only, a listener on a test port, the sink."""
    pc = ("postconf", "-c", str(pfdir))
    run(*pc, "-e", "inet_interfaces=loopback-only", "inet_protocols=ipv4",
        f"relayhost=[127.0.0.1]:{sink_port}", "smtp_tls_security_level=none",
        "smtpd_tls_security_level=none")
    run(*pc, "-F", "*/*/chroot = n")  # no copies of /etc files in a chroot
    run(*pc, "-MX", "smtp/inet")
    run(*pc, "-M", f"127.0.0.1:{base + 6}/inet = 127.0.0.1:{base + 6} inet n - n - - smtpd")
    alt = run("postconf", "-h", "alternate_config_directories").stdout.strip()
    if str(pfdir) not in alt.replace(",", " ").split():
        run("postconf", "-e", f"alternate_config_directories={alt + ', ' if alt else ''}{pfdir}")


def test_daemons_run_as_their_units_and_mail_lands(package: Package, stack: Stack) -> None:
    base = stack.smtp[1] + 15
    sink_port = stack.smtp[1] + 1
    stack_dir = Path(stack.env["POSTKEEP_STACK_DIR"])
    pfdir = stack_dir / "pkg-postfix" / "etc"
    shipped = CONFIG.read_bytes()
    # not under /tmp: PrivateTmp= hides it from the daemons
    notify_dir = Path(tempfile.mkdtemp(prefix="postkeep-notify-", dir="/run"))
    notify_dir.chmod(0o711)
    daemons: list[Daemon] = []
    try:
        write_config(stack, base, pfdir)
        log = stock_postfix(pfdir, base, sink_port, stack_dir)
        # the admin's step, with the installed CLI and the packaged bundle
        env = dict(ENV)
        out = run("/usr/bin/postkeep", "--config", str(CONFIG), "postfix", "apply", cwd="/",
                  env=env)
        assert f"inet:127.0.0.1:{base}" in run("postconf", "-c", str(pfdir), "-h",
                                               "smtpd_milters").stdout, out.stdout
        finish_instance(pfdir, base, sink_port)
        run("/usr/bin/postkeep", "--config", str(CONFIG), "db", "migrate", cwd="/", env=env)

        # the sandbox holds: as root even, only the unit's ReadWritePaths are writable
        milter_unit = unit_service("postkeep-milter.service")
        probe = run("unshare", "--mount", "--propagation", "private", "--", "sh", "-euc",
                    sandbox(milter_unit), "sandbox", "sh", "-c",
                    "touch /var/spool/postkeep/probe && rm /var/spool/postkeep/probe"
                    " && ! touch /opt/postkeep/probe 2>/dev/null"
                    " && ! touch /etc/postkeep/probe 2>/dev/null"
                    " && ! ls /root/.pyenv >/dev/null 2>&1 && echo sandboxed")
        assert probe.stdout.strip() == "sandboxed", probe
        test_listen = {"postkeep-policyd": ("127.0.0.1", base + 2)}  # the config's ports
        for name in DAEMONS:
            activated = (UNIT_DIR / f"{name}.socket").exists()
            assert not activated or name in test_listen, f"{name}.socket: add its test port"
            daemons.append(Daemon(name, notify_dir, test_listen[name] if activated else None))
        uid = run("id", "-u", "postkeep").stdout.strip()
        gid = run("id", "-g", "postkeep").stdout.strip()
        for d in daemons:
            d.wait_ready()
            assert d.uid_gid() == (uid, gid), d.argv
            assert os.readlink(f"/proc/{d.proc.pid}/cwd") == "/"

        run("postfix", "-c", str(pfdir), "check")
        subprocess.run(["postfix", "-c", str(pfdir), "stop"], capture_output=True, timeout=60)
        run("postfix", "-c", str(pfdir), "start")
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", base + 6), 2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"no smtpd on {base + 6}; see {log}"
                time.sleep(0.2)

        _, domain = stack.new_org()
        token = uuid.uuid4().hex
        sender = f"admin@{domain}"
        data = (f"From: {sender}\r\nTo: r@sink.test\r\nSubject: package\r\n"
                f"X-Test-Token: {token}\r\n\r\nthrough the installed package\r\n").encode()
        reply = smtp.send("127.0.0.1", base + 6, sender, ["r@sink.test"], data)
        assert reply.queue_id, f"{reply.text}; see {log}"
        with stack.connect() as conn:
            rows = conn.execute("SELECT object_key, size FROM messages"
                                " WHERE queue_id = %s AND envelope_from = %s",
                                (reply.queue_id, sender)).fetchall()
        assert len(rows) == 1, rows
        delivered = strip_received(stack.sink_copy(token))
        assert stack.restored(rows[0][0]) == delivered
        assert rows[0][1] == len(delivered)
        for d in daemons:
            assert d.proc.poll() is None, f"{d.argv[0]} died:\n{d.output()}"
    finally:
        for d in daemons:
            d.stop()
        subprocess.run(["postfix", "-c", str(pfdir), "stop"], capture_output=True, timeout=60)
        CONFIG.write_bytes(shipped)
        shutil.rmtree(notify_dir, ignore_errors=True)


def test_purge_removes_what_it_created_and_nothing_else(package: Package) -> None:
    run(*APT, "purge", "postkeep", env=ENV)
    assert not installed()
    left = [p for p in (*SHIPPED, *CREATED, "/opt/postkeep", "/run/postkeep")
            if os.path.lexists(p)]
    assert not left, f"left after purge: {left}"
    assert os.path.lexists(SPOOL) == package.had_spool, "purge and /var/spool/postkeep"
    assert accounts() == package.before, "purge did not restore /etc/passwd and /etc/group"
    # the host's Postfix as it was (but for the test instance's registration)
    for name, text in package.host_postfix.items():
        assert host_postfix(name) == text, f"/etc/postfix/{name} changed"
