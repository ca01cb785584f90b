"""docs/embedding.md: the example application, built in-process and run as embed.tac."""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.support import free_port, temp_dir, wait_for_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"
EMBEDDING = REPO / "docs" / "embedding.md"
TWISTD = Path(sys.executable).parent / "twistd"

if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import embed_app  # noqa: E402

MESSAGE = b"Subject: lunch?\r\n\r\nNoon?\r\n"


def doc_blocks(kind: str) -> list[tuple[str, str]]:
    """(name, text) of each fenced block of embedding.md after C{<!-- kind: name -->}."""
    text = EMBEDDING.read_text(encoding="utf-8")
    pattern = rf"<!-- {kind}: (.+?) -->\n```[a-z]*\n(.*?)\n```"
    return [(m[1], m[2]) for m in re.finditer(pattern, text, re.DOTALL)]


def send_and_read_page(smtp_port: int, web_port: int) -> tuple[dict[str, Any], str]:
    """Send the document's message, then fetch the page (blocking)."""
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as smtp:
        refused = smtp.sendmail(
            "alice@example.org", ["bob@example.com", "eve@elsewhere.example"], MESSAGE
        )
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/", timeout=10) as page:
        return refused, page.read().decode("utf-8")


def page_shown() -> str:
    """The page text embedding.md shows."""
    [(_, text)] = [b for b in doc_blocks("output") if b[0] == "page"]
    return text + "\n"


class EmbeddingTextTests(unittest.SynchronousTestCase):
    """The code embedding.md quotes is the code in docs/examples."""

    def test_excerpts_are_in_their_files(self) -> None:
        """Every block marked as an excerpt appears in its file as shown."""
        shown = doc_blocks("excerpt")
        self.assertGreaterEqual(len(shown), 3)
        for name, text in shown:
            self.assertIn(text, (EXAMPLES / name).read_text(encoding="utf-8"), name)


class InProcessTests(unittest.TestCase):
    """embed_app's two ways of adding SMTP, in this process, over real sockets."""

    def test_build_serves_mail_and_page(self) -> None:
        """build(): HarakaService from embed_config/ plus the web page listing its mail."""
        smtp_port, web_port = free_port(), free_port()
        root = embed_app.build(
            str(EXAMPLES / "embed_config"),
            smtp=f"tcp:{smtp_port}:interface=127.0.0.1",
            web=f"tcp:{web_port}:interface=127.0.0.1",
        )
        root.privilegedStartService()
        root.startService()
        self.addCleanup(root.stopService)

        def check(result: tuple[dict[str, Any], str]) -> None:
            refused, page = result
            self.assertEqual(list(refused), ["eve@elsewhere.example"])
            self.assertEqual(refused["eve@elsewhere.example"][0], 550)
            self.assertEqual(page, page_shown())

        return deferToThread(send_and_read_page, smtp_port, web_port).addCallback(check)

    def test_factory_by_hand(self) -> None:
        """factory_by_hand(): plugin objects, no config directory, the same replies."""
        messages: list[str] = []
        factory = embed_app.factory_by_hand(messages)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]

        def stop() -> Any:
            for session in list(factory.sessions):
                if session.transport is not None:
                    session.transport.abortConnection()
            return port.stopListening()

        self.addCleanup(stop)

        def send() -> dict[str, Any]:
            with smtplib.SMTP("127.0.0.1", port.getHost().port, timeout=10) as smtp:
                return smtp.sendmail(
                    "alice@example.org", ["bob@example.com", "eve@elsewhere.example"], MESSAGE
                )

        def check(refused: dict[str, Any]) -> None:
            self.assertEqual(list(refused), ["eve@elsewhere.example"])
            self.assertEqual(messages, [page_shown().rstrip("\n")])

        return deferToThread(send).addCallback(check)


class TacTests(unittest.SynchronousTestCase):
    """embed.tac under the real twistd."""

    def test_twistd_runs_embed_tac(self) -> None:
        """twistd -ny docs/examples/embed.tac serves SMTP and the page on the EMBED_ ports."""
        if not TWISTD.exists():
            raise unittest.SkipTest(f"no twistd next to {sys.executable}")
        base = temp_dir(self)
        smtp_port, web_port = free_port(), free_port()
        env = {
            **os.environ,
            "EMBED_SMTP": f"tcp:{smtp_port}:interface=127.0.0.1",
            "EMBED_WEB": f"tcp:{web_port}:interface=127.0.0.1",
        }
        log = (base / "twistd.out").open("wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [str(TWISTD), "-ny", str(EXAMPLES / "embed.tac")],
            cwd=base,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(_stop, proc)

        def alive() -> None:
            if proc.poll() is not None:
                self.fail(f"twistd exited:\n{(base / 'twistd.out').read_text()}")

        wait_for_port(smtp_port, alive=alive)
        wait_for_port(web_port, alive=alive)
        refused, page = send_and_read_page(smtp_port, web_port)
        self.assertEqual(list(refused), ["eve@elsewhere.example"])
        self.assertEqual(page, page_shown())


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
