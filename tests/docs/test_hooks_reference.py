"""docs/hooks.md agrees with the code: the reply tables, the core's replies, every hook."""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import haraka_tw.smtp.catalogue as catalogue
import haraka_tw.smtp.protocol as protocol
from haraka_tw import __version__
from haraka_tw.codes import Code
from haraka_tw.hooks.runner import RUN_ALL_HOOKS
from haraka_tw.hooks.table import TABLE, outcome
from haraka_tw.interfaces import HOOKS
from haraka_tw.smtp.replies import Reply
from tests.support import Session, plugin_with

HOOKS_MD = Path(__file__).resolve().parents[2] / "docs" / "hooks.md"
_HEADING = re.compile(r"^### `(\w+)`")
_ROW = re.compile(r"^\|(.+)\|(.+)\|(.+)\|\s*$")
_REPLY = re.compile(r"^`(\d{3})(?: (\d\.\d{1,3}\.\d{1,3}))? (.*)`( †)?$")


def _sections() -> dict[str, list[str]]:
    """Lines under each `### `hook`` heading (a heading naming two hooks opens both)."""
    sections: dict[str, list[str]] = {}
    current: list[list[str]] = []
    for line in HOOKS_MD.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            current = [sections.setdefault(n, []) for n in re.findall(r"`(\w+)`", line)]
            current = current if _HEADING.match(line) else []
            continue
        for lines in current:
            lines.append(line)
    return sections


def _tables(lines: list[str]) -> list[list[tuple[str, str, str]]]:
    """The Result | Reply | Then tables in C{lines}, header and rule rows dropped."""
    tables: list[list[tuple[str, str, str]]] = []
    rows: list[tuple[str, str, str]] | None = None
    for line in lines:
        m = _ROW.match(line)
        if m is None:
            rows = None
            continue
        cells = tuple(c.strip() for c in m.groups())
        if cells == ("Result", "Reply", "Then"):
            rows = []
            tables.append(rows)
        elif rows is not None and not cells[0].startswith("---"):
            rows.append(cells)  # type: ignore[arg-type]
    return tables


def _codes(cell: str) -> list[Code]:
    if cell == "any":
        return list(Code)
    return [Code[name] for name in re.findall(r"`([A-Z_]+)`", cell)]


class ReplyTableTests(SynchronousTestCase):
    """Each hook's table in hooks.md is the row hooks/table.py gives for every code."""

    def _table_for(self, hook: str) -> list[tuple[str, str, str]]:
        lines = _sections()[hook]
        if hook in ("ehlo", "helo"):  # one section, two tables: "`helo`:" then "`ehlo`:"
            text = "\n".join(lines)
            part = text.split(f"`{hook}`:", 1)[1]
            lines = (
                part.split("`ehlo`:", 1)[0].splitlines() if hook == "helo" else part.splitlines()
            )
        tables = _tables(lines)
        self.assertTrue(tables, f"no reply table for {hook}")
        return tables[0]

    def test_every_table_hook_has_a_complete_table(self) -> None:
        """Every hook with table rows lists each of the ten codes exactly once."""
        for hook in TABLE:
            listed = [c for row in self._table_for(hook) for c in _codes(row[0])]
            self.assertEqual(sorted(listed), sorted(Code), hook)

    def test_rows_match_the_table(self) -> None:
        """Each row's reply code, enhanced code, text and next state match hooks/table.py."""
        for hook in TABLE:
            for result, reply, then in self._table_for(hook):
                for code in _codes(result):
                    row = outcome(hook, code)
                    where = f"{hook} {code.name}"
                    self.assertEqual(then, row.then.value, where)
                    if reply == "—":
                        self.assertIsNone(row.reply, where)
                        continue
                    m = _REPLY.match(reply)
                    self.assertIsNotNone(m, f"{where}: cannot read {reply!r}")
                    assert m is not None and row.reply is not None
                    self.assertEqual(int(m[1]), row.reply.code, where)
                    if m[4]:  # †: the core builds this reply; only the code is the table's
                        continue
                    self.assertEqual(m[2], row.reply.enhanced, where)
                    self.assertEqual(m[3], row.reply.text, where)


