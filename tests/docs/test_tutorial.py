"""docs/tutorial.md: its files are docs/examples, and they give the replies it shows."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from haraka_tw import cli
from haraka_tw.server import HarakaServer, StartupError
from tests.support import free_port, start_server, temp_dir, wait_for_port, write_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"
TUTORIAL = REPO / "docs" / "tutorial.md"
PLUGIN = "myplugins.sender_policy:SenderPolicy"
TWISTD = Path(sys.executable).parent / "twistd"

# The tutorial runs with PYTHONPATH=. in docs/examples; so do these tests.
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import try_sender_policy  # noqa: E402

# The tutorial's own trial tests, collected and run here as they are.
from myplugins.test_sender_policy import SenderPolicyTests  # noqa: E402

__all__ = ["SenderPolicyTests"]

_UUID = re.compile(r"[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}(\.\d+)?")
_REMOTE = re.compile(r"Hello (?:\S+ )?\[")


def tutorial_blocks(kind: str) -> list[tuple[str, str]]:
    """(name, text) of each fenced block that follows a C{<!-- kind: name -->} line."""
    text = TUTORIAL.read_text(encoding="utf-8")
    pattern = rf"<!-- {kind}: (.+?) -->\n```[a-z]*\n(.*?)\n```"
    return [(m[1], m[2]) for m in re.finditer(pattern, text, re.DOTALL)]


def tutorial_output(name: str) -> str:
    """The block the tutorial shows as the output of C{name}."""
    found = [text for block, text in tutorial_blocks("output") if block == name]
    assert len(found) == 1, f"tutorial.md shows {len(found)} outputs named {name!r}"
    return found[0]


def example_config() -> dict[str, str]:
    """The tutorial's config directory, file name -> text."""
    folder = EXAMPLES / "config"
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir()) if p.is_file()}


def masked(text: str) -> str:
    """C{text} with uuids and the client's reverse name, which vary, made constant."""
    return _REMOTE.sub("Hello [", _UUID.sub("<uuid>", text))


def mail_from(port: int, sender: str) -> tuple[int, bytes]:
    """EHLO and MAIL FROM in a new session (blocking)."""
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        return client.mail(sender)


class TutorialTextTests(unittest.SynchronousTestCase):
    """The code and config tutorial.md shows are the files in docs/examples."""

    def test_whole_files_match(self) -> None:
        """Every block marked as a whole file is that file, byte for byte."""
        shown = tutorial_blocks("file")
        self.assertGreaterEqual(len(shown), 8)
        for name, text in shown:
            self.assertEqual(text, (EXAMPLES / name).read_text(encoding="utf-8").rstrip("\n"), name)

    def test_excerpts_are_in_their_files(self) -> None:
        """Every block marked as an excerpt appears in its file as shown."""
        shown = tutorial_blocks("excerpt")
        self.assertGreaterEqual(len(shown), 4)
        for name, text in shown:
            self.assertIn(text, (EXAMPLES / name).read_text(encoding="utf-8"), name)

    def test_every_config_file_is_shown(self) -> None:
        """The tutorial shows each file of its config directory."""
        shown = {name for name, _ in tutorial_blocks("file")}
        for name in example_config():
            self.assertIn(f"config/{name}", shown)


class TutorialServerTests(unittest.TestCase):
    """A server on the tutorial's config gives the replies the tutorial shows."""

    def test_session_replies(self) -> None:
        """try_sender_policy.py gets the seven replies shown, uuids and names aside."""
        _, port = start_server(self, example_config())

        def check(replies: list[tuple[int, bytes]]) -> None:
            got = masked("\n".join(repr(r) for r in replies))
            self.assertEqual(got, masked(tutorial_output("try_sender_policy.py")))

        return deferToThread(try_sender_policy.session, port).addCallback(check)

    def test_plugins_command(self) -> None:
        """haraka-tw plugins -c config prints the plugins and hooks shown."""
        base = temp_dir(self)
        config = write_config(
            base / "config", {**example_config(), "maildir.ini": f"[main]\npath={base}/md\n"}
        )
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(cli.main(["plugins", "-c", str(config)]), 0)
        self.assertEqual(out.getvalue().rstrip("\n"), tutorial_output("haraka-tw plugins"))

    def test_blocklist_edit_applies_on_reload(self) -> None:
        """An address added to sender_blocklist is refused after a reload, as section 8 says."""
        server, port = start_server(self, example_config())
        blocklist = server.base / "config" / "sender_blocklist"  # type: ignore[attr-defined]
        blocklist.write_text("spammer@bad.example\nnewcomer@bad.example\n", encoding="utf-8")
        self.assertIn("sender_blocklist", server.config.reload())
        d = deferToThread(mail_from, port, "newcomer@bad.example")
        d.addCallback(
            self.assertEqual, (550, b"5.7.1 Mail from <newcomer@bad.example> is not accepted here")
        )
        return d

    def test_timeout_file(self) -> None:
        """A <plugin>.timeout shorter than the tarpit gives the reply section 9 shows."""
        _, port = start_server(self, {**example_config(), f"{PLUGIN}.timeout": "0.5\n"})

        def check(reply: tuple[int, bytes]) -> None:
            self.assertEqual(repr(reply), tutorial_output("timeout"))

        return deferToThread(mail_from, port, "alice@slow.example").addCallback(check)

    def test_bad_tarpit_stops_startup(self) -> None:
        """tarpit=soon stops start-up with the message section 10 shows."""
        files = example_config()
        files["sender_policy.ini"] = files["sender_policy.ini"].replace("tarpit=1", "tarpit=soon")
        config = write_config(temp_dir(self) / "config", files)
        from twisted.internet import reactor

        with self.assertRaises(StartupError) as caught:
            HarakaServer.from_directory(config, reactor)  # type: ignore[arg-type]
        shown = str(caught.exception).replace(f"{config}/", "config/")  # (run from its parent)
        self.assertEqual(f"haraka_tw: {shown}", tutorial_output("bad tarpit"))


class TwistdTutorialTests(unittest.SynchronousTestCase):
    """The tutorial's command line, run for real."""

    def test_twistd_runs_the_tutorial(self) -> None:
        """PYTHONPATH=. twistd -n haraka --config config serves the tutorial's replies."""
        if not TWISTD.exists():
            raise unittest.SkipTest(f"no twistd next to {sys.executable}")
        base = temp_dir(self)
        shutil.copytree(EXAMPLES / "config", base / "config")
        port = free_port()
        (base / "config" / "smtp.ini").write_text(f"[main]\nlisten=127.0.0.1:{port}\n")
        log = (base / "twistd.out").open("wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [str(TWISTD), "-n", "haraka", "--config", "config"],
            cwd=base,
            env={**os.environ, "PYTHONPATH": str(EXAMPLES)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(_stop, proc)

        def alive() -> None:
            if proc.poll() is not None:
                self.fail(f"twistd exited:\n{(base / 'twistd.out').read_text()}")

        wait_for_port(port, alive=alive)
        codes = [code for code, _ in try_sender_policy.session(port)]
        self.assertEqual(codes, [250, 550, 450, 250, 250, 550, 250])
        self.assertEqual(len(list((base / "var" / "maildir" / "new").iterdir())), 1)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
