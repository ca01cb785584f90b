"""uribl over sockets: names from the envelope, the header and the body looked up in zones
held by a real DNS server on loopback; and its pieces (suffixes, host extraction, answers)
on their own."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from haraka_tw.codes import CONT, OK
from haraka_tw.interfaces import IQueueHook
from haraka_tw.message.header import Header
from haraka_tw.message.part import Body, PartKind
from haraka_tw.plugins.uribl import Zone, body_hosts, subject_of
from haraka_tw.server import StartupError
from haraka_tw.suffixes import RuleOfThumb, SuffixList, installed
from tests.dnsserver import serve
from tests.haproxy import proxied
from tests.support import WireClient, data_reply, start_server, temp_dir

KEPT: list[Any] = []

ZONE = """. 300 IN SOA ns.test. admin.test. 1 60 60 60 60
$ORIGIN dom.test.
spam-domain.com     300 IN A 127.0.0.2
spamhelo.net        300 IN A 127.0.0.2
badsender.org       300 IN A 127.0.0.2
refused.com         300 IN A 127.255.255.254
hijacked.com        300 IN A 192.0.2.1
$ORIGIN ip.test.
4.3.2.1             300 IN A 127.0.0.2
$ORIGIN bm.test.
grey.com            300 IN A 127.0.0.4
black.com           300 IN A 127.0.0.6
$ORIGIN dq.test.
spam-domain.com.sEcReTkEy 300 IN A 127.0.1.2
$ORIGIN 4.3.2.1.in-addr.arpa.
@                   300 IN PTR mail.spam-domain.com.
$ORIGIN 5.3.2.1.in-addr.arpa.
@                   300 IN PTR mail.fine-host.com.
"""

URIBL_INI = """[main]
timeout=10
[dom.test]
strip_to_domain=true
rdns=true
helo=true
envfrom=true
from=true
replyto=true
msgid=true
body=true
no_ip_lookups=true
custom_msg={uri} listed in {zone}
[ip.test]
body=true
helo=true
[bm.test]
bitmask=2
body=true
"""


@implementer(IQueueHook)
class Keep:
    """Test plugin: keeps each queued message's uribl results."""

    def hook_queue(self, connection: Any) -> Any:
        KEPT.append(connection.transaction.results.get("uribl"))
        return OK

    hook_queue_outbound = hook_queue


def message(body: str, headers: str = "From: a@fine-host.com\r\n", html: bool = False) -> bytes:
    kind = "text/html" if html else "text/plain"
    return (
        f"{headers}To: user@mx.test\r\nSubject: s\r\nContent-Type: {kind}\r\n\r\n{body}\r\n"
    ).encode()


