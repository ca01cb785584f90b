"""Scale-out past one machine: two real haraka_tw processes behind a real HAProxy.

docs/scaling.md's HAProxy config, C{docs/examples/haproxy-scaling.cfg}, runs as it is,
after a C{global} section that sends HAProxy's own log to its output (the guide keeps
Debian's). HAProxy fills in its C{"${SMTP_BIND}"}, C{"${MX1}"} and C{"${MX2}"} from the
environment the test gives it.

Each instance is a C{twistd -n haraka} process with a config directory and a Maildir of
its own (C{me} is C{mx1.test} or C{mx2.test}). Each trusts HAProxy's 127.0.0.1 for the
PROXY protocol (connection.ini C{[haproxy] hosts}) and loads the guide's
C{quiet_checks:QuietHealthChecks} and the L{Witness} plugin below. Clients connect to
HAProxy from 127.0.0.2 and 127.0.0.3 (all of 127.0.0.0/8 is loopback on Linux), never
from HAProxy's address. A loopback DNS server holds PTR records for those two addresses
only, so a Received header that names a client proves the reverse lookup was of the real
client, not of the proxy.
"""

from __future__ import annotations

import json
import mailbox
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from email.parser import BytesHeaderParser
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from zope.interface import implementer

from haraka_tw.codes import CONT
from haraka_tw.interfaces import IConnectHook, IDataPostHook
from tests.dnsserver import DNSServer
from tests.haproxy import HAProxy, SourcedClient, haproxy_path, listening, v1_header, v2_header
from tests.support import (
    REPO_ROOT,
    TWISTD,
    free_port,
    reply_code,
    spawn_twistd,
    temp_dir,
    write_config,
)

HAPROXY_CONFIG = REPO_ROOT / "docs" / "examples" / "haproxy-scaling.cfg"
EXAMPLES = REPO_ROOT / "docs" / "examples"
NO_HAPROXY = "haproxy is not installed (scripts/system-packages.sh installs it)"

# HAProxy's own log lines (option tcplog) go to its output, which the harness keeps.
TEST_GLOBAL = "global\n    log stdout format raw local0\n\n"
PROXY_IP = "127.0.0.1"  # HAProxy's address as the instances see it
CLIENTS = {"127.0.0.2": "client-a.scaling.test", "127.0.0.3": "client-b.scaling.test"}
STRANGER_IP = "127.0.0.4"  # connects to an instance directly; not a trusted proxy
FORGED_IP = "192.0.2.66"  # the address a forged PROXY header claims
ZONE = "".join(
    f"{ip.split('.')[3]}.0.0.127.in-addr.arpa. 300 IN PTR {name}.\n" for ip, name in CLIENTS.items()
)
WITNESS_FILE = "witness.jsonl"  # in each instance's working directory
MESSAGES = 20


