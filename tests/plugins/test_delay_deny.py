"""delay_deny: pre-DATA refusals are held until RCPT, where relaying clients get past them."""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, DENYDISCONNECT, DENYSOFT, Code
from haraka_tw.interfaces import IEhloHook, IHeloHook
from tests.plugins.loading import ENVELOPE, Loaded, accepting, load, session
from tests.support import Session, plugin_with, start_server


@implementer(IHeloHook, IEhloHook)
class HeloDenier:
    """Refuses every greeting (for the plugins file of the socket test)."""

    def hook_helo(self, connection: Any, host: str) -> tuple[Code, str]:
        return DENY, "bad HELO {remote}"

    hook_ehlo = hook_helo


def denier(**hooks: Any) -> tuple[str, object]:
    return ("denier", plugin_with(hooks))


def relaying() -> tuple[str, object]:
    def connect(connection: Any) -> None:
        connection.relaying = True

    return ("relay", plugin_with({"connect": connect}))


class DelayDenyTests(SynchronousTestCase):
    def loaded(self, files: dict[str, str] | None = None) -> Loaded:
        return load(self, ["delay_deny"], files)

    def start(self, *plugins: tuple[str, object], files: dict[str, str] | None = None) -> Session:
        return session(*plugins, *self.loaded(files).pairs(), accepting(self.stored))

    def setUp(self) -> None:
        self.stored: list[bytes] = []

    def test_greeting_refusal_comes_at_rcpt(self) -> None:
        """A refused EHLO passes, and RCPT gets the refusing plugin's code and message."""
        s = self.start(denier(ehlo=lambda c, h: (DENY, "bad HELO {remote}")))
        self.assertEqual(s.codes("EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"), [250, 250])
        self.assertEqual(
            s.send("RCPT TO:<b@example.com>\r\n"),
            "550 5.7.1 bad HELO client.example [192.0.2.10]\r\n",
        )
        self.assertEqual(s.codes("DATA\r\n"), [503])

    def test_relaying_client_gets_past(self) -> None:
        """A relaying client gets past held refusals; X-Haraka-Fail-Pre names them."""
        s = self.start(relaying(), denier(ehlo=lambda c, h: DENYSOFT))
        self.assertEqual(s.codes(ENVELOPE), [250, 250, 250])
        self.assertEqual(s.codes("DATA\r\n"), [354])
        self.assertEqual(s.codes("Subject: x\r\n\r\nbody\r\n.\r\n"), [250])
        self.assertIn(b"X-Haraka-Fail-Pre: denier\r\n", self.stored[0])

    def test_mail_refusal_is_for_its_transaction(self) -> None:
        """A refused MAIL is held for that transaction's recipients only."""

        def mail(c: Any, sender: Any, params: Any) -> Any:
            return (DENY, "no {sender}") if sender.local == "bad" else CONT

        s = self.start(denier(mail=mail))
        self.assertEqual(s.codes("EHLO client.test\r\nMAIL FROM:<bad@client.test>\r\n"), [250, 250])
        self.assertEqual(
            s.send("RCPT TO:<b@example.com>\r\n"), "550 5.7.1 no <bad@client.test>\r\n"
        )
        self.assertEqual(
            s.codes("MAIL FROM:<good@client.test>\r\nRCPT TO:<b@example.com>\r\n"), [250, 250]
        )

    def test_rcpt_refusal_is_for_its_recipient(self) -> None:
        """A refused RCPT is refused (with its own message); the next recipient is not."""

        def rcpt(c: Any, recipient: Any, params: Any) -> Any:
            return (DENY, "not {recipient}") if recipient.local == "bad" else CONT

        s = self.start(denier(rcpt=rcpt))
        s.send("EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")
        self.assertEqual(
            s.send("RCPT TO:<bad@example.com>\r\n"), "550 5.7.1 not <bad@example.com>\r\n"
        )
        self.assertEqual(s.codes("RCPT TO:<good@example.com>\r\n"), [250])
        self.assertEqual(
            [a.address for a in s.connection.transaction.rcpt_to], ["good@example.com"]
        )

    def test_disconnect_refusal_closes_at_rcpt(self) -> None:
        """A DENYDISCONNECT at connect lets the banner out and closes at the first RCPT."""
        s = self.start(denier(connect=lambda c: DENYDISCONNECT))
        self.assertTrue(s.banner.startswith("220 "))
        s.send("EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")
        self.assertEqual(s.codes("RCPT TO:<b@example.com>\r\n"), [550])
        self.assertTrue(s.closed)

    def test_post_data_refusals_are_not_delayed(self) -> None:
        """Refusals in data and later hooks take effect at once."""
        s = self.start(denier(data=lambda c: DENY))
        s.send(ENVELOPE)
        self.assertEqual(s.codes("DATA\r\n"), [554])

    def test_excluded_plugins(self) -> None:
        """A refusal by an excluded plugin (or plugin:hook) takes effect at once."""
        files = {"delay_deny.ini": "[main]\nexcluded_plugins=spf, denier:ehlo\n"}
        s = self.start(denier(ehlo=lambda c, h: DENY), files=files)
        self.assertEqual(s.codes("EHLO client.test\r\n"), [550])
        s = self.start(denier(mail=lambda c, f, p: DENY), files=files)
        self.assertEqual(s.codes("EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"), [250, 250])

    def test_included_plugins(self) -> None:
        """With included_plugins, only those refusals are delayed."""
        files = {"delay_deny.ini": "[main]\nincluded_plugins=denier:mail:hook_mail\n"}
        s = self.start(denier(ehlo=lambda c, h: DENY), files=files)
        self.assertEqual(s.codes("EHLO client.test\r\n"), [550])
        s = self.start(denier(mail=lambda c, f, p: DENY), files=files)
        self.assertEqual(
            s.codes("EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@x.test>\r\n"),
            [250, 250, 550],
        )

    def test_rcpt_ok_refusal_relaying_only(self) -> None:
        """A refusal in rcpt_ok stands, unless the client is relaying."""
        s = self.start(denier(rcpt_ok=lambda c, r: DENY))
        s.send("EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")
        self.assertEqual(s.codes("RCPT TO:<b@example.com>\r\n"), [550])
        s = self.start(relaying(), denier(rcpt_ok=lambda c, r: DENY))
        self.assertEqual(s.codes(ENVELOPE), [250, 250, 250])

    def test_config_reload(self) -> None:
        """An edited delay_deny.ini applies after a reload."""
        loaded = self.loaded()
        plugin = loaded.plugin("delay_deny")
        self.assertTrue(plugin.delays("spf", "mail", "hook_mail"))
        loaded.write("delay_deny.ini", "[main]\nexcluded_plugins=spf\n")
        self.assertFalse(plugin.delays("spf", "mail", "hook_mail"))


class DelayDenyServerTests(TestCase):
    @inlineCallbacks
    def test_refused_ehlo_answered_at_rcpt(self) -> Deferred[None]:
        """Over a real socket with smtplib: EHLO and MAIL pass, RCPT gets the EHLO refusal."""
        _, port = start_server(
            self,
            {
                "plugins": "tests.plugins.test_delay_deny:HeloDenier\ndelay_deny\n"
                "rcpt_to.in_host_list\nqueue/maildir\n",
                "host_list": "example.com\n",
            },
        )

        def converse() -> tuple[int, int, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                ehlo = client.ehlo("client.test")[0]
                mail = client.mail("a@client.test")[0]
                return ehlo, mail, client.rcpt("b@example.com")

        ehlo, mail, rcpt = yield deferToThread(converse)
        self.assertEqual((ehlo, mail), (250, 250))
        self.assertEqual(rcpt[0], 550)
        self.assertRegex(rcpt[1], rb"^5\.7\.1 bad HELO .*\[127\.0\.0\.1\]$")
