"""attachment: refuse mail by the names and types of its attachments, and of the files in
its archives.

Haraka's C{attachment}, reading its attachment.ini and its three lists:
attachment.filename.regex (attachment names), attachment.ctype.regex (the content type of
every MIME part) and attachment.archive.filename.regex (names inside archives): one
pattern per line, searched in any case (not anchored: C{executable} matches
C{application/x-executable}). A line that is no pattern is an error naming the file and
line, and is left out.

At DATA the plugin asks for the body to be parsed (so that attachments are seen as they
arrive) and, for each attachment, records its name, type, size and MD5 (C{attach} in the
results; C{attachments}, C{attachment_files}, C{attachment_ctypes} and
C{attachment_archive_files} in the transaction notes, as Haraka names them). An
attachment that is an archive (its name's extension is in C{[archive] extensions}, or its
first bytes are those of a zip, 7z, rar, cab or tar, whatever it is called) is written to a
temporary file on the way. At data_post, the first of these refuses the message
(C{550 5.7.1}):

  1. an attachment name, then a name inside an archive, ending in one of
     C{disallowed_extensions}: C{Message contains disallowed file extension (<ext>)};
  2. a content type matching attachment.ctype.regex:
     C{Message contains unacceptable content type (<type>)};
  3. an attachment name matching attachment.filename.regex:
     C{Message contains unacceptable attachment (<name>)};
  4. the archives, looked into with bsdtar (L{haraka_tw.archive}): nested more than
     C{[archive] max_depth} deep (C{Message contains nested archives exceeding the maximum
     depth}), more than C{max_total_entries} names (C{Message contains an archive whose
     entry count exceeds the limit}), more than C{max_total_bytes} decompressed
     (C{Message contains an archive whose decompressed size exceeds the limit}), an
     encrypted member unless C{allow_encrypted} (C{Message contains encrypted archive}),
     an archive bsdtar cannot list, read through or extract a member of, unless
     C{allow_unreadable} (C{Message contains an archive that cannot be read}); then
     step 1 for the names inside, and a name matching
     attachment.archive.filename.regex (C{Message contains unacceptable attachment
     (<archive>/<name>)}).

Archives are looked into only when no earlier step has refused the message, one bsdtar
at a time (and no more at once, for all messages, than there are cores), all within
C{timeout} (kept a second under the hook's). Past it, or when a temporary file cannot be
written: C{450 4.7.1 Error unpacking archive}, except to a relaying client, whose mail is
judged by the names found so far (as in Haraka). A lone compressed file
(C{invoice.exe.gz}) holds the name its own name gives (C{invoice.exe}). Without bsdtar on
the PATH (or in /usr/local/bin, /usr/bin, /bin), archives are not looked into, which
start-up and each message's results say. A message that ends before data_post has its
files removed at reset_transaction.

Done otherwise than Haraka's plugin: an encrypted archive is refused (Haraka meant to:
its test never matched bsdtar's words), and C{[archive] allow_encrypted} lets it through
(Haraka read another key); C{max_depth} counts each level once (the outermost archive is
level 0, as Haraka's 1.2 counts); the decompressed size counts every member, not only the
archives in it, and a member is never written out beyond it; a name in an archive is
extracted by its exact name (Haraka's was read as a pattern); a trailing dot or space
(which Windows drops) does not hide an extension; empty items in C{disallowed_extensions}
are left out, and the others matched as written (not as patterns); a name is read up to
a NUL; the content types are those of every part at any depth; an archive is known by its
first bytes too; names in any script are listed (Haraka's C{LANG=C} made bsdtar give up
on the archive); an archive that cannot be read is refused, not passed unseen, and told
apart from a timeout; the steps that need no bsdtar come first, so a refusal never waits
for one; C{attachment_count} is the attachments seen (Haraka's counts archives still
being unpacked, 0 by data_post); the shipped
C{disallowed_extensions} leaves out C{zip} (Haraka's refuses every zip).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore
from zope.interface import implementer

from haraka_tw import archive
from haraka_tw.codes import CONT, DENY, DENYSOFT
from haraka_tw.config.formats import ini_count, ini_number
from haraka_tw.hooks.runner import under_hook_limit
from haraka_tw.interfaces import (
    IDataHook,
    IDataPostHook,
    IPluginContext,
    IRegistration,
    IResetTransactionHook,
)
from haraka_tw.message.body import AttachmentInfo
from haraka_tw.smtp.connection import Connection, Transaction

__all__ = ["BOOLEANS", "INI", "LISTS", "Plugin", "Settings", "find_bsdtar", "read_settings"]

INI = "attachment.ini"
#: the pattern lists: what each is matched against
LISTS = {
    "file": "attachment.filename.regex",
    "ctype": "attachment.ctype.regex",
    "archive": "attachment.archive.filename.regex",
}
BOOLEANS = [
    "-archive.allow_encrypted",
    "-main.allow_encrypted_archives",
    "-archive.allow_unreadable",
    "+archive.by_content",
]
_ARCHIVE_EXTENSIONS = "zip tar tgz taz z gz rar 7z"
#: Haraka's shipped list, but for zip
DISALLOWED = (
    "ade adp bat chm cmd com cpl exe hta ins isp jar jse lib lnk mde msc msp mst pif scr"
    " sct shb sys vb vbe vbs vxd wsc wsf wsh dll"
)
#: where Haraka looks for bsdtar, after the PATH
_BSDTAR_DIRS = ("/usr/local/bin", "/usr/bin", "/bin")


def find_bsdtar() -> str | None:
    """bsdtar's path: on the PATH, else in Haraka's three directories."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_BSDTAR_DIRS])
    return shutil.which("bsdtar", path=search)