class URIBLTests(TestCase):
    def server(self, ini: str = URIBL_INI, proxy: bool = False, **behaviours: Any) -> int:
        self.dns = serve(self, ZONE, **behaviours)
        self.lines: list[str] = []
        server, port = start_server(
            self,
            {
                "plugins": f"uribl\nrcpt_to.in_host_list\n{__name__}:Keep\n",
                "uribl.ini": ini,
                "host_list": "mx.test\n",
                "connection.ini": "[haproxy]\nhosts=127.0.0.1\n" if proxy else "",
                "dns.ini": f"[main]\nnameservers=127.0.0.1:{self.dns.port}\n"
                "timeout=1\nattempts=1\n",
            },
        )
        server.log.hook = lambda c, r: self.lines.append(f"{r.level.name} {r.message}") or True
        KEPT.clear()
        return port

    def asked(self, zone: str) -> list[str]:
        """The names looked up in C{zone} (without it), in order."""
        suffix = f".{zone}."
        return [name[: -len(suffix)] for _, name, _, _ in self.dns.queries if name.endswith(suffix)]

    @inlineCallbacks
    def test_body_url_listed_refused_clean_body_passes(self) -> Deferred[None]:
        """A URL whose registered domain is listed gets 550 with the zone's message; a
        body of unlisted names is queued, each check recorded as a pass."""
        port = self.server()
        code, text = yield data_reply(
            port,
            "a@fine-host.com",
            ["user@mx.test"],
            message("see http://www.spam-domain.com/offer?x=1 now"),
        )
        self.assertEqual((code, text), (550, b"5.7.1 spam-domain.com listed in dom.test"))
        self.assertIn("spam-domain.com", self.asked("dom.test"))
        self.assertTrue(any("found spam-domain.com in dom.test" in line for line in self.lines))
        code, _ = yield data_reply(
            port,
            "a@fine-host.com",
            ["user@mx.test"],
            message("see https://shop.fine-host.com/ or write to info@other-host.org"),
        )
        self.assertEqual(code, 250)
        self.assertEqual(sorted(KEPT[-1]["pass"]), ["body", "envfrom", "from"])
        self.assertIn("other-host.org", self.asked("dom.test"))  # an e-mail address's domain

    @inlineCallbacks
    def test_refusal_codes_and_foreign_answers_are_not_listings(self) -> Deferred[None]:
        """Without validate, a list's "query refused" code and an answer outside 127/8
        (a resolver that rewrites NXDOMAIN) do not refuse mail; the answer is logged."""
        port = self.server()
        code, _ = yield data_reply(
            port,
            "a@fine-host.com",
            ["user@mx.test"],
            message("http://refused.com/ http://www.hijacked.com/"),
        )
        self.assertEqual(code, 250)
        self.assertTrue(any("127.255.255.254 is not a listing" in line for line in self.lines))
        self.assertTrue(any("192.0.2.1 is not a listing" in line for line in self.lines))

    @inlineCallbacks
    def test_bitmask_picks_the_codes(self) -> Deferred[None]:
        """With bitmask=2, 127.0.0.4 is no listing and 127.0.0.6 is."""
        port = self.server()
        code, _ = yield data_reply(port, "a@fine-host.com", ["user@mx.test"], message("grey.com"))
        self.assertEqual(code, 250)
        code, text = yield data_reply(
            port, "a@fine-host.com", ["user@mx.test"], message("black.com")
        )
        self.assertEqual((code, text), (550, b"5.7.1 black.com blacklisted in bm.test"))

    @inlineCallbacks
    def test_envelope_and_header_names(self) -> Deferred[None]:
        """The HELO name and the sender's domain are refused at their commands; From (past
        an address in the display name), a bare Reply-To and the Message-ID's domain at
        the end of DATA."""
        port = self.server()

        def envelope() -> list[bytes]:
            with WireClient(port) as client:
                helo = client.command("EHLO mail.spamhelo.net")
                client.command("EHLO ok.fine-host.com")
                return [helo, client.command("MAIL FROM:<x@badsender.org>")]

        helo, mail = yield deferToThread(envelope)
        self.assertEqual(helo, b"550 5.7.1 spamhelo.net listed in dom.test\r\n")
        self.assertEqual(mail, b"550 5.7.1 badsender.org listed in dom.test\r\n")
        for headers in (
            'From: "a@fine-host.com" <x@spam-domain.com>\r\n',
            "From: a@fine-host.com\r\nReply-To: x@www.spam-domain.com\r\n",
            "From: a@fine-host.com\r\nMessage-ID: <1.2@mx.spam-domain.com>\r\n",
        ):
            code, text = yield data_reply(
                port, "a@fine-host.com", ["user@mx.test"], message("hello", headers)
            )
            self.assertEqual(
                (code, text), (550, b"5.7.1 spam-domain.com listed in dom.test"), headers
            )

    @inlineCallbacks
    def test_unparsable_from_does_not_hide_the_body(self) -> Deferred[None]:
        """A From field of comments nested past the address parser's recursion is left
        out; the body is still looked up."""
        port = self.server()
        code, text = yield data_reply(
            port,
            "a@fine-host.com",
            ["user@mx.test"],
            message("http://www.spam-domain.com/", "From: " + "(" * 2000 + " a@b.com\r\n"),
        )
        self.assertEqual((code, text), (550, b"5.7.1 spam-domain.com listed in dom.test"))

    @inlineCallbacks
    def test_client_reverse_name_at_connect(self) -> Deferred[None]:
        """A client whose PTR name is under a listed domain gets 554 at connect; another
        is greeted."""
        port = self.server(proxy=True)

        def connect(ip: str) -> bytes:
            with proxied(port, ip, timeout=10) as client:
                return client.banner

        banner = yield deferToThread(connect, "1.2.3.4")
        self.assertEqual(banner[:4], b"554 ")
        self.assertIn(b"spam-domain.com listed in dom.test", banner)
        banner = yield deferToThread(connect, "1.2.3.5")
        self.assertEqual(banner[:4], b"220 ")

    @inlineCallbacks
    def test_addresses_in_urls(self) -> Deferred[None]:
        """An address in a URL, however written, is looked up reversed in a zone that takes
        addresses, and never in one with no_ip_lookups; private ones nowhere."""
        port = self.server()
        code, text = yield data_reply(
            port,
            "a@fine-host.com",
            ["user@mx.test"],
            message("http://0x01020304/a http://10.0.0.1/ http://[2001:4860::8888]/"),
        )
        self.assertEqual((code, text), (550, b"5.7.1 1.2.3.4 blacklisted in ip.test"))
        self.assertIn("4.3.2.1", self.asked("ip.test"))
        self.assertNotIn("1.0.0.10", self.asked("ip.test"))
        self.assertEqual([n for n in self.asked("dom.test") if n[0].isdigit()], [])

    @inlineCallbacks
    def test_excluded_and_unknown_names_not_looked_up(self) -> Deferred[None]:
        """Names under uribl.excludes (the shipped list) and names whose top-level domain
        does not exist are never looked up."""
        port = self.server()
        code, _ = yield data_reply(
            port,
            "a@fine-host.com",
            ["user@mx.test"],
            message("https://mail.google.com/ x@example.com setup.notatld"),
        )
        self.assertEqual(code, 250)
        asked = self.asked("dom.test")
        self.assertEqual(
            [n for n in asked if "google" in n or "example" in n or "notatld" in n], []
        )
        self.assertIn("excluded domain:mail.google.com", KEPT[-1]["skip"])

    @inlineCallbacks
    def test_at_most_max_uris_per_list(self) -> Deferred[None]:
        """Thirty names in a body, max_uris_per_list=5: five are looked up in each zone,
        and the limit is recorded and logged."""
        port = self.server("[main]\nmax_uris_per_list=5\n[dom.test]\nbody=true\n")
        names = " ".join(f"http://host{i}.com/" for i in range(30))
        code, _ = yield data_reply(port, "a@fine-host.com", ["user@mx.test"], message(names))
        self.assertEqual(code, 250)
        self.assertEqual(len(self.asked("dom.test")), 5)
        self.assertIn("max query limit for dom.test", KEPT[-1]["skip"])
        self.assertTrue(any("more than 5 names for dom.test" in line for line in self.lines))

    @inlineCallbacks
    def test_failed_lookups_recorded_mail_goes_on(self) -> Deferred[None]:
        """A lookup answered SERVFAIL, or not at all, is an error in the results, not a
        listing and not a silent pass."""
        port = self.server(servfail=["broken.com.dom.test"], timeout=["slow.com.dom.test"])
        code, _ = yield data_reply(
            port, "a@fine-host.com", ["user@mx.test"], message("broken.com slow.com fine.com")
        )
        self.assertEqual(code, 250)
        errors = KEPT[-1]["err"]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("body: dom.test: 2 lookups failed", errors[0])
        self.assertNotIn("body", KEPT[-1]["pass"])

    @inlineCallbacks
    def test_dqs_key_looked_up_never_shown(self) -> Deferred[None]:
        """A DQS key goes between the name and the zone; the reply does not carry it."""
        port = self.server("[dq.test]\ndqs_key=sEcReTkEy\nfrom=true\n")
        code, text = yield data_reply(
            port,
            "a@fine-host.com",
            ["user@mx.test"],
            message("hi", "From: x@spam-domain.com\r\n"),
        )
        self.assertEqual((code, text), (550, b"5.7.1 spam-domain.com blacklisted in dq.test"))
        self.assertIn("spam-domain.com.secretkey", [n.lower() for n in self.asked("dq.test")])

    def test_bad_settings_stop_the_start(self) -> None:
        """A bad pattern, bitmask, zone name, DQS key, limit or suffix list stops start-up,
        naming the file and the key."""
        for ini, words in [
            ("[z.test]\nvalidate=^(127\n", "validate"),
            ("[z.test]\nbitmask=black\n", "bitmask"),
            ("[z.test]\nbitmask=256\n", "bitmask"),
            ("[z..test]\nbody=true\n", "z..test"),
            ("[z.test]\ndqs_key=a.b\n", "dqs_key"),
            ("[main]\nmax_uris_per_list=0\n", "max_uris_per_list"),
            ("[main]\nsuffix_list=/nonexistent/psl.dat\n", "suffix_list"),
            ("[main]\ntimeout=soon\n", "timeout"),
        ]:
            with self.assertRaises(StartupError) as caught:
                start_server(self, {"plugins": "uribl\n", "uribl.ini": ini})
            self.assertIn("uribl.ini", str(caught.exception))
            self.assertIn(words, str(caught.exception))


