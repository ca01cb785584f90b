"""clamd: scan each message with ClamAV's clamd at data_post, and refuse what it finds.

Haraka's C{clamd}, reading its clamd.ini and clamd.excludes. The message, as it will be
queued, goes to clamd (L{haraka_tw.clamd}: C{zINSTREAM}); the hosts of C{clamd_socket}
are tried in turn (shuffled with C{randomize_host_order}) until one answers, all within
C{timeout} (kept a second under the hook's own timeout). Then:

  - clean: C{pass: clean} in the results, and the message goes on;
  - found: C{fail: <name>}, and C{550 5.7.1 Message is infected with <name>}, unless the
    name is of a category C{[reject]} lets through (C{Phishing} by default), or matches
    an exclude, or C{[reject] virus} is off: then the message goes on with an
    C{X-Haraka-Virus: <name>} field;
  - clamd could not be asked, or gave no answer: C{err} in the results, and
    C{450 4.7.1} (C{Error connecting to virus scanner}, C{Virus scanner timed out},
    C{Error running virus scanner}) with C{[reject] error} (on by default), else on.

Not scanned (C{skip} in the results): a stream over C{max_size} bytes, or one clamd
refuses as over its C{StreamMaxLength} (both go on unscanned, as in Haraka: a scanner's
size limit is no reason to defer mail for ever; keep C{max_size} under clamd's limit
and the server's C{databytes}); with C{only_with_attachments}, a message without one;
and, as C{[check]} says, mail from clients that logged in, relay, or are on loopback or
private addresses.

clamd.excludes: one signature name per line, C{*} and C{?} as wildcards over the whole
name, or C{/regex/} (searched); any case. A name that matches is let through (with the
field); a C{!} before the pattern makes it refused even so (unless C{[reject] virus} is
off), and is looked at before the categories.

Done otherwise than Haraka's plugin: C{max_size} is compared with what clamd receives
(the Received line, the header as it is now, the body), not the bytes of DATA; every
wildcard of a pattern counts (Haraka's only the first) and a wildcard pattern matches
the whole name (Haraka's only its end); C{!/regex/} works (Haraka kept the closing slash,
so it never matched); a C{!} exclude refuses a name its category would let through;
with every category turned off, they are all let through (Haraka then refused them
all); C{[reject] virus=false} still adds the field; C{timeout} bounds the whole scan
(Haraka's is the time clamd may stay silent), and a host that is unreachable or answers
with an error is followed by the next while time is left (one that stays silent uses
it up); clamd's size-limit answer is a C{skip} (Haraka records an C{err}); C{check.relay}
and C{only_with_attachment} are booleans (Haraka read C{false} as on); a signature name
is cut to the characters 0x21-0x7E (anything else is C{?}) before it goes into a reply or
a field; the replies carry enhanced status codes (5.7.1, 4.7.1).

The keys, with their defaults, are in the shipped etc/clamd.ini and docs/plugins.md.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from haraka_tw import clamd
from haraka_tw.codes import CONT, DENY, DENYSOFT
from haraka_tw.config.formats import ini_number
from haraka_tw.exchange import (
    Address,
    RequestUnreadable,
    ServiceError,
    ServiceTimeout,
    ServiceUnreachable,
)
from haraka_tw.hooks.runner import under_hook_limit
from haraka_tw.interfaces import IDataHook, IDataPostHook, IPluginContext, IRegistration
from haraka_tw.plugins.content_scan import CHECK_BOOLEANS, client_skips
from haraka_tw.smtp.connection import Connection, Transaction
from haraka_tw.smtp.replies import Reply

__all__ = ["BOOLEANS", "CATEGORIES", "INI", "Excludes", "Plugin", "Settings", "read_settings"]

INI = "clamd.ini"
EXCLUDES = "clamd.excludes"
#: [reject] key -> the signature names of its category, and whether it is refused by default
CATEGORIES: dict[str, tuple[re.Pattern[str], bool]] = {
    "Broken.Executable": (re.compile(r"^Broken\.Executable\.?"), True),
    "Structured": (re.compile(r"^Heuristics\.Structured\."), True),
    "Encrypted": (re.compile(r"^Encrypted\."), True),
    "PUA": (re.compile(r"^PUA\."), True),
    "OLE2": (re.compile(r"^Heuristics\.OLE2\.ContainsMacros"), True),
    "Safebrowsing": (re.compile(r"^Heuristics\.Safebrowsing\."), True),
    "UNOFFICIAL": (re.compile(r"\.UNOFFICIAL$"), True),
    "Phishing": (re.compile(r"^Heuristics\.Phishing\."), False),
}
BOOLEANS = [
    "-main.randomize_host_order",
    "-main.only_with_attachments",
    "main.only_with_attachment",
    "+reject.virus",
    "+reject.error",
    *(f"{'+' if on else '-'}reject.{key}" for key, (_, on) in CATEGORIES.items()),
    *CHECK_BOOLEANS,
]
_FIELD = "X-Haraka-Virus"


@dataclass(frozen=True)
class Excludes:
    """clamd.excludes: patterns that let a signature through, and (C{!}) that refuse it
    even so."""

    allow: tuple[re.Pattern[str], ...] = ()
    refuse: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def parse(cls, lines: list[str]) -> Excludes:
        allow: list[re.Pattern[str]] = []
        refuse: list[re.Pattern[str]] = []
        for number, line in enumerate(lines, 1):
            into, pattern = (refuse, line[1:]) if line.startswith("!") else (allow, line)
            try:
                if len(pattern) > 2 and pattern.startswith("/") and pattern.endswith("/"):
                    into.append(re.compile(pattern[1:-1], re.IGNORECASE))
                else:
                    wild = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
                    into.append(re.compile(f"^{wild}$", re.IGNORECASE))
            except re.error as e:
                raise ValueError(f"{EXCLUDES} entry {number} {line!r}: {e}") from None
        return cls(tuple(allow), tuple(refuse))

    def verdict(self, name: str) -> bool | None:
        """True: refuse (a C{!} pattern); False: let through; None: no pattern says."""
        if any(p.search(name) for p in self.refuse):
            return True
        if any(p.search(name) for p in self.allow):
            return False
        return None


_LOCAL_CLAMD = clamd.parse_address("localhost")
_NO_EXCLUDES = Excludes()


@dataclass(frozen=True)
class Settings:
    hosts: tuple[Address, ...] = (_LOCAL_CLAMD,)
    randomize: bool = False
    timeout: float = 30.0
    connect_timeout: float = 10.0
    max_size: int = 26_214_400
    only_with_attachments: bool = False
    reject: dict[str, bool] = field(default_factory=dict)
    check: dict[str, bool] = field(default_factory=dict)
    excludes: Excludes = _NO_EXCLUDES

    def let_through(self, name: str) -> bool:
        """Whether C{name} is of a category C{[reject]} lets through, and of none it
        refuses (as Haraka reads them: C{Heuristics.Phishing.X.UNOFFICIAL} is refused
        while C{UNOFFICIAL} is on)."""
        kinds = [self.reject.get(key, on) for key, (p, on) in CATEGORIES.items() if p.search(name)]
        return bool(kinds) and not any(kinds)


def read_settings(ini: dict[str, dict[str, Any]], excludes: list[str]) -> Settings:
    """clamd.ini's and clamd.excludes' settings; ValueError naming the file and key."""
    main = ini["main"]
    where = f"{INI} [main]"
    hosts = []
    listed = str(main.get("clamd_socket") or "localhost:3310")
    for text in filter(None, re.split(r"[,; ]+", listed)):  # (a trailing comma adds none)
        try:
            hosts.append(clamd.parse_address(text))
        except ValueError as e:
            raise ValueError(f"{where} clamd_socket: {e}") from None
    # (Haraka also reads only_with_attachment, in the singular)
    only = main.get("only_with_attachments") or main.get("only_with_attachment")
    return Settings(
        hosts=tuple(hosts),
        randomize=bool(main.get("randomize_host_order")),
        timeout=ini_number(main, "timeout", 30, zero_ok=True, where=where) or 30,
        connect_timeout=ini_number(main, "connect_timeout", 10, zero_ok=True, where=where) or 10,
        max_size=int(ini_number(main, "max_size", 26_214_400, zero_ok=False, where=where)),
        only_with_attachments=bool(only),
        reject={key: bool(value) for key, value in ini.get("reject", {}).items()},
        check={key: bool(value) for key, value in ini.get("check", {}).items()},
        excludes=Excludes.parse(excludes),
    )


@implementer(IRegistration, IDataHook, IDataPostHook)
class Plugin:
    name = "clamd"

    def __init__(self) -> None:
        self.settings = Settings()

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.reactor = context.reactor
        self.load()
        context.config.on_change(INI, self.load)
        context.config.on_change(EXCLUDES, self.load)

    def load(self) -> None:
        """(Re)read clamd.ini and clamd.excludes; a bad value raises, naming it."""
        ini = self.config.get_ini(INI, booleans=BOOLEANS)
        self.settings = read_settings(ini, self.config.get_list(EXCLUDES))

    # -- hooks ---------------------------------------------------------------------------

    def hook_data(self, connection: Connection) -> Any:
        txn = connection.transaction
        if txn is not None and self.settings.only_with_attachments:
            txn.notes.clamd_attachments = False  # (data_post skips only when this is here)

            def found(info: Any) -> None:
                txn.notes.clamd_attachments = True

            txn.attachment_hooks(found)
        return CONT

    def hook_data_post(self, connection: Connection) -> Any:
        txn = connection.transaction
        if txn is None:
            return CONT
        settings = self.settings  # (this message's, whatever a reload does meanwhile)
        reasons = client_skips(connection, settings.check)
        if not reasons and txn.notes.get("clamd_attachments") is False:
            reasons.append("no attachments")
        size = clamd.request_size(txn.message_stream.size)
        if not reasons and size > settings.max_size:
            reasons.append(f"exceeds max size ({size} > {settings.max_size})")
        if reasons:
            for reason in reasons:
                txn.results.add(self.name, skip=reason)
            return CONT
        hosts = list(settings.hosts)
        if settings.randomize:
            random.shuffle(hosts)
        deadline = self.reactor.seconds() + under_hook_limit(
            self.config, self.name, settings.timeout
        )
        answered: Deferred[Any] = Deferred.fromCoroutine(
            self._scan(connection, txn, settings, hosts, deadline)
        )
        return answered

    async def _scan(
        self,
        connection: Connection,
        txn: Transaction,
        settings: Settings,
        hosts: list[Address],
        deadline: float,
    ) -> Any:
        """Ask each host in turn until one answers, while time is left. (A cancel, the
        runner's own timeout, ends it: CancelledError is no ServiceError.)"""
        error: ServiceError | None = None
        for address in hosts:
            left = deadline - self.reactor.seconds()
            if left <= 0:
                break
            try:
                answer = await clamd.scan(
                    self.reactor,
                    address,
                    txn.message_stream.chunks(),
                    timeout=left,
                    connect_timeout=min(settings.connect_timeout, left),
                )
            except RequestUnreadable as e:
                error = e
                connection.logerror(f"{e}", self)
                break  # (no host can read what we cannot)
            except ServiceError as e:
                error = e
                connection.logwarn(f"{e}", self)
                continue
            return self._judge(connection, txn, settings, answer)
        if isinstance(error, ServiceTimeout) and not error.connecting:
            text = "Virus scanner timed out"
        elif error is None or isinstance(error, (ServiceUnreachable, ServiceTimeout)):
            text = "Error connecting to virus scanner"
        else:
            text = "Error running virus scanner"
        txn.results.add(self.name, err=str(error) if error else "no time left to connect")
        return (DENYSOFT, text) if settings.reject.get("error", True) else CONT

    def _judge(
        self,
        connection: Connection,
        txn: Transaction,
        settings: Settings,
        answer: clamd.ClamdAnswer,
    ) -> Any:
        if connection.remote.closed:
            return CONT  # the client has gone: nothing is queued
        if answer.size_limit:
            txn.results.add(
                self.name,
                skip="INSTREAM size limit exceeded. Check StreamMaxLength in clamd.conf",
            )
            connection.logwarn("over clamd's StreamMaxLength: not scanned", self)
            return CONT
        virus = answer.virus
        if virus is None:
            txn.results.add(self.name, **{"pass": "clean"})
            return CONT
        txn.results.add(self.name, fail=virus)
        refuse = settings.reject.get("virus", True) and settings.excludes.verdict(virus)
        if refuse is None:
            refuse = not settings.let_through(virus)
        if not refuse:
            connection.logwarn(f"{virus} found, let through", self)
            txn.add_header(_FIELD, virus)
            return CONT
        connection.loginfo(f"{virus} found: refused", self)
        return DENY, Reply(550, "5.7.1", (f"Message is infected with {virus}",))
