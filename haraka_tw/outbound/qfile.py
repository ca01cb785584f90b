"""The outbound queue file: Haraka's format, read and written without a reactor.

A queue file is::

    4 bytes    big-endian length L of the todo
    L bytes    the todo: a UTF-8 JSON object (Haraka wraps it in newlines; both read)
    the rest   the message, raw CRLF bytes, not dot-stuffed

The todo holds Haraka's keys (``queue_time`` in epoch milliseconds, ``domain``,
``rcpt_to``, ``mail_from``, ``notes``, ``uuid``, ``force_tls``) and ours (``ret``,
``envid``, ``dsn_delayed_sent``, ``message_size``). Addresses are written in the shape of
Haraka's address-rfc2821 objects (``original``, ``original_host``, ``host``, ``user``) with
``address`` and ``params`` added, so Haraka can read our files and we read Haraka's
(whose ``mail_from`` and ``rcpt_to`` entries have no ``address``; a plain string is read
too). ``message_size`` is written last, as a number padded with JSON whitespace and filled
in once the message has been written; a file whose size disagrees with it is torn.

The file name is Haraka's ``<arrival>_<next_attempt>_<attempts>_<pid>_<rand>_<counter>_<host>``
with times in epoch milliseconds (see L{QueueName}).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import socket
import stat
import string
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

__all__ = [
    "MAX_TODO_LENGTH",
    "QueueFileError",
    "QueueName",
    "QueueRecipient",
    "Todo",
    "message_reader",
    "open_queue_file",
    "parse_todo",
    "read_todo",
    "read_todo_from",
    "write_queue_file",
]

#: A declared todo length above this is taken for a corrupt file, not a huge todo.
MAX_TODO_LENGTH = 64 * 1024 * 1024

_PREFIX = struct.Struct(">I")
_SIZE_FIELD = 20  # characters reserved for message_size: a 64-bit count fits with spaces
_RAND_CHARS = string.ascii_letters + string.digits


class QueueFileError(Exception):
    """A queue file (or name) that cannot be read; C{str()} names the file and the fault."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class QueueRecipient:
    """One envelope recipient.

    C{address} is the bare address (``user@host``); C{original} what the client wrote
    (``<User@Host>``); C{params} the RCPT parameters the DSN needs (``NOTIFY``, ``ORCPT``,
    values as received: ORCPT still xtext).
    """

    address: str
    original: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.original:
            self.original = f"<{self.address}>"