class TimerTests(SynchronousTestCase):
    def test_checks_still_waiting_at_the_time_limit(self) -> None:
        """At the plugin's time limit, mail goes on; a check with a lookup still out is an
        error naming it, not a pass; a check whose answers all came is a pass."""
        from twisted.internet.defer import fail
        from twisted.internet.task import Clock

        from haraka_tw.dns import NXDomain
        from haraka_tw.plugins.uribl import Plugin, Settings
        from haraka_tw.smtp.state import Results

        class Resolver:
            def lookup_a(self, name: str) -> Deferred[list[str]]:
                if name.startswith("quiet."):
                    return Deferred()  # never answers
                return fail(NXDomain(name, "A", "NXDOMAIN"))

        class Connection:
            transaction = None
            results = Results()

        plugin = Plugin()
        plugin.name, plugin.clock, plugin.resolver = "uribl", Clock(), Resolver()
        plugin.log = type("Log", (), {"info": lambda *a: None, "warn": lambda *a: None})()
        zone = Zone("z.test", frozenset({"from", "body"}))
        settings = Settings((zone,), 20, 5.0, frozenset(), RuleOfThumb())
        answers: list[Any] = []
        groups = [("from", ["fine.com"]), ("body", ["quiet.com"])]
        plugin._check(Connection(), settings, groups).addCallback(answers.append)  # type: ignore[arg-type, union-attr]
        self.assertEqual(answers, [])
        plugin.clock.advance(5)
        self.assertEqual(answers, [CONT])
        results = Connection.results.get("uribl")
        self.assertEqual(results["pass"], ["from"])
        self.assertEqual(results["err"], ["body: timeout after 5 s"])
        self.assertEqual(plugin.clock.getDelayedCalls(), [])


