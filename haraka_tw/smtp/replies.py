"""SMTP replies as values, and the catalogue of replies the core sends.

A L{Reply} is frozen: a code, an RFC 3463 enhanced status code and its text lines. The
core renders the enhanced code only to clients that greeted with EHLO (RFC 2034).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
# A reply's wire form: its bytes, or its text cut at placeholders (text, name, ..., text).
_Form = bytes | tuple[str, ...]

__all__ = ["Reply", "render_lines"]


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply.

    @ivar code: the three-digit reply code.
    @ivar enhanced: the enhanced status code ("5.1.1"), or None.
    @ivar lines: the text lines (at least one).
    """

    code: int
    enhanced: str | None
    lines: tuple[str, ...]
    # The wire form, made on first use and kept: bytes, or for a reply with placeholders
    # the rendered text cut at them (text, name, text, ..., text). One without the enhanced
    # code (a HELO client), one with it. The catalogue's and the hook table's replies are
    # made once and sent millions of times.
    _plain: _Form | None = field(default=None, init=False, repr=False, compare=False)
    _enhanced: _Form | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, code: int, enhanced: str | None, text: str | list[str] | tuple[str, ...]) -> Reply:
        """A reply from text that may hold several lines (a list, or newlines in a str)."""
        return cls(code, enhanced, _split(text))

    def with_text(self, text: str | list[str] | tuple[str, ...] | None) -> Reply:
        """The same code and enhanced code with other text (None keeps this text)."""
        if text is None:
            return self
        return Reply(self.code, self.enhanced, _split(text))

    def fill(self, fields: Mapping[str, str] | Callable[[str], str | None]) -> Reply:
        """Replace each C{{name}} whose name is in C{fields}; any other brace stays as it is.

        C{fields} is a mapping, or a function from a name to its value (None: no such
        field), called only for the names this reply holds, so a reply pays for the fields
        it uses and no more.

        One pass: a value that itself contains C{{sender}} is not filled again, so client
        input (an address may hold braces) can never break or reshape a reply.
        """
        get = fields if callable(fields) else fields.get
        lines: list[str] = []
        filled = False
        for line in self.lines:
            parts = _template(line)
            if len(parts) == 1:
                lines.append(line)
                continue
            filled = True
            out = [parts[0]]
            for i in range(1, len(parts), 2):
                value = get(parts[i])
                out.append("{" + parts[i] + "}" if value is None else value)
                out.append(parts[i + 1])
            lines.append("".join(out))
        return Reply(self.code, self.enhanced, tuple(lines)) if filled else self

    @property
    def text(self) -> str:
        """The lines joined by newlines, for logs."""
        return "\n".join(self.lines)

    def to_bytes(self, enhanced: bool = True) -> bytes:
        """The wire form: C{250-first} continuation lines, then C{250 last}, CRLF each.
        Braces are text here: a reply already filled is sent as it stands."""
        form = self._form(enhanced)
        if isinstance(form, bytes):
            return form
        return render_lines(self.code, self.enhanced if enhanced else None, self.lines)

    def render(
        self, enhanced: bool, get: Callable[[str, str], str | None], context: str = ""
    ) -> bytes:
        """C{self.fill(lambda name: get(name, context)).to_bytes(enhanced)}, in one pass over
        a template cut once: the session's way to send a row of the hook table. C{context}
        is passed on to C{get} (the session's recipient), so no closure is made per reply."""
        form = self._form(enhanced)
        if isinstance(form, bytes):
            return form
        out = [form[0]]
        for i in range(1, len(form), 2):
            name = form[i]
            value = get(name, context)
            out.append("{" + name + "}" if value is None else _one_line(value))
            out.append(form[i + 1])
        return "".join(out).encode("utf-8", "replace")

    def _form(self, enhanced: bool) -> _Form:
        """The wire form, made and kept on first use (see the fields above)."""
        form = self._enhanced if enhanced else self._plain
        if form is None:
            text = render_text(self.code, self.enhanced if enhanced else None, self.lines)
            parts = tuple(_PLACEHOLDER.split(text)) if "{" in text else (text,)
            form = parts if len(parts) > 1 else text.encode("utf-8", "replace")
            object.__setattr__(self, "_enhanced" if enhanced else "_plain", form)
        return form

    def __str__(self) -> str:
        return self.to_bytes().decode("utf-8", "replace").rstrip("\r\n")


def render_lines(code: int, enhanced: str | None, lines: tuple[str, ...]) -> bytes:
    """Render a reply; text is UTF-8 and any CR or LF inside a line becomes a space."""
    return render_text(code, enhanced, lines).encode("utf-8", "replace")


def render_text(code: int, enhanced: str | None, lines: tuple[str, ...]) -> str:
    """L{render_lines} before encoding."""
    status = f"{enhanced} " if enhanced else ""
    last = len(lines) - 1
    out = []
    for i, line in enumerate(lines):
        out.append(f"{code}{' ' if i == last else '-'}{status}{_one_line(line)}\r\n")
    return "".join(out)


def _one_line(text: str) -> str:
    """C{text} with any CR or LF as a space: a reply line never ends early."""
    if "\r" in text or "\n" in text:
        return text.replace("\r", " ").replace("\n", " ")
    return text


_TEMPLATES: dict[str, tuple[str, ...]] = {}
_TEMPLATES_KEPT = 4096  # lines remembered; a plugin's texts may be many and varied


def _template(line: str) -> tuple[str, ...]:
    """A line cut at its placeholders: text, name, text, ..., text (just the line when it
    has none). Cut once per distinct line, where a regex substitution with a Python
    callback per placeholder ran for every reply."""
    if "{" not in line:  # (not kept: a plugin's plain texts would crowd out the templates)
        return (line,)
    parts = _TEMPLATES.get(line)
    if parts is None:
        parts = tuple(_PLACEHOLDER.split(line))
        if len(_TEMPLATES) < _TEMPLATES_KEPT:
            _TEMPLATES[line] = parts
    return parts


def _split(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    lines = tuple(text.split("\n")) if isinstance(text, str) else tuple(str(t) for t in text)
    return lines or ("",)
