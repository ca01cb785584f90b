"""archive: the names inside an archive, read by libarchive's C{bsdtar}, within bounds.

L{inspect} lists an archive file (C{bsdtar -tf}), reads it through once (C{bsdtar -xOf},
the bytes counted and thrown away) to find an encrypted member and to bound its
decompressed size, and goes into the members that are archives themselves (by their
name's extension), each extracted (C{bsdtar -xOf ... -- <name>}, the name escaped so it
is no pattern) to a file of its own in C{workdir}, then inspected the same way, one
level deeper. Every name comes back with the path of archives that holds it:
C{outer.zip/inner.zip/evil.exe}.

One L{Budget} is shared by everything inspected for a message: names listed, bytes
decompressed, and a deadline. Past one of them, or past C{max_depth} (the outermost
archive is level 0), inspection stops with the matching L{ArchiveError}; the names found
so far are on it. An archive, at any level, that bsdtar cannot list, read through or
extract a member of is L{Unreadable} (a name too long, or one shared by two nested
archives, too: neither could be looked into alone); a lone compressed file
(C{invoice.exe.gz}, no archive to bsdtar) holds the name its own name gives.

bsdtar runs one process at a time for a message, and no more than C{budget.slots} for
all of them, with no terminal (its stdin is closed, and C{--passphrase} is given so that
it never asks for one), C{LC_ALL=C.UTF-8} (so that any name is listed), in C{workdir}; it
is killed the moment a bound is passed or the inspection is cancelled.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

__all__ = [
    "ArchiveError",
    "Budget",
    "Encrypted",
    "Failed",
    "TimedOut",
    "TooDeep",
    "TooLarge",
    "TooMany",
    "Unreadable",
    "inspect",
    "looks_like_archive",
]

#: bsdtar's words for a member it cannot decrypt (zip, 7z, rar), as libarchive puts them
_ENCRYPTED = re.compile(
    rb": (Incorrect passphrase|Passphrase required for this entry|Encryption is not supported"
    rb"|RAR encryption support unavailable|The \S+ is encrypted, but currently not supported"
    rb"|encryption not supported|Too many incorrect passphrases)"
)
#: bsdtar's words for a file that is no archive it knows (a lone gzip file)
_UNKNOWN_FORMAT = b"Unrecognized archive format"
#: extensions of a lone compressed file, whose name without them is what it holds
COMPRESSED = frozenset({"gz", "z", "bz2", "xz", "lz", "zst", "lzma"})
#: the longest name taken from a listing (as in a path on Linux): longer is unreadable
MAX_NAME = 4096
#: what is kept of bsdtar's stderr, for the log
_STDERR_KEPT = 2048
#: the longest listing read, whatever the count of names (a name is at most a few KB)
_LISTING_LIMIT = 4 << 20
#: first bytes of the archive formats bsdtar reads, found whatever the file is called
_MAGIC = (
    b"PK\x03\x04",  # zip (and docx, xlsx, odt, jar, apk: zips all)
    b"PK\x05\x06",  # an empty zip
    b"7z\xbc\xaf\x27\x1c",
    b"Rar!\x1a\x07",
    b"MSCF\x00\x00\x00\x00",  # cab
)
#: bytes needed to tell: a tar's "ustar" is at offset 257
MAGIC_BYTES = 262


def looks_like_archive(head: bytes) -> bool:
    """Whether the first L{MAGIC_BYTES} of a file are those of an archive bsdtar reads."""
    return head.startswith(_MAGIC) or head[257:262] == b"ustar"


class ArchiveError(Exception):
    """Inspection stopped; C{names} holds what was found before it did."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.names: list[str] = []


class Encrypted(ArchiveError):
    """A member cannot be read without a password."""


class Unreadable(ArchiveError):
    """bsdtar could not read the file: corrupt, cut short, or of a format it lacks."""


class TooDeep(ArchiveError):
    """Archives nested past C{max_depth}."""


class TooLarge(ArchiveError):
    """More decompressed bytes than the budget allows."""


class TooMany(ArchiveError):
    """More names than the budget allows."""


class TimedOut(ArchiveError):
    """The deadline passed."""


class Failed(ArchiveError):
    """Ours, not the archive's: bsdtar could not be run, or a file not written."""


@dataclass
class Budget:
    """What every archive of one message may use between them. C{deadline} is on the
    reactor's clock."""

    entries: int
    bytes: int
    deadline: float
    max_depth: int
    extensions: frozenset[str] = field(default_factory=frozenset)
    allow_encrypted: bool = False
    #: bsdtar processes that may run at once; share one among messages to bound them all
    slots: DeferredSemaphore = field(default_factory=lambda: DeferredSemaphore(1))
    entries_used: int = 0
    bytes_used: int = 0