class CoverageTests(SynchronousTestCase):
    """hooks.md names every hook and every reply the core sends."""

    def test_every_hook_is_documented(self) -> None:
        """Each hook in HOOKS appears in hooks.md with its interface name."""
        text = HOOKS_MD.read_text(encoding="utf-8")
        for name, iface in HOOKS.items():
            self.assertTrue(f"`{name}`" in text, f"hooks.md does not name {name}")
            self.assertTrue(iface.__name__ in text, f"hooks.md does not name {iface.__name__}")

    def test_core_replies_are_documented(self) -> None:
        """Each S<code>_ reply in catalogue.py has a row with its code, enhanced code and text."""
        text = HOOKS_MD.read_text(encoding="utf-8")
        replies = {n: v for n, v in vars(catalogue).items() if isinstance(v, Reply)}
        self.assertGreater(len(replies), 20)
        for name, reply in replies.items():
            shown = f"{reply.code} {reply.enhanced} {reply.text}".replace(__version__, "{version}")
            row = f"| `{name}` | `{shown}` |"
            self.assertTrue(row in text, f"hooks.md has no row starting {row}")


def _section(heading: str) -> str:
    """The text under the C{## heading} of hooks.md, up to the next C{## } heading."""
    text = HOOKS_MD.read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _one_line(text: str) -> str:
    return " ".join(text.split())


class ReplyTextTests(SynchronousTestCase):
    """The Reply text section names the placeholders the core fills, and its rules hold."""

    def test_placeholders_are_the_ones_filled(self) -> None:
        """Each placeholder in the table is filled in plugin text; any other brace is kept."""
        names = re.findall(r"^\| `\{(\w+)\}` \|", _section("Reply text"), re.M)
        self.assertEqual(sorted(names), ["me", "recipient", "remote", "sender", "uuid"])
        text = " ".join(f"{n}={{{n}}}" for n in names) + " {domain} {{x}} {"
        s = Session([("m", plugin_with({"mail": lambda c, f, p: (Code.DENY, text)}))])
        s.send("EHLO x\r\n")
        out = s.send("MAIL FROM:<a{uuid}@b.example>\r\n")
        uuid = f"{s.connection.uuid}.1"
        self.assertEqual(
            out,
            "550 5.7.1 me=mx.test remote=client.example [192.0.2.10]"
            f" sender=<a{{uuid}}@b.example> recipient=<> uuid={uuid} {{domain}} {{{{x}}}} {{\r\n",
        )

    def test_no_escaping_advice_left(self) -> None:
        """Braces never turn a reply into 451, so the page does not say they do."""
        text = HOOKS_MD.read_text(encoding="utf-8")
        self.assertNotIn("fails to format", text)
        self.assertNotIn("`{host}`", text)


class RunnerRuleTests(SynchronousTestCase):
    """The runner rules and the hook notes agree with the runner and the protocol."""

    def test_run_all_hooks(self) -> None:
        """The Run-all paragraph names exactly the runner's run-all hooks."""
        rules = _section("Runner rules")
        paragraph = rules[rules.index("**Run-all hooks.**") :].split("\n\n", 1)[0]
        listed = re.findall(r"`(\w+)`", paragraph.split("(Haraka", 1)[0])
        self.assertEqual(sorted(listed), sorted(RUN_ALL_HOOKS))

    def test_core_commands(self) -> None:
        """The commands the unrecognized_command section says the core handles are its own."""
        text = _one_line("\n".join(_sections()["unrecognized_command"]))
        m = re.search(r"The core handles ([A-Z, ]+) and ([A-Z]+)\.", text)
        assert m is not None
        listed = [*m[1].split(", "), m[2]]
        self.assertEqual(sorted(listed), sorted(protocol.HarakaESMTP._COMMAND_METHODS))

    def test_connect_message_example(self) -> None:
        """connect: the example message is the whole banner."""
        text = _one_line("\n".join(_sections()["connect"]))
        m = re.search(r'`\(OK, "([^"]+)"\)` gives `([^`]+)`', text)
        assert m is not None
        s = Session([("c", plugin_with({"connect": lambda c: (Code.OK, m[1])}))])
        self.assertEqual(s.banner, f"{m[2]}\r\n")

    def test_hook_next_example(self) -> None:
        """unrecognized_command: HOOK_NEXT MAIL for the example command runs MAIL."""
        text = _one_line("\n".join(_sections()["unrecognized_command"]))
        m = re.search(r'`\(HOOK_NEXT, "MAIL"\)` for `(\w+) ([^`]+)` runs MAIL', text)
        assert m is not None
        verb, argument = m[1], m[2]
        seen: list[tuple[str, str]] = []

        def unrecognized(c: object, v: str, a: str) -> object:
            seen.append((v, a))
            return Code.HOOK_NEXT, "MAIL"

        s = Session([("x", plugin_with({"unrecognized_command": unrecognized}))])
        s.send("EHLO x\r\n")
        self.assertEqual(s.send(f"{verb} {argument}\r\n"), "250 2.1.0 sender <a@b.example> OK\r\n")
        self.assertEqual(seen, [(verb, argument)])