@implementer(IConnectHook, IDataPostHook)
class Witness:
    """What a plugin sees: each connect (the client's address and port, the proxy's, and
    whether the PROXY header named a client) is appended to C{witness.jsonl} in the
    working directory; each message gets an C{X-Witness} header with the same."""

    def hook_connect(self, connection: Any) -> Any:
        header = connection.notes.get("proxy") or {}
        record = {
            "remote": [connection.remote.ip, connection.remote.port],
            "proxy_ip": header.get("proxy_ip"),
            "check": bool(header) and header.get("src_ip") is None,
        }
        with open(WITNESS_FILE, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        return CONT

    def hook_data_post(self, connection: Any) -> Any:
        remote, header = connection.remote, connection.notes.get("proxy") or {}
        connection.transaction.add_header(
            "X-Witness", f"remote={remote.ip}:{remote.port} proxy={header.get('proxy_ip')}"
        )
        return CONT


class Instance:
    """One C{twistd -n haraka} process: config directory, Maildir, log, port."""

    def __init__(self, case: unittest.TestCase, name: str, dns_port: int) -> None:
        self.name = name
        self.base = temp_dir(case)
        self.port = free_port()
        self.maildir = self.base / "maildir"
        self.log_path = self.base / "twistd.out"
        write_config(
            self.base / "config",
            {
                "smtp.ini": f"[main]\nlisten=127.0.0.1:{self.port}\n",
                "connection.ini": f"[haproxy]\nhosts[]={PROXY_IP}\n",
                "plugins": "quiet_checks:QuietHealthChecks\n"
                "tests.e2e.test_scaling:Witness\n"
                "rcpt_to.in_host_list\n"
                "queue/maildir\n",
                "maildir.ini": f"[main]\npath={self.maildir}\nfsync=false\n",
                "outbound.ini": f"[main]\nqueue_dir={self.base / 'queue'}\ndisabled=true\n",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{dns_port}\ntimeout=2\nattempts=1\n",
                "me": f"{name}.test\n",
            },
        )
        self.proc: subprocess.Popen[bytes] | None = None
        case.addCleanup(self.kill)

    @property
    def address(self) -> str:
        """Where HAProxy reaches this instance."""
        return f"127.0.0.1:{self.port}"

    def spawn(self) -> None:
        self.proc = spawn_twistd(
            ["-n", "--pidfile="], self.base / "config", self.base, self.log_path, [EXAMPLES]
        )

    def wait_listening(self, timeout: float = 20) -> None:
        # From /proc/net/tcp: a probe connection from 127.0.0.1 would be a trusted proxy
        # that never sends its header.
        deadline = time.monotonic() + timeout
        while not listening("127.0.0.1", self.port):
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not listen:\n{self.output()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (graceful: the listener closes first), and wait for the exit."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        assert code in (0, -signal.SIGTERM), f"{self.name} exited {code}:\n{self.output()}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stored(self) -> list[bytes]:
        if not self.maildir.is_dir():
            return []
        box = mailbox.Maildir(str(self.maildir), create=False)
        return [box.get_bytes(key) for key in sorted(box.keys())]

    def witnessed(self) -> list[dict[str, Any]]:
        try:
            text = (self.base / WITNESS_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines()]


def poll(condition: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """Call C{condition} until it returns something true; that value, or None at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def send(port: int, n: int, source_ip: str) -> tuple[str, int]:
    """Message C{n} through HAProxy from C{source_ip}; the client's (ip, port)."""
    message = (
        f"From: <alice@x.test>\r\nTo: <bob@example.com>\r\nSubject: message {n}\r\n"
        f"Message-ID: <{n}@scaling.test>\r\n\r\nMessage number {n}.\r\n"
    ).encode()
    with smtplib.SMTP(
        "127.0.0.1",
        port,
        local_hostname=f"helo-{source_ip}.test",
        timeout=10,
        source_address=(source_ip, 0),
    ) as smtp:
        address = smtp.sock.getsockname()
        refused = smtp.sendmail("alice@x.test", ["bob@example.com"], message)
    assert refused == {}, refused
    return str(address[0]), int(address[1])


def headers(message: bytes) -> Any:
    """The header fields of a stored message."""
    return BytesHeaderParser().parsebytes(message)


class ScaleOutTests(unittest.TestCase):
    """Two instances behind HAProxy with the guide's config, PROXY v2 and round robin."""

    if haproxy_path() is None:
        skip = NO_HAPROXY
    if not TWISTD.exists():
        skip = f"no twistd next to {sys.executable}"

    def setUp(self) -> Deferred[None]:
        self.dns = DNSServer(ZONE)
        dns_port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.mx = [Instance(self, name, dns_port) for name in ("mx1", "mx2")]
        return deferToThread(self.start_world)

    def start_world(self) -> None:
        for instance in self.mx:
            instance.spawn()
        for instance in self.mx:
            instance.wait_listening()
        self.frontend_port = free_port()
        self.haproxy = HAProxy(
            [],
            config=TEST_GLOBAL + HAPROXY_CONFIG.read_text(encoding="utf-8"),
            environment={
                "SMTP_BIND": f"127.0.0.1:{self.frontend_port}",
                "MX1": self.mx[0].address,
                "MX2": self.mx[1].address,
            },
            listen_port=self.frontend_port,
        )
        self.haproxy.start()
        self.addCleanup(self.haproxy.stop)

    def send_many(self, count: int, first: int = 0) -> dict[int, tuple[str, int]]:
        """Messages C{first} .. through HAProxy, one session each, clients alternating."""
        ips = sorted(CLIENTS)
        return {
            n: send(self.frontend_port, n, ips[n % len(ips)]) for n in range(first, first + count)
        }

    def by_number(self, instance: Instance) -> dict[int, bytes]:
        """The messages an instance stored, by the number in their Subject; none twice."""
        found: dict[int, bytes] = {}
        for message in instance.stored():
            n = int(headers(message)["Subject"].split()[-1])
            self.assertNotIn(n, found, f"message {n} stored twice by {instance.name}")
            found[n] = message
        return found

    def assert_stored_once(self, sent: dict[int, tuple[str, int]]) -> dict[str, dict[int, bytes]]:
        """Every message sent is in exactly one Maildir, and nothing else is."""
        stored = {instance.name: self.by_number(instance) for instance in self.mx}
        numbers = [n for found in stored.values() for n in found]
        self.assertEqual(sorted(numbers), sorted(sent))
        return stored

    def assert_seen_as_client(
        self, instance: Instance, message: bytes, client: tuple[str, int]
    ) -> None:
        """The Received header (with the PTR of the client's address) and the plugin's
        X-Witness name the real client and the instance, never HAProxy."""
        fields = headers(message)
        received = " ".join(fields.get_all("Received")[0].split())
        ip, port = client
        self.assertRegex(
            received,
            rf"^from helo-{re.escape(ip)}\.test \({re.escape(CLIENTS[ip])} \[{re.escape(ip)}\]\)"
            rf" by {instance.name}\.test ",
        )
        self.assertEqual(fields["X-Witness"], f"remote={ip}:{port} proxy={PROXY_IP}")

    def test_mail_is_spread_and_each_instance_sees_the_real_client(self) -> Deferred[None]:
        """20 messages from 127.0.0.2 and .3: each stored once, 10 per instance (round
        robin); Received, plugins and the log show the client; health checks ran, quietly."""

        def scenario() -> None:
            sent = self.send_many(MESSAGES)
            stored = self.assert_stored_once(sent)
            self.assertEqual(
                {name: len(found) for name, found in stored.items()},
                {"mx1": MESSAGES // 2, "mx2": MESSAGES // 2},
            )
            for instance in self.mx:
                for n, message in stored[instance.name].items():
                    self.assert_seen_as_client(instance, message, sent[n])
            # HAProxy checks every 2 s; wait for one check of each instance.
            for instance in self.mx:
                checks = poll(
                    lambda i=instance: [w for w in i.witnessed() if w["check"]], timeout=6
                )
                self.assertTrue(checks, f"no health check reached {instance.name}")
                self.assertEqual(checks[0]["remote"][0], PROXY_IP)
                clients = [w["remote"] for w in instance.witnessed() if not w["check"]]
                self.assertEqual(
                    sorted(map(tuple, clients)),
                    sorted(sent[n] for n in stored[instance.name]),
                )
                self.assert_log_names_clients(instance, len(stored[instance.name]))

        return deferToThread(scenario)

    def assert_log_names_clients(self, instance: Instance, sessions: int) -> None:
        """One 'PROXY v2 ... client' line and one disconnect line per client session, each
        naming the client; no line for a health check (quiet_checks). (The log is written
        in batches: the last session's lines may come a moment after its reply.)"""
        poll(lambda: len(re.findall(r"\[core\] disconnect ", instance.output())) >= sessions, 5)
        log = instance.output()
        proxied = re.findall(rf"PROXY v2 from {re.escape(PROXY_IP)}: client (\S+)", log)
        disconnects = re.findall(r"\[core\] disconnect ip=(\S+)", log)
        self.assertEqual(len(proxied), sessions, log)
        self.assertEqual(len(disconnects), sessions, log)
        self.assertLessEqual(set(proxied) | set(disconnects), set(CLIENTS), log)
        self.assertNotIn("haproxy.example.net", log)  # the checks' EHLO name

    def test_proxy_header_from_anyone_else_is_refused(self) -> Deferred[None]:
        """A PROXY header straight from 127.0.0.4 (v1 or v2), or one a client sends
        through HAProxy, gets 421 and the close; the forged address is never used."""

        def refused(port: int, source_ip: str, header: bytes) -> None:
            with SourcedClient(port, source_ip=source_ip) as c:
                self.assertEqual(reply_code(c.banner), 220, c.banner)
                c.send(header)
                text = c.quiet(5).decode("ascii", "replace")  # returns early at the close
                self.assertTrue(c.at_eof(1), f"not closed after {text!r}")
                finals = [line for line in text.split("\r\n") if line[3:4] == " "]
                self.assertTrue(finals and finals[-1].startswith("421 "), text)

        def scenario() -> None:
            forged = (FORGED_IP, 1000)
            for instance in self.mx:
                refused(instance.port, STRANGER_IP, v1_header(forged, ("127.0.0.1", 25)))
                refused(instance.port, STRANGER_IP, v2_header(forged, ("127.0.0.1", 25)))
            refused(self.frontend_port, "127.0.0.2", v1_header(forged, ("127.0.0.1", 25)))
            refused(self.frontend_port, "127.0.0.3", v2_header(forged, ("127.0.0.1", 25)))
            for instance in self.mx:
                seen = {w["remote"][0] for w in instance.witnessed()}
                self.assertNotIn(FORGED_IP, seen)
                self.assertIn(STRANGER_IP, seen)  # the stranger stayed the client
                self.assertNotIn(FORGED_IP, instance.output())
                self.assertEqual(instance.stored(), [])
            # HAProxy's header went first, so the client was known before its own line.
            through = {w["remote"][0] for i in self.mx for w in i.witnessed() if not w["check"]}
            self.assertEqual(through, {STRANGER_IP, *CLIENTS})

        return deferToThread(scenario)

    def test_a_stopped_instance_leaves_the_mail_to_the_other(self) -> Deferred[None]:
        """mx2 stopped: every message still gets through, to mx1, at once (redispatch);
        then the health check marks mx2 down."""

        def scenario() -> None:
            sent = self.send_many(4)
            self.mx[1].stop()
            started = time.monotonic()
            sent.update(self.send_many(10, first=4))
            self.assertLess(time.monotonic() - started, 5)  # no client waited on mx2
            stored = self.assert_stored_once(sent)
            # Round robin gave mx2 two of the first four; everything after went to mx1.
            self.assertEqual(len(stored["mx2"]), 2)
            self.assertLessEqual(set(stored["mx2"]), set(range(4)))
            self.assertLessEqual(set(range(4, 14)), set(stored["mx1"]))
            for n, message in stored["mx1"].items():
                self.assert_seen_as_client(self.mx[0], message, sent[n])
            down = poll(lambda: "Server haraka_tw/mx2 is DOWN" in self.haproxy.output(), 10)
            self.assertTrue(down, self.haproxy.output())

        return deferToThread(scenario)