def extension(name: str) -> str:
    """The lower-cased extension of the last part of C{name} (C{"a/b.ZIP"}: C{"zip"}),
    up to a NUL (where a C program's name ends), after the trailing dots and spaces
    Windows ignores; C{""} for none."""
    base = name.split("\0", 1)[0].replace("\\", "/").rsplit("/", 1)[-1].rstrip(". \t")
    stem, dot, ext = base.rpartition(".")
    return ext.lower() if dot and stem else ""


def pattern_for(name: str) -> str:
    """C{name} as a bsdtar pattern that matches it alone: its wildcards escaped."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", name)


async def inspect(
    reactor: Any,
    bsdtar: str,
    path: Path,
    label: str,
    budget: Budget,
    workdir: Path,
    depth: int = 0,
) -> list[str]:
    """The names in the archive at C{path}, each as C{label/name}, and those of the
    archives in it. Raises an L{ArchiveError} (its C{names}: those found so far)."""
    found: list[str] = []
    try:
        await _inspect(reactor, bsdtar, path, label, budget, workdir, depth, found)
    except ArchiveError as e:
        e.names = found
        raise
    return found


async def _inspect(
    reactor: Any,
    bsdtar: str,
    path: Path,
    label: str,
    budget: Budget,
    workdir: Path,
    depth: int,
    found: list[str],
) -> None:
    if depth >= budget.max_depth:
        raise TooDeep(f"{label}: archives nested more than {budget.max_depth} deep")
    names, run = await _list(reactor, bsdtar, path, label, budget, workdir)
    found.extend(f"{label}/{name}" for name in names)
    if run.failed:
        if _UNKNOWN_FORMAT in run.stderr and extension(label) in COMPRESSED:
            # a lone compressed file (notes.txt.gz): what it holds is named by its name
            stem = label.replace("\\", "/").rsplit("/", 1)[-1].rstrip(". \t")
            found.append(f"{label}/{stem.rsplit('.', 1)[0]}")
            return
        if _ENCRYPTED.search(run.stderr):
            if budget.allow_encrypted:
                return  # (nothing more can be read of it)
            raise Encrypted(f"{label}: it is encrypted")
        raise Unreadable(f"{label}: bsdtar could not list it: {run.said}")
    encrypted = await _read_through(reactor, bsdtar, path, label, budget, workdir)
    if encrypted and not budget.allow_encrypted:
        raise Encrypted(f"{label}: a member is encrypted")
    inner_archives = [
        name for name in names if not name.endswith("/") and extension(name) in budget.extensions
    ]
    for index, name in enumerate(inner_archives):
        if names.count(name) > 1:
            # (bsdtar would give all of them as one: none can be looked into alone)
            raise Unreadable(f"{label}/{name}: more than one member has this name")
        inner = workdir / f"{path.name}.{index}"
        try:
            if await _extract(reactor, bsdtar, path, name, inner, label, budget, workdir):
                continue  # (encrypted, and let through: nothing to look into)
            await _inspect(
                reactor, bsdtar, inner, f"{label}/{name}", budget, workdir, depth + 1, found
            )
        finally:
            inner.unlink(missing_ok=True)


async def _list(
    reactor: Any, bsdtar: str, path: Path, label: str, budget: Budget, workdir: Path
) -> tuple[list[str], _Run]:
    """The names bsdtar lists (those it gave before failing too), and how it ended."""
    listing = bytearray()
    lines = 0

    def take(data: bytes) -> bool:
        nonlocal lines
        listing.extend(data)
        lines += data.count(b"\n")
        if budget.entries_used + lines > budget.entries:
            raise TooMany(f"{label}: more than {budget.entries} names in its archives")
        return len(listing) <= _LISTING_LIMIT

    run = await _run(reactor, [bsdtar, "-tf", str(path)], take, budget, label, workdir)
    if run.cut_short:
        raise Unreadable(f"{label}: its listing is over {_LISTING_LIMIT} bytes")
    names = [
        line.decode("utf-8", "replace") for line in bytes(listing).splitlines() if line.strip()
    ]
    budget.entries_used += len(names)
    for name in names:
        if len(name) > MAX_NAME:
            raise Unreadable(f"{label}: a name is over {MAX_NAME} characters")
    return names, run


async def _read_through(
    reactor: Any, bsdtar: str, path: Path, label: str, budget: Budget, workdir: Path
) -> bool:
    """Decompress every member, counting the bytes; whether one is encrypted."""

    def count(data: bytes) -> bool:
        budget.bytes_used += len(data)
        if budget.bytes_used > budget.bytes:
            raise TooLarge(f"{label}: over {budget.bytes} bytes decompressed")
        return True

    run = await _run(reactor, [bsdtar, "-xOf", str(path)], count, budget, label, workdir)
    if run.failed and _ENCRYPTED.search(run.stderr):
        return True
    if run.failed:
        raise Unreadable(f"{label}: bsdtar could not read it through: {run.said}")
    return False


async def _extract(
    reactor: Any,
    bsdtar: str,
    path: Path,
    name: str,
    into: Path,
    label: str,
    budget: Budget,
    workdir: Path,
) -> bool:
    """Member C{name} of C{path} into the file C{into}; True when it is encrypted (and
    that is allowed: otherwise L{_read_through} has already refused it)."""
    with open(into, "wb") as out:

        def write(data: bytes) -> bool:
            if out.closed:  # (cancelled meanwhile)
                return False
            try:
                out.write(data)
            except OSError as e:
                raise Failed(f"{label}/{name}: cannot write it out: {e}") from None
            return True

        args = [bsdtar, "-xOf", str(path), "--", pattern_for(name)]
        run = await _run(reactor, args, write, budget, f"{label}/{name}", workdir)
    if run.failed and _ENCRYPTED.search(run.stderr):
        return True
    if run.failed:
        raise Unreadable(f"{label}/{name}: bsdtar could not extract it: {run.said}")
    return False


@dataclass
class _Run:
    failed: bool
    stderr: bytes
    cut_short: bool = False

    @property
    def said(self) -> str:
        text = self.stderr.decode("utf-8", "replace").strip().replace("\n", "; ")
        return text or "no reason given"


async def _run(
    reactor: Any,
    args: list[str],
    take: Callable[[bytes], bool],
    budget: Budget,
    label: str,
    workdir: Path,
) -> _Run:
    """Run bsdtar with C{args}, handing its output to C{take} (which returns False to
    stop reading, or raises to stop inspecting), until it ends or the deadline, once one
    of C{budget.slots} is free."""
    await budget.slots.acquire()
    try:
        return await _spawn(reactor, args, take, budget.deadline, label, workdir)
    finally:
        budget.slots.release()


async def _spawn(
    reactor: Any,
    args: list[str],
    take: Callable[[bytes], bool],
    deadline: float,
    label: str,
    workdir: Path,
) -> _Run:
    left = deadline - reactor.seconds()
    if left <= 0:
        raise TimedOut(f"{label}: no time left to look into it")
    args = [args[0], "--passphrase", "not-the-password", *args[1:]]
    proto = _Bsdtar(take)
    try:
        reactor.spawnProcess(
            proto,
            args[0],
            args,
            env={"LC_ALL": "C.UTF-8", "PATH": os.defpath},
            path=str(workdir),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
    except OSError as e:
        raise Failed(f"{label}: cannot run bsdtar: {e}") from None
    timer = reactor.callLater(left, proto.kill, TimedOut(f"{label}: timed out"))
    # (cancelled, it kills the process; what the process then says is not waited for)
    ended: Deferred[_Run] = Deferred(canceller=lambda _: proto.kill())

    def settle(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if not ended.called:
            if isinstance(result, Failure):
                ended.errback(result)
            else:
                ended.callback(result)

    proto.done.addBoth(settle)
    return await ended


class _Bsdtar(ProcessProtocol):
    """One bsdtar: stdout to C{take}, stderr kept (its start); C{done} fires with a
    L{_Run}, or fails with the L{ArchiveError} that stopped it."""

    def __init__(self, take: Callable[[bytes], bool]) -> None:
        self.take = take
        self.stderr = bytearray()
        self.stopped: ArchiveError | None = None
        self.cut_short = False
        self.done: Deferred[_Run] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        if self.stopped is not None or self.cut_short:
            return
        try:
            if not self.take(data):
                self.cut_short = True
                self.kill()
        except ArchiveError as e:
            self.kill(e)

    def errReceived(self, data: bytes) -> None:
        self.stderr.extend(data[: max(_STDERR_KEPT - len(self.stderr), 0)])

    def kill(self, reason: ArchiveError | None = None) -> None:
        """Stop the process; C{reason}, if given, is what C{done} fails with."""
        if reason is not None and self.stopped is None:
            self.stopped = reason
        try:
            assert self.transport is not None
            self.transport.signalProcess(signal.SIGKILL)
        except Exception:  # (already gone)
            pass

    def processEnded(self, reason: Failure) -> None:
        if self.stopped is not None:
            self.done.errback(Failure(self.stopped))
            return
        failed = reason.check(ProcessDone) is None
        self.done.callback(_Run(failed, bytes(self.stderr), self.cut_short))
