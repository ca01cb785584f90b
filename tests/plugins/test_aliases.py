"""aliases over sockets: recipients rewritten and dropped as aliases.json says, seen in the
envelope a queue plugin gets; the clients' addresses given by a PROXY header from loopback."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw.codes import CONT, OK
from haraka_tw.interfaces import IQueueHook, IQueueOutboundHook, IRcptOkHook
from haraka_tw.plugins.aliases import load_rules
from haraka_tw.server import StartupError
from haraka_tw.smtp.address import Address
from tests.plugins.test_dns_list import exchange
from tests.support import start_server

QUEUED: list[tuple[list[str], Any, Any]] = []
TABLE = {
    "ann@example.com": {"action": "alias", "to": "ann.smith@example.com"},
    "bob": {"action": "alias", "to": "robert"},
    "carl@example.com": {"action": "alias", "to": ["c1@example.com", "c2"]},
    "dave": {"action": "ALIAS", "to": "d@example.org"},
    "@old.example.com": {"action": "alias", "to": "desk@example.com"},
    "noreply@example.com": {"action": "drop"},
}
WITH_CATCHALL = {**TABLE, "*": {"action": "alias", "to": "catchall"}}


@implementer(IQueueHook, IQueueOutboundHook)
class Keep:
    """Test plugin: keeps each message's envelope and the aliases results and notes."""

    def hook_queue(self, connection: Any) -> Any:
        txn = connection.transaction
        QUEUED.append(
            ([r.address for r in txn.rcpt_to], txn.results.get("aliases"), txn.notes.get("forward"))
        )
        return OK

    hook_queue_outbound = hook_queue


@implementer(IRcptOkHook)
class Archive:
    """Test plugin: adds archive@example.com to the envelope at the first accepted
    recipient, without parameters (as a Haraka plugin would)."""

    def hook_rcpt_ok(self, connection: Any, recipient: Any) -> Any:
        txn = connection.transaction
        if not any(r.local == "archive" for r in txn.rcpt_to):
            txn.rcpt_to.append(Address("archive", "example.com"))
        return CONT


def send(port: int, recipients: list[str]) -> list[str]:
    """Send one message to C{recipients} from 192.0.2.80 (a PROXY header); the refused
    ones."""
    commands = ["EHLO client.example", "MAIL FROM:<joe@sender.example>"]
    commands += [f"RCPT TO:<{r}>" for r in recipients]
    replies = exchange(port, "192.0.2.80", *commands, "DATA", "Subject: a\r\n\r\nb\r\n.")
    assert replies[-1].startswith(b"250"), replies
    return [r for r, reply in zip(recipients, replies[3:], strict=False) if reply[:1] != b"2"]


