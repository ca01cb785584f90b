"""queue/smtp_forward over real loopback sockets: smtplib -> haraka_tw -> a scripted peer."""

from __future__ import annotations

import smtplib
import socket
import time
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw.interfaces import IConnectHook
from haraka_tw.logging import Level
from haraka_tw.outbound.mx import MXHost
from haraka_tw.outbound.queue import QueueEntry
from haraka_tw.plugins.queue.smtp_forward import mx_from_url, read_routes
from haraka_tw.smtp.state import Notes
from tests.smtp_peers import Peer, PeerScript, certs
from tests.support import start_server

BODY = b"From: <alice@client.test>\r\nSubject: hi\r\n\r\nHello.\r\n.leading dot\r\n..two\r\nend\r\n"
PLUGINS = "rcpt_to.in_host_list\nqueue/smtp_forward\n"
HOSTS = "example.com\nother.test\n"

Exchange = tuple[tuple[int, bytes], list[tuple[int, bytes]], tuple[int, bytes] | None]


def exchange(port: int, rcpts: list[str], sender: str = "alice@client.test") -> Exchange:
    """One transaction with smtplib (in a thread): the MAIL, RCPT and DATA replies."""
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("client.test")
        mail = s.mail(sender)
        replies = [s.rcpt(r) for r in rcpts]
        data = s.data(BODY) if any(code == 250 for code, _ in replies) else None
        return mail, replies, data


def check_arrived(case: Any, data: bytes) -> None:
    """The peer got our Received header and then the client's message, unchanged."""
    case.assertTrue(data.startswith(b"Received: from "), data[:40])
    case.assertTrue(data.endswith(b"\r\n" + BODY))
    head = data[: -len(BODY)]
    case.assertNotIn(b"\r\n\r\n", head)


class ForwardCase(TestCase):
    """Start peers and a server forwarding to them."""

    def peer(self, **script: Any) -> tuple[Peer, int]:
        peer = Peer(PeerScript(**script))
        port = peer.start()
        self.addCleanup(peer.stop)
        return peer, port

    def server(self, ini: str, plugins: str = PLUGINS, **files: str) -> Any:
        server, port = start_server(
            self, {"plugins": plugins, "host_list": HOSTS, "smtp_forward.ini": ini, **files}
        )
        self.server_port = port
        return server

    async def send(self, rcpts: list[str], sender: str = "alice@client.test") -> Exchange:
        result: Exchange = await deferToThread(exchange, self.server_port, rcpts, sender)
        return result

    async def queued(self, server: Any) -> list[QueueEntry]:
        entries: list[QueueEntry] = await server.outbound.queue.scan()
        return entries


