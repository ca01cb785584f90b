"""rcpt_to.host_list_base: the domains this server accepts mail for.

Reads C{host_list} (one domain per line; an internationalised domain matches in either
form, U-labels or A-labels) and C{host_list_regex} (one regular expression per line, matched
against the whole domain as given, case-insensitively), and re-reads them when they change.
Used by rcpt_to.in_host_list; other plugins may use L{HostList} too.
"""

from __future__ import annotations

import re
from typing import Any

from zope.interface import implementer

from haraka_tw.interfaces import IPluginContext, IRegistration

__all__ = ["HostList", "Plugin", "ascii_form"]


class HostList:
    """The set of local domains, kept current from the config directory."""

    def __init__(self, config: Any, log: Any = None) -> None:
        self._config = config
        self._log = log
        self.domains: frozenset[str] = frozenset()
        self.patterns: tuple[re.Pattern[str], ...] = ()
        self.load()
        config.on_change("host_list", self.load)
        config.on_change("host_list_regex", self.load)

    def load(self) -> None:
        """(Re)read host_list and host_list_regex."""
        self.domains = frozenset(ascii_form(d) for d in self._config.get_list("host_list"))
        patterns = []
        for text in self._config.get_list("host_list_regex"):
            try:
                patterns.append(re.compile(text, re.IGNORECASE))
            except re.error as e:
                if self._log is not None:
                    self._log.error(f"host_list_regex: bad pattern {text!r}: {e}")
        self.patterns = tuple(patterns)

    def __contains__(self, domain: object) -> bool:
        if not isinstance(domain, str) or not domain:
            return False
        d = domain.lower().rstrip(".")
        if d in self.domains or (not d.isascii() and ascii_form(d) in self.domains):
            return True
        return any(p.fullmatch(d) for p in self.patterns) if self.patterns else False


def ascii_form(domain: str) -> str:
    """A domain lower-cased, without a trailing dot, its internationalised labels as
    A-labels (C{bücher.example} is C{xn--bcher-kva.example}), so that a list entry and an
    address match whichever form each was written in. A name the IDNA codec refuses stays
    as it is."""
    name = domain.lower().rstrip(".")
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


@implementer(IRegistration)
class Plugin:
    """Loads the host list into server notes as C{host_list} (for plugins that share it)."""

    def register(self, context: IPluginContext) -> None:
        context.server_notes["host_list"] = HostList(context.config, context.log)