PSL = """// a list in the Public Suffix List's format
com
uk
co.uk
*.ck
!www.ck
jp
kawasaki.jp
*.kawasaki.jp
!city.kawasaki.jp
// ===BEGIN PRIVATE DOMAINS===
blogspot.com
"""


class SuffixTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.psl = SuffixList(
            line for line in PSL.splitlines() if line and not line.startswith("//")
        )

    def test_registered_domains(self) -> None:
        """The longest rule decides, wildcards take one label, exceptions win; a public
        suffix has no registered domain; unknown ones fall back to the last label."""
        for name, wanted in [
            ("www.example.co.uk", "example.co.uk"),
            ("co.uk", None),
            ("a.b.example.com", "example.com"),
            ("me.blogspot.com", "me.blogspot.com"),
            ("a.b.ck", "a.b.ck"),
            ("b.ck", None),
            ("www.ck", "www.ck"),
            ("a.b.kawasaki.jp", "a.b.kawasaki.jp"),
            ("x.city.kawasaki.jp", "city.kawasaki.jp"),
            ("host.example.zz", "example.zz"),
            ("WWW.Example.COM.", "example.com"),
        ]:
            self.assertEqual(self.psl.registered_domain(name), wanted, name)
        self.assertTrue(self.psl.is_tld("CK"))
        self.assertFalse(self.psl.is_tld("zz"))

    def test_installed_list_and_rule_of_thumb(self) -> None:
        """The installed list (Debian's) reads IDN rules in their ASCII form; without a
        list, two letters are a country and a few generic names are known."""
        psl = installed()
        if psl is None:
            self.skipTest("no /usr/share/publicsuffix (Debian's publicsuffix package)")
        self.assertEqual(psl.registered_domain("www.bücher.de"), "xn--bcher-kva.de")
        self.assertTrue(psl.is_tld("dev"))
        self.assertFalse(psl.is_tld("notatld"))
        rough = RuleOfThumb()
        self.assertTrue(rough.is_tld("zz"))
        self.assertFalse(rough.is_tld("dev"))
        self.assertEqual(rough.registered_domain("a.example.co.uk"), "example.co.uk")

    def test_bad_list_named(self) -> None:
        """A file with no rules, or not UTF-8, is an error naming it."""
        for text in (b"// nothing here\n", b"com\n\xff\xfe\n"):
            path = temp_dir(self) / "psl.dat"
            path.write_bytes(text)
            with self.assertRaises(ValueError) as caught:
                SuffixList.read(str(path))
            self.assertIn(str(path), str(caught.exception))