class ForwardTests(ForwardCase):
    async def test_byte_exact_and_250_after_the_peer(self) -> None:
        """The message reaches the next hop byte-exact with its envelope; then the 250."""
        peer, port = self.peer()
        self.server(f"[main]\nhost=127.0.0.1\nport={port}\n")
        _, rcpts, data = await self.send(["bob@example.com", "carol@example.com"])
        self.assertEqual([c for c, _ in rcpts], [250, 250])
        assert data is not None
        self.assertEqual(data[0], 250)
        [message] = peer.messages
        self.assertEqual(message.mail_from, "alice@client.test")
        self.assertEqual(message.rcpt_to, ["bob@example.com", "carol@example.com"])
        check_arrived(self, message.data)
        self.assertIn(b"\r\n..leading dot\r\n", message.raw)  # dot-stuffed on the wire
        self.assertFalse(message.tls)

    async def test_permanent_refusal_is_our_5xx(self) -> None:
        """A 5xx to the message at the next hop is the client's 5xx, with its text."""
        _, port = self.peer(replies={"DOT": ["554 5.7.1 Looks like spam"]})
        self.server(f"[main]\nhost=127.0.0.1\nport={port}\n")
        _, _, data = await self.send(["bob@example.com"])
        self.assertEqual(data, (554, b"5.7.1 Looks like spam"))

    async def test_temporary_refusal_is_our_4xx(self) -> None:
        """A 4xx to MAIL at the next hop is the client's 4xx, with its text."""
        peer, port = self.peer(replies={"MAIL": ["452 4.3.1 Insufficient storage"]})
        self.server(f"[main]\nhost=127.0.0.1\nport={port}\n")
        _, _, data = await self.send(["bob@example.com"])
        self.assertEqual(data, (452, b"4.3.1 Insufficient storage"))
        self.assertEqual(peer.messages, [])

    async def test_next_hop_down_is_451(self) -> None:
        """No next hop to talk to: 451 4.4.1, try again later (never a 250)."""
        peer, port = self.peer()
        await peer.stop()
        server = self.server(f"[main]\nhost=127.0.0.1\nport={port}\n")
        warned: list[str] = []
        server.log.hook = lambda c, r: (r.level == Level.WARN and warned.append(r.message)) or True
        _, _, data = await self.send(["bob@example.com"])
        assert data is not None
        self.assertEqual(data[0], 451)
        self.assertIn(b"try again later", data[1])
        (line,) = warned  # the operator sees why, at WARN
        self.assertIn(f"next hop 127.0.0.1:{port} [127.0.0.1]: ", line)

    async def test_host_pool_tried_in_order(self) -> None:
        """forwarding_host_pool: a host that is down is skipped for the next one."""
        dead, dead_port = self.peer()
        await dead.stop()
        peer, port = self.peer()
        self.server(f"[main]\nforwarding_host_pool=127.0.0.1:{dead_port}, 127.0.0.1:{port}\n")
        _, _, data = await self.send(["bob@example.com"])
        assert data is not None
        self.assertEqual(data[0], 250)
        self.assertEqual(len(peer.messages), 1)

    async def test_a_host_that_never_greets_gives_way_to_the_next(self) -> None:
        """forwarding_host_pool: a host that takes the connection but never greets is given
        connect_timeout for its greeting too, then the next host is tried, well within the
        queue hook's timeout."""
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)  # (the kernel completes the handshake; nothing ever answers)
        self.addCleanup(silent.close)
        peer, port = self.peer()
        pool = f"127.0.0.1:{silent.getsockname()[1]}, 127.0.0.1:{port}"
        self.server(f"[main]\nforwarding_host_pool={pool}\nconnect_timeout=1\n")
        started = time.monotonic()
        _, _, data = await self.send(["bob@example.com"])
        assert data is not None
        self.assertEqual(data[0], 250)
        self.assertEqual(len(peer.messages), 1)
        self.assertLess(time.monotonic() - started, 10)

    async def test_every_recipient_refused_is_5xx(self) -> None:
        """Every recipient refused at RCPT by the next hop: the message is refused 5xx."""
        _, port = self.peer(replies={"RCPT": ["550 5.1.1 No such user"]})
        self.server(f"[main]\nhost=127.0.0.1\nport={port}\n")
        _, _, data = await self.send(["bob@example.com", "carol@example.com"])
        self.assertEqual(data, (550, b"5.1.1 No such user"))


class RoutingTests(ForwardCase):
    async def test_split_per_domain_route(self) -> None:
        """Recipients of two routes: one delivery to each next hop, one 250."""
        main, main_port = self.peer()
        other, other_port = self.peer()
        self.server(
            f"[main]\nhost=127.0.0.1\nport={main_port}\n"
            f"[other.test]\nhost=127.0.0.1\nport={other_port}\n"
        )
        _, _, data = await self.send(["bob@example.com", "dan@other.test", "eve@example.com"])
        assert data is not None
        self.assertEqual(data[0], 250)
        self.assertEqual(
            [m.rcpt_to for m in main.messages], [["bob@example.com", "eve@example.com"]]
        )
        self.assertEqual([m.rcpt_to for m in other.messages], [["dan@other.test"]])
        check_arrived(self, other.messages[0].data)

    async def test_queue_lmtp_speaks_lmtp(self) -> None:
        """queue=lmtp: the next hop is spoken to with LHLO and answers per recipient."""
        peer, port = self.peer(lmtp=True)
        self.server(f"[main]\nhost=127.0.0.1\nport={port}\nqueue=lmtp\n")
        _, _, data = await self.send(["bob@example.com"])
        assert data is not None
        self.assertEqual(data[0], 250)
        self.assertIn("C: LHLO mx.test", peer.transcript)

    async def test_check_recipient_accepts_configured_domains(self) -> None:
        """check_recipient: a domain with a section is accepted without any rcpt plugin."""
        peer, port = self.peer()
        self.server(
            f"[main]\nhost=127.0.0.1\nport={port}\ncheck_recipient=true\n[routed.test]\n",
            plugins="queue/smtp_forward\n",
        )
        _, rcpts, data = await self.send(["bob@routed.test", "bob@elsewhere.test"])
        self.assertEqual([c for c, _ in rcpts], [250, 550])
        assert data is not None
        self.assertEqual(data[0], 250)
        self.assertEqual(peer.messages[0].rcpt_to, ["bob@routed.test"])

    async def test_check_sender_refuses_spoofed_local_sender(self) -> None:
        """check_sender: a sender in a local domain from a non-relaying client is refused."""
        _, port = self.peer()
        self.server(f"[main]\nhost=127.0.0.1\nport={port}\ncheck_sender=true\n[example.com]\n")
        mail, _, _ = await self.send(["bob@example.com"], sender="mallory@example.com")
        self.assertEqual(mail, (550, b"5.7.1 Spoofed MAIL FROM"))


