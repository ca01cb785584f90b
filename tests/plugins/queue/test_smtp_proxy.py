"""queue/smtp_proxy over real loopback sockets: each client command is proxied to a
scripted backend as it arrives, and the backend's replies are the client's."""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread

from tests.plugins.queue.test_smtp_forward import BODY, ForwardCase, check_arrived

PLUGINS = "rcpt_to.in_host_list\nqueue/smtp_proxy\n"


def transaction(port: int, rcpts: list[str], *, rset: bool = False) -> list[Any]:
    """MAIL, each RCPT, then DATA (if any RCPT got 250) or RSET: every reply, in order."""
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("client.test")
        replies: list[Any] = [s.mail("alice@client.test", ["SIZE=100"])]
        if replies[0][0] != 250:
            return replies
        replies += [s.rcpt(r) for r in rcpts]
        if rset:
            replies.append(s.rset())
        elif any(code == 250 for code, _ in replies[1:]):
            try:
                replies.append(s.data(BODY))
            except smtplib.SMTPDataError as e:
                replies.append((e.smtp_code, e.smtp_error))
        return replies


class ProxyTests(ForwardCase):
    def proxy(self, port: int, extra: str = "") -> None:
        ini = f"[main]\nhost=127.0.0.1\nport={port}\n{extra}"
        self.server("", plugins=PLUGINS, **{"smtp_proxy.ini": ini})

    async def proxied(self, rcpts: list[str], **kw: Any) -> list[Any]:
        result: list[Any] = await deferToThread(transaction, self.server_port, rcpts, **kw)
        return result

    async def test_backend_550_at_rcpt_is_our_550(self) -> None:
        """A backend 550 to one RCPT is our reply to it, word for word; the rest goes on."""
        peer, port = self.peer(
            size=10**6, rcpt={"carol@example.com": "550 5.1.1 <carol> unknown here"}
        )
        self.proxy(port)
        mail, bob, carol, data = await self.proxied(["bob@example.com", "carol@example.com"])
        self.assertEqual(mail[0], 250)
        self.assertEqual(bob[0], 250)
        self.assertEqual(carol, (550, b"5.1.1 <carol> unknown here"))
        self.assertEqual(data[0], 250)
        [message] = peer.messages
        self.assertEqual(message.rcpt_to, ["bob@example.com"])
        self.assertIn("SIZE=100", message.mail_params)
        check_arrived(self, message.data)

    async def test_commands_reach_the_backend_as_they_arrive(self) -> None:
        """MAIL is at the backend when the client has its reply, before any RCPT."""
        peer, port = self.peer()
        self.proxy(port)

        def mail_only() -> list[str]:
            with smtplib.SMTP("127.0.0.1", self.server_port, timeout=15) as s:
                s.ehlo("client.test")
                s.mail("alice@client.test")
                return blockingCallFromThread(reactor, lambda: list(peer.transcript))

        seen = await deferToThread(mail_only)
        self.assertEqual([line[3:7] for line in seen if line.startswith("C: ")][-1], "MAIL")

    async def test_backend_4xx_at_mail_is_ours(self) -> None:
        """A backend 451 to MAIL is the client's reply to MAIL."""
        _, port = self.peer(replies={"MAIL": ["451 4.7.1 Greylisted, come back later"]})
        self.proxy(port)
        [mail] = await self.proxied(["bob@example.com"])
        self.assertEqual(mail, (451, b"4.7.1 Greylisted, come back later"))

    async def test_backend_down_is_451_at_mail(self) -> None:
        """No backend to talk to: 451 4.4.1 at MAIL."""
        peer, port = self.peer()
        await peer.stop()
        self.proxy(port)
        [mail] = await self.proxied(["bob@example.com"])
        self.assertEqual(mail, (451, b"4.4.1 Backend unavailable, try again later"))

    async def test_backend_refuses_message(self) -> None:
        """A backend 554 after the message is the client's 554."""
        _, port = self.peer(replies={"DOT": ["554 5.7.1 Rejected by content filter"]})
        self.proxy(port)
        replies = await self.proxied(["bob@example.com"])
        self.assertEqual(replies[-1], (554, b"5.7.1 Rejected by content filter"))

    async def test_backend_lost_mid_transaction(self) -> None:
        """A backend that drops the connection at RCPT: 451 4.4.2 from then on."""
        _, port = self.peer(replies={"RCPT": ["DROP"]})
        self.proxy(port)
        replies = await self.proxied(["bob@example.com", "carol@example.com"])
        self.assertEqual([r[0] for r in replies], [250, 451, 451])
        self.assertIn(b"4.4.2", replies[1][1])

    async def test_rset_closes_the_backend(self) -> None:
        """RSET ends the transaction: the backend gets QUIT and the connection closes."""
        peer, port = self.peer()
        self.proxy(port)
        replies = await self.proxied(["bob@example.com"], rset=True)
        self.assertEqual(replies[-1][0], 250)
        for _ in range(100):
            if peer.connections and peer.connections[0].closed:
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(peer.connections[0].closed)
        self.assertIn("C: QUIT", peer.transcript)
        self.assertEqual(peer.messages, [])

    async def test_tls_and_auth_to_backend(self) -> None:
        """enable_tls and auth_user: STARTTLS and AUTH with the backend before MAIL."""
        peer, port = self.peer(starttls=True, auth=("PLAIN",))
        self.proxy(port, "enable_tls=true\nauth_user=user\nauth_pass=secret\n")
        replies = await self.proxied(["bob@example.com"])
        self.assertEqual(replies[-1][0], 250)
        [message] = peer.messages
        self.assertEqual((message.tls, message.auth_user), (True, "user"))