class AliasesTests(TestCase):
    def server(self, table: Any, name: str = "aliases.json", plugins: str = "") -> int:
        QUEUED.clear()
        _, port = start_server(
            self,
            {
                "plugins": f"relay\naliases\nrcpt_to.in_host_list\n{plugins}{__name__}:Keep\n",
                name: json.dumps(table),
                "host_list": "example.com\nold.example.com\nb\u00fccher.example\n",
                "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
                "relay_acl_allow": "10.1.0.0/16\n",
            },
        )
        return port

    @inlineCallbacks
    def test_each_kind_of_key(self) -> Deferred[None]:
        """The whole address, the local part, the part before + or -, a domain and *
        each rewrite; a bare target takes the recipient's domain; case does not matter."""
        port = self.server(WITH_CATCHALL)
        refused = yield deferToThread(
            send,
            port,
            [
                "ANN@Example.COM",
                "bob+news@example.com",
                "carl@example.com",
                "dave-x@old.example.com",
                "zed@old.example.com",
                "someone@example.com",
            ],
        )
        self.assertEqual(refused, [])
        recipients, results, forward = QUEUED[0]
        self.assertEqual(
            recipients,
            [
                "ann.smith@example.com",
                "robert@example.com",
                "c1@example.com",
                "c2@example.com",
                "d@example.org",
                "desk@example.com",
                "catchall@example.com",
            ],
        )
        self.assertIn("carl@example.com -> c1@example.com, c2@example.com", results["alias"])
        self.assertTrue(forward)

    @inlineCallbacks
    def test_drop_takes_out_one_recipient(self) -> Deferred[None]:
        """A dropped recipient is accepted but leaves the envelope, the others get the
        message; a message whose only recipient is dropped is accepted and goes nowhere."""
        port = self.server(TABLE)
        yield deferToThread(send, port, ["noreply@example.com", "ann.smith@example.com"])
        self.assertEqual(QUEUED[0][0], ["ann.smith@example.com"])
        self.assertEqual(QUEUED[0][1]["drop"], ["noreply@example.com"])
        refused = yield deferToThread(send, port, ["noreply@example.com"])
        self.assertEqual(refused, [])
        self.assertEqual(len(QUEUED), 1)

    @inlineCallbacks
    def test_refused_recipient_leaves_no_target(self) -> Deferred[None]:
        """A recipient another plugin refuses is not rewritten into the envelope; one
        already a recipient is not added twice; the client is answered with the address it
        gave."""
        port = self.server(TABLE)
        refused = yield deferToThread(
            send, port, ["bob@elsewhere.example", "carl@example.com", "C1@example.com"]
        )
        self.assertEqual(refused, ["bob@elsewhere.example"])
        self.assertEqual(sorted(QUEUED[0][0]), ["C1@example.com", "c2@example.com"])
        got = yield deferToThread(
            exchange,
            port,
            "192.0.2.80",
            "EHLO client.example",
            "MAIL FROM:<joe@sender.example>",
            "RCPT TO:<bob@example.com>",
        )
        self.assertIn(b"<bob@example.com>", got[3])
        self.assertNotIn(b"robert", got[3])

    @inlineCallbacks
    def test_keys_without_domain_spare_outgoing_mail(self) -> Deferred[None]:
        """For a relaying client, * and the local-part keys do not touch recipients
        elsewhere, but do rewrite those in the local domains; whole addresses and domains
        are rewritten everywhere."""
        port = self.server(WITH_CATCHALL)
        commands = [
            "EHLO laptop.example",
            "MAIL FROM:<joe@example.com>",
            "RCPT TO:<bob@friend.example>",
            "RCPT TO:<bob@example.com>",
            "RCPT TO:<ann@example.com>",
            "RCPT TO:<zed@old.example.com>",
            "DATA",
            "Subject: out\r\n\r\nbody\r\n.",
        ]
        got = yield deferToThread(exchange, port, "10.1.2.3", *commands)
        self.assertEqual(got[-1][:3], b"250")
        self.assertEqual(
            QUEUED[0][0],
            [
                "bob@friend.example",
                "robert@example.com",
                "ann.smith@example.com",
                "desk@example.com",
            ],
        )

    @inlineCallbacks
    def test_recipients_added_by_another_plugin(self) -> Deferred[None]:
        """A recipient another plugin adds without parameters (as Haraka's plugins do)
        stays, and the rules still apply to the others; an internationalised domain
        matches a key written in A-labels; a key set to null is no rule."""
        table = {
            **TABLE,
            "@xn--bcher-kva.example": {"action": "alias", "to": "books@example.com"},
            "bob": None,
        }
        port = self.server(table, plugins=f"{__name__}:Archive\n")
        yield deferToThread(
            send, port, ["noreply@example.com", "carl@example.com", "bob@example.com"]
        )
        self.assertEqual(
            QUEUED[0][0],
            ["archive@example.com", "c1@example.com", "c2@example.com", "bob@example.com"],
        )
        recipients = ["kurt@b\u00fccher.example"]
        commands = ["EHLO client.example", "MAIL FROM:<joe@sender.example> SMTPUTF8"]
        commands += [f"RCPT TO:<{r}>" for r in recipients]
        replies = yield deferToThread(
            exchange, port, "192.0.2.80", *commands, "DATA", "Subject: a\r\n\r\nb\r\n."
        )
        self.assertEqual(replies[-1][:3], b"250")
        self.assertEqual(QUEUED[1][0], ["archive@example.com", "books@example.com"])

    @inlineCallbacks
    def test_older_file_name(self) -> Deferred[None]:
        """Without aliases.json, Haraka's older file name aliases (JSON) is read."""
        port = self.server({"bob": {"action": "alias", "to": "robert"}}, name="aliases")
        yield deferToThread(send, port, ["bob@example.com"])
        self.assertEqual(QUEUED[0][0], ["robert@example.com"])

    def test_bad_rules_stop_start_up(self) -> None:
        """A rule with another action, an alias without a target, a target that is not an
        address, or JSON that does not parse stops start-up naming the file (and key)."""
        for text, words in (
            ('{"a": {"action": "reject"}}', "aliases.json 'a': action must be alias or drop"),
            ('{"a": {"action": "alias"}}', "aliases.json 'a': an alias needs \"to\""),
            ('{"a": {"action": "alias", "to": ["b@"]}}', "aliases.json 'a': 'b@' is not"),
            ('{"a": {"action": "drop"},\n', "aliases.json:2"),
        ):
            with self.assertRaises(StartupError, msg=text) as raised:
                start_server(self, {"plugins": "aliases\n", "aliases.json": text})
            self.assertIn(words, str(raised.exception))


class LoadRulesTests(SynchronousTestCase):
    def test_keys_differing_only_in_case(self) -> None:
        """Two keys that differ only in case would match the same recipients: refused."""
        with self.assertRaises(ValueError) as raised:
            load_rules({"Bob": {"action": "drop"}, "bob": {"action": "drop"}})
        self.assertIn("the same key as 'Bob'", str(raised.exception))