class SecurityTests(ForwardCase):
    async def test_starttls_to_next_hop(self) -> None:
        """enable_tls: STARTTLS when the next hop offers it."""
        peer, port = self.peer(starttls=True)
        self.server(f"[main]\nhost=127.0.0.1\nport={port}\nenable_tls=true\n")
        await self.send(["bob@example.com"])
        self.assertTrue(peer.messages[0].tls)

    async def test_tls_verify_accepts_a_trusted_certificate(self) -> None:
        """tls_verify with the CA that signed the next hop's certificate: delivered."""
        peer, port = self.peer(starttls=True)
        ini = f"[main]\nhost=127.0.0.1\nport={port}\ntls_verify=true\ntls_ca_file={certs().ca}\n"
        self.server(ini)
        _, _, data = await self.send(["bob@example.com"])
        assert data is not None
        self.assertEqual(data[0], 250)
        self.assertTrue(peer.messages[0].tls)

    async def test_tls_verify_refuses_an_untrusted_certificate(self) -> None:
        """tls_verify and a self-signed certificate: nothing sent, the client gets 4xx."""
        peer, port = self.peer(starttls=True, selfsigned=True)
        ini = f"[main]\nhost=127.0.0.1\nport={port}\ntls_verify=true\ntls_ca_file={certs().ca}\n"
        self.server(ini)
        _, _, data = await self.send(["bob@example.com"])
        assert data is not None
        self.assertEqual(data[0], 451)
        self.assertEqual(peer.messages, [])

    async def test_auth_to_next_hop(self) -> None:
        """auth_user/auth_pass: the next hop sees the message from that user, over TLS."""
        peer, port = self.peer(starttls=True, auth=("PLAIN", "LOGIN"))
        self.server(
            f"[main]\nhost=127.0.0.1\nport={port}\nenable_tls=true\n"
            "auth_type=plain\nauth_user=user\nauth_pass=secret\n"
        )
        await self.send(["bob@example.com"])
        [message] = peer.messages
        self.assertEqual((message.auth_user, message.tls), ("user", True))


class PartialTests(ForwardCase):
    async def test_refused_recipient_gets_a_dsn(self) -> None:
        """One recipient refused 5xx, one accepted: 250, and a DSN queued to the sender."""
        peer, port = self.peer(rcpt={"carol@example.com": "550 5.1.1 No such user"})
        server = self.server(f"[main]\nhost=127.0.0.1\nport={port}\n")
        _, _, data = await self.send(["bob@example.com", "carol@example.com"])
        assert data is not None
        self.assertEqual(data[0], 250)
        self.assertEqual(peer.messages[0].rcpt_to, ["bob@example.com"])
        [dsn] = await self.queued(server)
        self.assertEqual(dsn.todo.mail_from, "")
        self.assertEqual([r.address for r in dsn.todo.rcpt_to], ["alice@client.test"])
        text = b"".join(server.outbound.queue.load_message(dsn))
        self.assertIn(b"Final-Recipient: rfc822; carol@example.com", text)
        self.assertIn(b"5.1.1 No such user", text)

    async def test_deferred_recipient_is_queued_for_the_same_route(self) -> None:
        """One recipient deferred, one accepted: 250, and the deferred one queued here."""
        _, port = self.peer(rcpt={"carol@example.com": "452 4.2.2 Mailbox full"})
        server = self.server(f"[main]\nhost=127.0.0.1\nport={port}\n")
        _, _, data = await self.send(["bob@example.com", "carol@example.com"])
        assert data is not None
        self.assertEqual(data[0], 250)
        [entry] = await self.queued(server)
        self.assertEqual([r.address for r in entry.todo.rcpt_to], ["carol@example.com"])
        self.assertEqual(entry.todo.notes["queue"]["wants"], "smtp_forward")
        check_arrived(self, b"".join(server.outbound.queue.load_message(entry)))

    async def test_every_recipient_deferred_is_4xx(self) -> None:
        """Every recipient deferred: 4xx for the message, nothing queued here."""
        _, port = self.peer(replies={"RCPT": ["451 4.3.0 Try later"]})
        server = self.server(f"[main]\nhost=127.0.0.1\nport={port}\n")
        _, _, data = await self.send(["bob@example.com"])
        self.assertEqual(data, (451, b"4.3.0 Try later"))
        self.assertEqual(await self.queued(server), [])


