"""queue/smtp_bridge over real loopback sockets, with auth/auth_bridge checking the login."""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet.threads import deferToThread

from tests.plugins.queue.test_smtp_forward import BODY, ForwardCase, check_arrived

PLUGINS = "rcpt_to.in_host_list\nauth/auth_bridge\nqueue/smtp_bridge\nqueue/discard\n"


def login_and_send(port: int, user: str | None) -> tuple[int, bytes]:
    """Log in (when C{user} is given) and send one message; the reply to DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("client.test")
        if user is not None:
            s.login(user, "secret")
        s.mail("alice@client.test")
        s.rcpt("bob@far.test")
        return s.data(BODY)


class BridgeTests(ForwardCase):
    def bridge(self, port: int) -> None:
        self.server(
            "",
            plugins=PLUGINS,
            **{
                "smtp_bridge.ini": f"[main]\nhost=127.0.0.1\nport={port}\n",
                "auth_bridge.ini": "[core]\nallow_cleartext=true\n",
                "host_list": "far.test\n",
            },
        )

    async def send_as(self, user: str | None) -> Any:
        return await deferToThread(login_and_send, self.server_port, user)

    async def test_relays_as_the_logged_in_user(self) -> None:
        """The login checked by auth_bridge is used again to hand the message over."""
        peer, port = self.peer(auth=("PLAIN", "LOGIN"))
        self.bridge(port)
        code, _ = await self.send_as("user")
        self.assertEqual(code, 250)
        [message] = peer.messages
        self.assertEqual((message.auth_user, message.rcpt_to), ("user", ["bob@far.test"]))
        check_arrived(self, message.data)
        self.assertEqual(len(peer.connections), 2)  # the login check, then the delivery

    async def test_refusal_is_ours(self) -> None:
        """The bridged server's 5xx to the message is the client's 5xx."""
        _, port = self.peer(auth=("PLAIN",), replies={"DOT": ["550 5.7.1 Not from you"]})
        self.bridge(port)
        self.assertEqual(await self.send_as("user"), (550, b"5.7.1 Not from you"))

    async def test_without_a_bridged_login_next_plugin(self) -> None:
        """No auth_bridge credentials: the message is left to the next queue plugin."""
        peer, port = self.peer(auth=("PLAIN",))
        self.bridge(port)
        code, _ = await self.send_as(None)
        self.assertEqual(code, 250)  # queue/discard took it
        self.assertEqual(peer.messages, [])
