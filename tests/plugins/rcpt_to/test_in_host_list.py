"""rcpt_to.in_host_list: local domains accepted, others left to the core (550 unless relaying)."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.config import ConfigDirectory
from haraka_tw.hooks.loader import load_plugins
from tests.support import ListLog, Session, temp_dir


class InHostListTests(SynchronousTestCase):
    def session(self, files: dict[str, str]) -> Session:
        d: Path = temp_dir(self)
        for name, text in files.items():
            (d / name).write_text(text)
        config = ConfigDirectory([d])
        (loaded,) = load_plugins(
            ["rcpt_to.in_host_list"], config=config, log=ListLog(), server_notes={}
        )
        self.config = config
        return Session([(loaded.name, loaded.plugin)])

    def test_host_list_and_regex(self) -> None:
        """Domains in host_list (any case) and matching host_list_regex are accepted."""
        s = self.session(
            {"host_list": "example.com\n# comment\n", "host_list_regex": r".*\.example\.net" + "\n"}
        )
        s.send("EHLO x\r\nMAIL FROM:<a@b.c>\r\n")
        codes = s.codes(
            "RCPT TO:<x@EXAMPLE.com>\r\nRCPT TO:<y@mail.example.net>\r\nRCPT TO:<z@example.org>\r\n"
        )
        self.assertEqual(codes, [250, 250, 550])
        txn = s.connection.transaction
        self.assertTrue(txn.results.has("rcpt_to.in_host_list", "pass", "rcpt_to"))
        self.assertTrue(txn.results.has("rcpt_to.in_host_list", "msg", "rcpt!local"))

    def test_an_internationalised_domain_matches_in_either_form(self) -> None:
        """A domain listed as U-labels matches an address in A-labels, and the other way
        round (an SMTPUTF8 client sends U-labels, another client the xn-- form)."""
        s = self.session({"host_list": "bücher.example\nxn--mnchen-3ya.example\n"})
        s.send("EHLO x\r\nMAIL FROM:<a@b.c> SMTPUTF8\r\n")
        codes = s.codes(
            "RCPT TO:<x@xn--bcher-kva.example>\r\nRCPT TO:<y@münchen.example>\r\n"
            "RCPT TO:<z@BÜCHER.example>\r\nRCPT TO:<w@bucher.example>\r\n"
        )
        self.assertEqual(codes, [250, 250, 250, 550])

    def test_relaying_local_sender(self) -> None:
        """A relaying client sending from a local domain may send anywhere; others need relaying."""
        s = self.session({"host_list": "example.com\n"})
        s.connection.relaying = True
        s.send("EHLO x\r\nMAIL FROM:<me@example.com>\r\n")
        self.assertTrue(s.connection.transaction.notes.get("local_sender"))
        self.assertEqual(s.codes("RCPT TO:<far@away.test>\r\n"), [250])

    def test_host_list_reload(self) -> None:
        """An edited host_list applies after the config is reloaded."""
        s = self.session({"host_list": "example.com\n"})
        s.send("EHLO x\r\nMAIL FROM:<a@b.c>\r\n")
        self.assertEqual(s.codes("RCPT TO:<x@new.test>\r\n"), [550])
        (self.config.directories[0] / "host_list").write_text("example.com\nnew.test\n")
        self.config.reload()
        self.assertEqual(s.codes("RCPT TO:<x@new.test>\r\n"), [250])