class OutboundTests(ForwardCase):
    relaying = "tests.plugins.queue.test_smtp_forward:Relaying\n"

    async def test_relayed_mail_forwarded_with_enable_outbound(self) -> None:
        """enable_outbound=true: relayed mail (queue_outbound) is forwarded too."""
        peer, port = self.peer()
        ini = f"[main]\nhost=127.0.0.1\nport={port}\nenable_outbound=true\n"
        self.server(ini, plugins=self.relaying + "queue/smtp_forward\n")
        await self.send(["someone@far.test"])
        self.assertEqual(peer.messages[0].rcpt_to, ["someone@far.test"])

    async def test_relayed_mail_left_to_outbound_by_default(self) -> None:
        """Without enable_outbound, relayed mail goes to the built-in outbound queue."""
        peer, port = self.peer()
        server = self.server(
            f"[main]\nhost=127.0.0.1\nport={port}\n",
            plugins=self.relaying + "queue/smtp_forward\n",
        )
        _, _, data = await self.send(["someone@far.test"])
        assert data is not None
        self.assertEqual(data[0], 250)
        self.assertEqual(peer.messages, [])
        self.assertEqual(len(await self.queued(server)), 1)


@implementer(IConnectHook)
class Relaying:
    """A test plugin: every client may relay."""

    def hook_connect(self, connection: Any) -> None:
        connection.relaying = True


class GetMxTests(SynchronousTestCase):
    def plugin(self, ini: dict[str, dict[str, Any]]) -> Any:
        from haraka_tw.plugins.queue.smtp_forward import Plugin

        plugin = Plugin()
        plugin.routes = read_routes(ini)
        return plugin

    def hmail(self, notes: dict[str, Any], sender: str = "a@client.test") -> Any:
        class HMail:
            pass

        class Todo:
            mail_from = sender

        hmail = HMail()
        hmail.notes = Notes(notes)  # type: ignore[attr-defined]
        hmail.todo = Todo()  # type: ignore[attr-defined]
        return hmail

    def test_requeued_message_goes_back_to_its_route(self) -> None:
        """get_mx: a message this plugin queued is routed to its route's hosts."""
        plugin = self.plugin(
            {"main": {"host": "10.0.0.1"}, "x.test": {"host": "10.0.0.2", "port": 2525}}
        )
        notes = {"queue": {"wants": "smtp_forward", "route": "x.test"}}
        _, hosts = plugin.hook_get_mx(self.hmail(notes), "y.test")
        self.assertEqual([(h.exchange, h.port) for h in hosts], [("10.0.0.2", 2525)])

    def test_domain_section_routes_outbound_mail(self) -> None:
        """get_mx: mail for a domain with a section goes to that section's host."""
        plugin = self.plugin({"main": {"host": "10.0.0.1"}, "x.test": {"host": "10.0.0.2"}})
        _, hosts = plugin.hook_get_mx(self.hmail({}), "X.test")
        self.assertEqual(hosts[0].exchange, "10.0.0.2")
        self.assertEqual(plugin.hook_get_mx(self.hmail({}), "z.test").name, "CONT")

    def test_next_hop_url(self) -> None:
        """Haraka's queue.next_hop URLs: scheme, host, port, credentials."""
        self.assertEqual(
            mx_from_url("lmtp://u:p@10.0.0.3:2400"),
            MXHost("10.0.0.3", 0, 2400, None, None, "u", "p", True, False),
        )
        self.assertEqual(mx_from_url("smtp://mx.test").port, 25)