def _items(text: object) -> list[str]:
    """A list value: items split on commas, semicolons and spaces, empty ones left out."""
    return [item for item in re.split(r"[,; \t]+", str(text or "").strip().lower()) if item]


@dataclass(frozen=True)
class Settings:
    timeout: float = 30.0
    disallowed: frozenset[str] = frozenset(DISALLOWED.split())
    extensions: frozenset[str] = frozenset(_ARCHIVE_EXTENSIONS.split())
    by_content: bool = True
    max_depth: int = 10
    max_total_bytes: int = 104_857_600
    max_total_entries: int = 1000
    allow_encrypted: bool = False
    allow_unreadable: bool = False
    patterns: dict[str, tuple[re.Pattern[str], ...]] = field(default_factory=dict)


def read_settings(ini: dict[str, dict[str, Any]]) -> Settings:
    """attachment.ini's settings (the lists apart); ValueError naming the file and key."""
    main, section = ini["main"], ini.get("archive", {})
    where = f"{INI} [archive]"
    # (Haraka's older keys, in [main], are read when [archive] does not say)
    extensions = section.get("extensions") or main.get("archive_extensions")
    extensions = extensions or main.get("archive_extns") or _ARCHIVE_EXTENSIONS
    depth_from = section if "max_depth" in section else main
    depth_key = "max_depth" if "max_depth" in section else "archive_max_depth"
    return Settings(
        timeout=ini_number(main, "timeout", 30, zero_ok=True, where=f"{INI} [main]") or 30,
        disallowed=frozenset(
            e.lstrip(".") for e in _items(main.get("disallowed_extensions", DISALLOWED))
        ),
        extensions=frozenset(e.lstrip(".") for e in _items(extensions)),
        by_content=bool(section.get("by_content", True)),
        max_depth=ini_count(depth_from, depth_key, 10, where, minimum=1),
        max_total_bytes=ini_count(section, "max_total_bytes", 104_857_600, where, minimum=1),
        max_total_entries=ini_count(section, "max_total_entries", 1000, where, minimum=1),
        allow_encrypted=bool(
            section.get("allow_encrypted") or main.get("allow_encrypted_archives")
        ),
        allow_unreadable=bool(section.get("allow_unreadable")),
    )


