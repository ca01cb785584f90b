"""aliases over sockets: recipients rewritten and dropped as aliases.json says, seen in the
envelope a queue plugin gets; the clients' addresses given by a PROXY header from loopback."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw.codes import OK
from haraka_tw.interfaces import IQueueHook, IQueueOutboundHook
from haraka_tw.plugins.aliases import load_rules
from haraka_tw.server import StartupError
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


def send(port: int, recipients: list[str]) -> list[str]:
    """Send one message to C{recipients} from 192.0.2.80 (a PROXY header); the refused
    ones."""
    commands = ["EHLO client.example", "MAIL FROM:<joe@sender.example>"]
    commands += [f"RCPT TO:<{r}>" for r in recipients]
    replies = exchange(port, "192.0.2.80", *commands, "DATA", "Subject: a\r\n\r\nb\r\n.")
    assert replies[-1].startswith(b"250"), replies
    return [r for r, reply in zip(recipients, replies[3:], strict=False) if reply[:1] != b"2"]


class AliasesTests(TestCase):
    def server(self, table: Any, name: str = "aliases.json", **files: str) -> int:
        QUEUED.clear()
        _, port = start_server(
            self,
            {
                "plugins": f"relay\naliases\nrcpt_to.in_host_list\n{__name__}:Keep\n",
                name: json.dumps(table),
                "host_list": "example.com\nold.example.com\n",
                "connection.ini": "[haproxy]\nhosts=127.0.0.1\n",
                "relay_acl_allow": "10.1.0.0/16\n",
                **files,
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
            send, port, ["carl@elsewhere.example", "carl@example.com", "c1@example.com"]
        )
        self.assertEqual(refused, ["carl@elsewhere.example"])
        self.assertEqual(sorted(QUEUED[0][0]), ["c1@example.com", "c2@example.com"])
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
        elsewhere; whole addresses and domains are still rewritten."""
        port = self.server(WITH_CATCHALL)
        commands = [
            "EHLO laptop.example",
            "MAIL FROM:<joe@example.com>",
            "RCPT TO:<bob@friend.example>",
            "RCPT TO:<ann@example.com>",
            "RCPT TO:<zed@old.example.com>",
            "DATA",
            "Subject: out\r\n\r\nbody\r\n.",
        ]
        got = yield deferToThread(exchange, port, "10.1.2.3", *commands)
        self.assertEqual(got[-1][:3], b"250")
        self.assertEqual(
            QUEUED[0][0], ["bob@friend.example", "ann.smith@example.com", "desk@example.com"]
        )

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