@dataclass
class Todo:
    """What to deliver: the JSON part of a queue file.

    Times are epoch seconds here (milliseconds on disk). C{mail_from} is ``""`` for the
    null sender. C{message_size} is filled in by L{write_queue_file}; None for Haraka's
    files, which do not record it.
    """

    domain: str
    mail_from: str
    rcpt_to: list[QueueRecipient]
    uuid: str
    queue_time: float
    notes: dict[str, Any] = field(default_factory=dict)
    force_tls: bool = False
    ret: str | None = None
    envid: str | None = None
    dsn_delayed_sent: bool = False
    message_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to disk (without ``message_size``)."""
        return {
            "queue_time": _ms(self.queue_time),
            "domain": self.domain,
            "rcpt_to": [_address_json(r.address, r.original, r.params) for r in self.rcpt_to],
            "mail_from": _address_json(self.mail_from, None, None),
            "notes": self.notes,
            "uuid": self.uuid,
            "force_tls": self.force_tls,
            "ret": self.ret,
            "envid": self.envid,
            "dsn_delayed_sent": self.dsn_delayed_sent,
        }

    @classmethod
    def from_json(cls, data: object, where: str = "todo") -> Todo:
        """A Todo from a parsed JSON object, ours or Haraka's.

        @raise QueueFileError: if a required key is missing or has the wrong type.
        """
        if not isinstance(data, dict):
            raise QueueFileError(where, "the todo is not a JSON object")
        try:
            rcpts = data["rcpt_to"]
            if not isinstance(rcpts, list):
                raise TypeError("rcpt_to is not a list")
            if not rcpts:
                raise ValueError("rcpt_to is empty")
            domain = data["domain"]
            if not isinstance(domain, str) or not domain.strip():
                raise ValueError(f"domain is {domain!r}, not a domain name")
            notes = data.get("notes") or {}
            if not isinstance(notes, dict):
                raise TypeError("notes is not an object")
            size = data.get("message_size")
            queue_time = float(data.get("queue_time") or 0) / 1000
            if not math.isfinite(queue_time) or queue_time < 0:
                raise ValueError(f"queue_time is {data.get('queue_time')!r}, not a time")
            if size is not None and (isinstance(size, bool) or int(size) < 0):
                raise ValueError(f"message_size is {size!r}, not a size")
            todo = cls(
                domain=domain,
                mail_from=_address_of(data.get("mail_from")),
                rcpt_to=[_recipient_of(r) for r in rcpts],
                uuid=str(data.get("uuid") or ""),
                queue_time=queue_time,
                notes=notes,
                force_tls=bool(data.get("force_tls", False)),
                ret=_optional_str(data.get("ret")),
                envid=_optional_str(data.get("envid")),
                dsn_delayed_sent=bool(data.get("dsn_delayed_sent", False)),
                message_size=None if size is None else int(size),
            )
            _valid_text(todo.domain, todo.mail_from, todo.uuid, *(r.address for r in todo.rcpt_to))
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # (1e999 is inf)
            raise QueueFileError(where, f"bad todo: {type(e).__name__}: {e}") from None
        return todo


def _valid_text(*texts: str) -> None:
    """The todo is UTF-8 JSON, read with surrogateescape so that no byte is lost: a lone
    surrogate in an address, the domain or the uuid is a byte that was not UTF-8, which
    no SMTP command can carry (notes may hold them: they are the transaction's)."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{text!r} is not valid UTF-8") from None


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _split_address(address: str) -> tuple[str | None, str | None]:
    if not address:
        return None, None
    user, at, host = address.rpartition("@")
    if not at:
        return address, None
    if len(user) >= 2 and user.startswith('"') and user.endswith('"'):
        user = user[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return user, host.lower()


def _address_json(
    address: str, original: str | None, params: dict[str, str] | None
) -> dict[str, Any]:
    """Haraka's address-rfc2821 shape, plus C{address} (and C{params} for recipients)."""
    user, host = _split_address(address)
    out: dict[str, Any] = {
        "original": original or f"<{address}>",
        "original_host": address.rpartition("@")[2] if host else None,
        "host": host,
        "user": user,
        "address": address,
    }
    if params is not None:
        out["params"] = dict(params)
    return out


def _address_of(value: object) -> str:
    """The bare address of a JSON address: ours, Haraka's object, or a plain string."""
    if value is None:
        return ""
    if isinstance(value, str):
        text = value.strip()
        return text[1:-1] if text.startswith("<") and text.endswith(">") else text
    if not isinstance(value, dict):
        raise TypeError(f"an address is a {type(value).__name__}")
    if isinstance(value.get("address"), str):
        return str(value["address"])
    user, host = value.get("user"), value.get("host")
    if user:
        return f"{user}@{host}" if host else str(user)
    if "user" in value or "host" in value:
        return ""  # Haraka's null sender: user and host null
    return _address_of(value.get("original"))


def _recipient_of(value: object) -> QueueRecipient:
    address = _address_of(value)
    if not address:
        raise ValueError("a recipient has no address")
    _, at, host = address.rpartition("@")
    if not at or not host:
        raise ValueError(f"the recipient {address!r} has no domain")
    original = ""
    params: dict[str, str] = {}
    if isinstance(value, dict):
        original = str(value.get("original") or "")
        raw = value.get("params") or {}
        if not isinstance(raw, dict):
            raise TypeError("recipient params is not an object")
        params = {str(k): str(v) for k, v in raw.items() if v is not None}
    elif isinstance(value, str):
        original = value.strip()
    return QueueRecipient(address=address, original=original, params=params)


def _json_default(value: object) -> object:
    """Notes are the transaction's: make what JSON cannot hold into something it can."""
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


def encode_todo(todo: Todo, message_size: int) -> bytes:
    """The todo's JSON bytes with ``message_size`` last, padded to a fixed width."""
    body = json.dumps(todo.to_json(), ensure_ascii=False, default=_json_default)
    head = body[:-1] + ("," if body != "{}" else "") + '"message_size":'
    return (head + str(message_size).rjust(_SIZE_FIELD) + "}").encode("utf-8", "surrogateescape")


def write_queue_file(target: int | BinaryIO, todo: Todo, message_chunks: Iterable[bytes]) -> int:
    """Write a whole queue file to C{target} (a file descriptor or a seekable binary file).

    The message size is counted while writing and filled into the todo at the end (so
    C{target} must be seekable); C{todo.message_size} is set. Nothing is flushed or synced:
    that is the caller's part. Returns the number of bytes written.
    """
    if isinstance(target, int):
        with os.fdopen(target, "wb", closefd=False) as f:
            return write_queue_file(f, todo, message_chunks)
    start = target.tell()
    header = encode_todo(todo, 0)
    target.write(_PREFIX.pack(len(header)) + header)
    size = 0
    for chunk in message_chunks:
        target.write(chunk)
        size += len(chunk)
    end = target.tell()
    field_at = start + _PREFIX.size + len(header) - 1 - _SIZE_FIELD
    target.seek(field_at)
    target.write(str(size).rjust(_SIZE_FIELD).encode("ascii"))
    target.seek(end)
    todo.message_size = size
    return end - start


def parse_todo(data: bytes, where: str = "todo") -> Todo:
    """The Todo in C{data} (the JSON part of a queue file).

    @raise QueueFileError: if it is not JSON or not a todo.
    """
    text = data.decode("utf-8", "surrogateescape").strip()
    if not text.endswith("}"):
        raise QueueFileError(where, f"the todo does not end with '}}' (ends {text[-10:]!r})")
    try:
        parsed = json.loads(text)
    except ValueError as e:
        raise QueueFileError(where, f"bad JSON in the todo: {e}") from None
    except RecursionError:
        raise QueueFileError(where, "bad JSON in the todo: nested too deeply") from None
    return Todo.from_json(parsed, where)


def read_todo_from(f: BinaryIO, where: str, file_size: int) -> tuple[Todo, int]:
    """Read the todo from the start of C{f}; return it and the offset of the message.

    @raise QueueFileError: for a file shorter than its declared todo, a bad todo, or (for
        files that record it) a message shorter or longer than recorded.
    """
    if file_size == 0:
        raise QueueFileError(where, "empty file (zero bytes)")
    prefix = f.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise QueueFileError(where, f"truncated: {len(prefix)} bytes, no todo length")
    (length,) = _PREFIX.unpack(prefix)
    if length == 0:
        raise QueueFileError(where, "declared todo length is zero")
    if length > MAX_TODO_LENGTH or length > file_size - _PREFIX.size:
        raise QueueFileError(
            where,
            f"wrong declared todo length {length}: only {file_size - _PREFIX.size} bytes follow",
        )
    data = f.read(length)
    if len(data) != length:
        raise QueueFileError(where, f"truncated todo: {len(data)} of {length} bytes")
    todo = parse_todo(data, where)
    offset = _PREFIX.size + length
    if todo.message_size is not None and offset + todo.message_size != file_size:
        raise QueueFileError(
            where,
            f"torn: the message should be {todo.message_size} bytes, "
            f"the file holds {file_size - offset}",
        )
    return todo, offset


def open_queue_file(path: str | os.PathLike[str]) -> tuple[BinaryIO, int]:
    """Open a queue file for reading; return it and its size. Opened without blocking, so
    that a FIFO (or a device) under a queue file's name is refused, not waited on.

    @raise QueueFileError: for anything but a regular file, or one that cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise QueueFileError(path, f"cannot read: {e.strerror or e}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise QueueFileError(path, "not a regular file")
    return os.fdopen(fd, "rb"), info.st_size


def read_todo(path: str | os.PathLike[str]) -> tuple[Todo, int]:
    """Read a queue file's todo; return it and the offset where the message starts.

    @raise QueueFileError: for any fault, the file unreadable, missing or not a regular
        file included.
    """
    f, size = open_queue_file(path)
    try:
        with f:
            return read_todo_from(f, str(path), size)
    except OSError as e:
        raise QueueFileError(path, f"cannot read: {e.strerror or e}") from None


def message_reader(
    path: str | os.PathLike[str], offset: int, size: int | None = None, chunk: int = 64 * 1024
) -> Iterator[bytes]:
    """The message bytes of a queue file, C{chunk} bytes at a time, from C{offset}.

    The file is opened on the first C{next()} and closed when the iterator is exhausted
    or closed. With C{size} (the message's size when the file was scanned), a file that
    no longer holds that many bytes after C{offset} (cut short or grown since) raises
    L{QueueFileError} before any byte is yielded.
    """
    with open(path, "rb") as f:
        if size is not None:
            held = os.fstat(f.fileno()).st_size - offset
            if held != size:
                raise QueueFileError(
                    str(path), f"the message is {held} bytes, {size} recorded: the file changed"
                )
        f.seek(offset)
        while data := f.read(chunk):
            yield data


def message_of(blob: bytes, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """The message bytes of an in-memory queue file, in chunks."""
    f = io.BytesIO(blob)
    _todo, offset = read_todo_from(f, "memory", len(blob))
    for start in range(offset, len(blob), chunk):
        yield blob[start : start + chunk]


# -- names -------------------------------------------------------------------------------

_counter_lock = threading.Lock()
_counter = 0


def _next_counter() -> int:
    """Haraka's per-process counter: 1 .. 10000, then round again from 0."""
    global _counter
    with _counter_lock:
        _counter = _counter + 1 if _counter < 10000 else 0
        return _counter


def escape_host(hostname: str) -> str:
    """A host name made safe for a queue file name (Haraka's and Maildir's escapes)."""
    return (
        hostname.replace("\\", "\\134")
        .replace("/", "\\057")
        .replace(":", "\\072")
        .replace("_", "\\137")
    )


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


#: the latest time a queue file name may hold, in milliseconds: the end of the year 9999
#: (what the time functions take; a float holds it exactly)
_LATEST_MS = 253402300799999


@dataclass(frozen=True)
class QueueName:
    """A queue file name: when it arrived, when to try next, how many tries failed, who.

    Times are epoch seconds, kept to the millisecond (what the name holds). C{host} is
    the name's host part as written (escaped). C{id} is the part that never changes while
    the file is rescheduled: arrival, pid, rand, counter and host.
    """

    arrival: float
    next_attempt: float
    attempts: int
    pid: int
    rand: str
    counter: int
    host: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "arrival", _ms(self.arrival) / 1000)
        object.__setattr__(self, "next_attempt", _ms(self.next_attempt) / 1000)

    @classmethod
    def new(
        cls,
        arrival: float,
        next_attempt: float | None = None,
        attempts: int = 0,
        hostname: str | None = None,
    ) -> QueueName:
        """A fresh name for this process: its pid, a random tag, the next counter."""
        return cls(
            arrival=arrival,
            next_attempt=arrival if next_attempt is None else next_attempt,
            attempts=attempts,
            pid=os.getpid(),
            rand="".join(random.choices(_RAND_CHARS, k=6)),
            counter=_next_counter(),
            host=escape_host(hostname or socket.gethostname()),
        )

    def format(self) -> str:
        """The file name."""
        return "_".join(
            (
                str(_ms(self.arrival)),
                str(_ms(self.next_attempt)),
                str(self.attempts),
                str(self.pid),
                self.rand,
                str(self.counter),
                self.host,
            )
        )

    __str__ = format

    @property
    def id(self) -> str:
        """The stable identity: the name without next_attempt and attempts."""
        return "_".join(
            (str(_ms(self.arrival)), str(self.pid), self.rand, str(self.counter), self.host)
        )

    def rescheduled(self, next_attempt: float, attempts: int) -> QueueName:
        """The same file's name with a new next attempt and failure count."""
        return replace(self, next_attempt=next_attempt, attempts=attempts)

    @classmethod
    def parse(cls, name: str) -> QueueName:
        """Read a file name.

        @raise QueueFileError: if C{name} is not a queue file name.
        """
        parts = name.split("_")
        if len(parts) != 7:
            raise QueueFileError(name, "not a queue file name (7 parts joined by '_')")
        arrival, next_attempt, attempts, pid, rand, counter, host = parts
        numbers = (arrival, next_attempt, attempts, pid, counter)
        if not all(p.isascii() and p.isdigit() for p in numbers) or not rand or not host:
            raise QueueFileError(name, "not a queue file name (bad numeric part)")
        if max(int(arrival), int(next_attempt)) > _LATEST_MS:
            raise QueueFileError(name, "not a queue file name (a time past the year 9999)")
        return cls(
            arrival=int(arrival) / 1000,
            next_attempt=int(next_attempt) / 1000,
            attempts=int(attempts),
            pid=int(pid),
            rand=rand,
            counter=int(counter),
            host=host,
        )