class _Attachment:
    """One attachment as it arrives: hashed and counted, and, when it is an archive,
    written to a file of the message's work directory."""

    def __init__(self, scan: _Scan, info: AttachmentInfo) -> None:
        self.scan = scan
        self.name = info.filename or ""
        self.ctype = info.content_type
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0
        by_name = archive.extension(self.name) in scan.settings.extensions
        #: None: not yet known (the first bytes decide); a path: an archive being written
        self.head: bytearray | None = None if by_name else bytearray()
        self.path: Path | None = None
        self.out: Any = None
        if by_name:
            self._open()

    def _open(self) -> None:
        try:
            self.path = self.scan.new_file()
            self.out = open(self.path, "wb")  # noqa: SIM115 (written as the part arrives)
        except OSError as e:
            self.scan.failed = f"cannot write {self.name or self.ctype} to look into: {e}"
            self.path = None

    def data(self, chunk: bytes) -> None:
        self.md5.update(chunk)
        self.size += len(chunk)
        if self.head is not None:  # deciding by the first bytes
            self.head += chunk
            if len(self.head) < archive.MAGIC_BYTES:
                return
            chunk, self.head = bytes(self.head), None
            if not (self.scan.settings.by_content and archive.looks_like_archive(chunk)):
                return
            self._open()
        self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        if self.out is not None:
            try:
                self.out.write(chunk)
            except OSError as e:
                self.scan.failed = f"cannot write {self.name or self.ctype} to look into: {e}"
                self.close()

    def end(self, info: AttachmentInfo) -> None:
        if self.head is not None:  # shorter than the bytes that tell: a zip or 7z maybe
            head, self.head = bytes(self.head), None
            if self.scan.settings.by_content and archive.looks_like_archive(head):
                self._open()
                self._write(head)
        self.close()
        self.scan.ended(self)

    def close(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None


class _Scan:
    """What the plugin learns of one message while it arrives."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.attachments: list[_Attachment] = []
        self.archives: list[_Attachment] = []
        self.failed: str | None = None
        self.workdir: Path | None = None
        self._finalizer: Any = None

    def new_file(self) -> Path:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="haraka-attachment-"))
            # (a message that never reaches data_post leaves nothing behind either)
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.workdir, True)
        return self.workdir / f"{len(self.attachments)}.{os.urandom(4).hex()}"

    def ended(self, attachment: _Attachment) -> None:
        self.attachments.append(attachment)
        if attachment.path is not None:
            self.archives.append(attachment)

    def clean(self) -> None:
        for attachment in self.attachments:
            attachment.close()
        if self._finalizer is not None:
            self._finalizer()


@implementer(IRegistration, IDataHook, IDataPostHook, IResetTransactionHook)
class Plugin:
    name = "attachment"

    def __init__(self) -> None:
        self.settings = Settings()
        self.bsdtar: str | None = None
        #: bsdtar processes at once, for all messages: one per core
        self.slots = DeferredSemaphore(os.cpu_count() or 1)
        self._scans: weakref.WeakKeyDictionary[Transaction, _Scan] = weakref.WeakKeyDictionary()

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.config = context.config
        self.log = context.log
        self.reactor = context.reactor
        self.bsdtar = find_bsdtar()
        if self.bsdtar is None:
            self.log.warn("bsdtar not found: archives are not looked into (install bsdtar)")
        self.load()
        for name in (INI, *LISTS.values()):
            context.config.on_change(name, self.load)

    def load(self) -> None:
        """(Re)read attachment.ini and the lists; a bad value raises, naming it."""
        settings = read_settings(self.config.get_ini(INI, booleans=BOOLEANS))
        patterns = {key: self._patterns(name) for key, name in LISTS.items()}
        self.settings = Settings(**{**settings.__dict__, "patterns": patterns})

    def _patterns(self, name: str) -> tuple[re.Pattern[str], ...]:
        where = str(self.config.path(name) or name)
        patterns = []
        for number, raw in enumerate(self.config.get_data(name), 1):
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            try:
                patterns.append(re.compile(line, re.IGNORECASE))
            except re.error as e:
                self.log.error(f"{where}:{number}: {line!r} is not a regular expression ({e})")
        return tuple(patterns)

    # -- hooks ---------------------------------------------------------------------------

    def hook_data(self, connection: Connection) -> Any:
        txn = connection.transaction
        if txn is None:
            return CONT
        scan = _Scan(self.settings)  # (this message's settings, whatever a reload does)
        self._scans[txn] = scan
        txn.parse_body = True
        txn.attachment_hooks(lambda info: _Attachment(scan, info))
        return CONT

    def hook_reset_transaction(self, connection: Connection) -> Any:
        """A message that ends before data_post (refused by an earlier plugin, cut off,
        too large): its files go now."""
        txn = connection.transaction
        scan = self._scans.pop(txn, None) if txn is not None else None
        if scan is not None:
            scan.clean()
        return CONT

    def hook_data_post(self, connection: Connection) -> Any:
        txn = connection.transaction
        scan = self._scans.pop(txn, None) if txn is not None else None
        if txn is None or scan is None:
            return CONT
        try:
            answer = self._record_and_check(connection, txn, scan)
        except BaseException:
            scan.clean()
            raise
        if answer is None and scan.failed is not None:
            deferred = self._unpack_error(connection, txn, scan.failed)
            if deferred is not CONT:  # (a relaying client's other archives are looked into)
                answer = deferred
        if answer is not None or not scan.archives:
            scan.clean()
            return answer or CONT
        if self.bsdtar is None:
            scan.clean()
            txn.results.add(self.name, skip="archives not looked into: no bsdtar")
            return CONT
        looked: Deferred[Any] = Deferred.fromCoroutine(
            self._look_into(connection, txn, scan, self.bsdtar)
        )

        def clean(result: Any) -> Any:
            scan.clean()
            return result

        return looked.addBoth(clean)

    def _record_and_check(
        self, connection: Connection, txn: Transaction, scan: _Scan
    ) -> tuple[Any, str] | None:
        """Notes and results for every attachment; the refusal of steps 1 to 3, if any."""
        notes, settings = txn.notes, scan.settings
        files = [a.name for a in scan.attachments if a.name]
        for a in scan.attachments:
            md5 = a.md5.hexdigest()
            ext = archive.extension(a.name)
            connection.loginfo(f'file="{a.name}" ctype="{a.ctype}" md5={md5} bytes={a.size}', self)
            txn.results.push(
                self.name, attach={"file": a.name, "ctype": a.ctype, "md5": md5, "bytes": a.size}
            )
            notes.setdefault("attachments", []).append(
                {"ctype": a.ctype, "filename": a.name, "extension": ext, "md5": md5}
            )
        notes["attachment_count"] = len(scan.attachments)
        notes["attachment_files"] = files
        ctypes = [part.content_type for part in txn.body.walk()] if txn.body is not None else []
        notes["attachment_ctypes"] = ctypes
        notes.setdefault("attachment_archive_files", [])
        refusal = self._disallowed(files, settings)
        if refusal is not None:
            return refusal
        for key, values in (("ctype", ctypes), ("file", files)):
            hit = _first_match(settings.patterns.get(key, ()), values)
            if hit is not None:
                value, pattern = hit
                connection.loginfo(f'match {key}="{value}" regexp=/{pattern}/', self)
                txn.results.add(self.name, fail=f"{key}: {value}")
                if key == "ctype":
                    return DENY, f"Message contains unacceptable content type ({value})"
                return DENY, f"Message contains unacceptable attachment ({value})"
        return None

    def _disallowed(self, names: list[str], settings: Settings) -> tuple[Any, str] | None:
        for name in names:
            ext = archive.extension(name)
            if ext and ext in settings.disallowed:
                return DENY, f"Message contains disallowed file extension ({ext})"
        return None

    async def _look_into(
        self, connection: Connection, txn: Transaction, scan: _Scan, bsdtar: str
    ) -> Any:
        settings = scan.settings
        assert scan.workdir is not None
        timeout = under_hook_limit(self.config, self.name, settings.timeout)
        budget = archive.Budget(
            entries=settings.max_total_entries,
            bytes=settings.max_total_bytes,
            deadline=self.reactor.seconds() + timeout,
            max_depth=settings.max_depth,
            extensions=settings.extensions,
            allow_encrypted=settings.allow_encrypted,
            slots=self.slots,
        )
        names: list[str] = txn.notes["attachment_archive_files"]
        for attachment in scan.archives:
            assert attachment.path is not None
            label = attachment.name or attachment.ctype
            try:
                names += await archive.inspect(
                    self.reactor, bsdtar, attachment.path, label, budget, scan.workdir
                )
            except archive.Unreadable as e:
                names += e.names
                txn.results.add(self.name, err=str(e))
                if not settings.allow_unreadable:
                    connection.loginfo(f"refused: {e}", self)
                    return DENY, _UNREADABLE
                connection.logwarn(f"not looked into: {e}", self)
            except (archive.TimedOut, archive.Failed) as e:
                names += e.names
                answer = self._unpack_error(connection, txn, str(e))
                if answer is not CONT:
                    return answer
                break  # (a relaying client: the names found so far are checked)
            except archive.ArchiveError as e:
                names += e.names
                connection.loginfo(f"refused: {e}", self)
                txn.results.add(self.name, fail=str(e))
                return DENY, _REFUSALS[type(e)]
            except OSError as e:
                answer = self._unpack_error(connection, txn, f"{label}: {e}")
                if answer is not CONT:
                    return answer
                break
        if connection.remote.closed:
            return CONT  # the client has gone: nothing is queued
        refusal = self._disallowed(names, settings)
        if refusal is not None:
            return refusal
        hit = _first_match(settings.patterns.get("archive", ()), names)
        if hit is not None:
            value, pattern = hit
            connection.loginfo(f'match archive file="{value}" regexp=/{pattern}/', self)
            txn.results.add(self.name, fail=f"archive: {value}")
            return DENY, f"Message contains unacceptable attachment ({value})"
        txn.results.add(self.name, **{"pass": "archives"})
        return CONT

    def _unpack_error(self, connection: Connection, txn: Transaction, why: str) -> Any:
        """450 for a failure of ours (time, a file, bsdtar not run); CONT for a relaying
        client, whose message is then judged by what was found (as in Haraka)."""
        txn.results.add(self.name, err=why)
        if connection.relaying:
            connection.logwarn(f"{why}; relaying, so not deferred", self)
            return CONT
        connection.logwarn(why, self)
        return DENYSOFT, "Error unpacking archive"


_REFUSALS: dict[type[archive.ArchiveError], str] = {
    archive.TooDeep: "Message contains nested archives exceeding the maximum depth",
    archive.TooMany: "Message contains an archive whose entry count exceeds the limit",
    archive.TooLarge: "Message contains an archive whose decompressed size exceeds the limit",
    archive.Encrypted: "Message contains encrypted archive",
}
_UNREADABLE = "Message contains an archive that cannot be read"


def _first_match(
    patterns: tuple[re.Pattern[str], ...], values: list[str]
) -> tuple[str, str] | None:
    """The first value the first pattern to match any finds (Haraka's order: patterns
    outside, values inside), with that pattern."""
    for pattern in patterns:
        for value in values:
            if pattern.search(value):
                return value, pattern.pattern
    return None