class HostTests(SynchronousTestCase):
    def body(self, text: str, kind: str = "text/plain") -> Body:
        part = Body(Header())
        part.content_type, part.kind, part.bodytext = kind, PartKind.TEXT, text
        return part

    def test_hosts_in_text(self) -> None:
        """URL hosts (past a user part), names in running text, e-mail domains,
        percent-encoded and entity-encoded names, loose IPv4 forms and IPv6 literals."""
        hosts = body_hosts(
            self.body(
                "Go to HTTP://user:pw@Www.One.com:8080/x, or two.org. Mail me@three.net.\n"
                "redirect?u=https%3A%2F%2Ffour.com%2F and http://3232235777/ "
                "http://0x7f.1/ ftp://[2001:db8::1]/f version 1.2.3.4 file.name1"
            )
        )
        for wanted in (
            "www.one.com",
            "two.org",
            "three.net",
            "four.com",
            "192.168.1.1",
            "127.0.0.1",
            "[2001:db8::1]",
        ):
            self.assertIn(wanted, hosts)
        self.assertNotIn("1.2.3.4", hosts)  # a bare dotted number is not a host here
        # the host is after the last @ of the user part, as browsers read it
        self.assertIn("1.2.3.4", body_hosts(self.body("http://x@y@0x01020304/")))
        html = body_hosts(self.body('<a href="http://five&#46;com/">x</a>', "text/html"))
        self.assertIn("five.com", html)
        self.assertNotIn(
            "six.com", body_hosts(self.body("http://six&#46;com/"))
        )  # plain text: as is

    def test_text_scanned_up_to_the_limit(self) -> None:
        """Past BODY_TEXT_LIMIT characters of text in all the parts together, nothing more
        is scanned; each body has a budget of its own."""
        import haraka_tw.plugins.uribl as uribl

        self.patch(uribl, "BODY_TEXT_LIMIT", 100)
        self.assertEqual(body_hosts(self.body("one.com " + "x" * 100 + " two.com")), ["one.com"])
        root = self.body("")
        root.kind = PartKind.MULTIPART
        root.children = [self.body("three.com " + "x" * 70), self.body("x" * 25 + " four.com")]
        self.assertEqual(body_hosts(root), ["three.com"])
        self.assertEqual(body_hosts(self.body("five.com")), ["five.com"])

    def test_long_names_refused_before_encoding(self) -> None:
        """A name longer than DNS allows is no subject, at once, however it is written
        (the IDNA codec took seconds on a megabyte)."""
        psl = RuleOfThumb()
        started = time.monotonic()
        for bad in ("ü" * 1_000_000, "ü." * 200_000 + "com", "a" * 64 + ".com"):
            self.assertIsNone(subject_of(bad, psl))
            self.assertIsNone(psl.registered_domain(bad))
        self.assertLess(time.monotonic() - started, 2.0)

    def test_subjects(self) -> None:
        """What a host becomes before it is looked up."""
        psl = RuleOfThumb()
        self.assertEqual(subject_of("[192.0.2.1]", psl), ipaddress.ip_address("192.0.2.1"))
        self.assertEqual(subject_of("[IPv6:::ffff:1.2.3.4]", psl), ipaddress.ip_address("1.2.3.4"))
        self.assertEqual(subject_of("Mail.Example.COM.", psl), "mail.example.com")
        self.assertEqual(subject_of("bücher.de", psl), "xn--bcher-kva.de")
        for bad in ("localhost", "a..b.com", "-a.com", "name.notatld", "x.123", ""):
            self.assertIsNone(subject_of(bad, psl), bad)

    def test_answers(self) -> None:
        """Which answers count as listings: validate decides when given; otherwise 127/8
        but the refusal codes; bitmask on the last octet; every address judged."""
        plain = Zone("z.test", frozenset())
        self.assertEqual(plain.listing(["127.0.0.2"]), "127.0.0.2")
        for refused in ("127.255.255.254", "127.0.1.255", "192.0.2.1", "bogus"):
            self.assertIsNone(plain.listing([refused]), refused)
        self.assertEqual(plain.listing(["127.255.255.254", "127.0.0.3"]), "127.0.0.3")
        import re

        validated = Zone("z.test", frozenset(), validate=re.compile(r"^127\.0\.1\."))
        self.assertIsNone(validated.listing(["127.0.0.2"]))
        self.assertEqual(validated.listing(["127.0.1.255"]), "127.0.1.255")
        masked = Zone("z.test", frozenset(), bitmask=2)
        self.assertIsNone(masked.listing(["127.0.0.4", "127.0.0.1"]))
        self.assertEqual(masked.listing(["127.0.0.4", "127.0.0.6"]), "127.0.0.6")
