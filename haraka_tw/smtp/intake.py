"""Message intake: the bytes of one message, from DATA or BDAT, into the transaction.

A L{MessageIntake} takes the message as it arrives: through the bulk L{DataReader} for DATA
(dot-stuffed, ended by CRLF.CRLF) or as raw BDAT chunks. It finds the end of the header,
parses it, renames Authentication-Results and puts the Received header on top, then streams
the body into the transaction's MessageStream (memory, or a spool file). Nothing here
touches the network; the protocol feeds it and asks for the summary at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from haraka_tw.message.body import BodyParser, BodyRewriter
from haraka_tw.message.header import Header, HeaderCollector
from haraka_tw.smtp.connection import Transaction
from haraka_tw.smtp.data import ChunkNewlines, DataReader
from haraka_tw.smtp.settings import SessionSettings

__all__ = ["MessageEnd", "MessageIntake"]


# (not frozen: made once per message and read once; frozen costs three times as much)
@dataclass(slots=True)
class MessageEnd:
    """What the end-of-data checks need to know about the message received."""

    size: int
    exceeded: bool
    long_lines: bool
    bare_lf: int
    bare_cr: int
    too_many_parts: bool = False
    plugin_errors: tuple[BaseException, ...] = ()
    store_error: OSError | None = None  # the body could not be stored (spool dir, full disk)


class MessageIntake:
    """One message on its way into C{transaction}."""

    def __init__(
        self,
        transaction: Transaction,
        settings: SessionSettings,
        received: str | None,
        *,
        discard: bool = False,
    ) -> None:
        self.transaction = transaction
        self.discard = discard  # read to the end, keep nothing
        self._settings = settings
        self._received = received
        self._collector = HeaderCollector(max_lines=settings.header_max_lines)
        self._reader: DataReader | None = None
        self._parser: BodyParser | None = None  # when a plugin asked for the MIME body
        self._chunked = 0  # BDAT bytes taken so far
        self._chunk_exceeded = False
        self._chunk_newlines: ChunkNewlines | None = None
        self._store_error: OSError | None = None  # then nothing more is stored

    # -- DATA -------------------------------------------------------------------------

    def feed_data(self, data: bytes) -> bytes | None:
        """DATA bytes; once CRLF.CRLF is seen, the bytes after it (else None)."""
        if self._reader is None:
            s = self._settings
            self._reader = DataReader(
                self._sink,
                max_bytes=s.max_bytes,
                max_line_length=s.max_data_line_length,
                bare_newline=s.bare_newline,
            )
        return self._reader.feed(data)

    # -- BDAT -------------------------------------------------------------------------

    def feed_chunk(self, data: bytes) -> None:
        """Raw BDAT bytes (no dot-stuffing, no terminator); counted against max.bytes."""
        self._chunked += len(data)
        limit = self._settings.max_bytes
        if limit and self._chunked > limit:
            self._chunk_exceeded = True  # stop storing; keep reading the chunks
            return
        newlines = self._chunk_newlines
        if newlines is None:
            newlines = self._chunk_newlines = ChunkNewlines(self._settings.bare_newline)
        data = newlines.feed(data)
        if data:
            self._sink(data)

    # -- both ------------------------------------------------------------------------------

    def finish(self) -> MessageEnd:
        """The message is complete: end the header if it never ended, and sum up."""
        newlines = self._chunk_newlines
        if newlines is not None and not self._chunk_exceeded:
            tail = newlines.finish()
            if tail:
                self._sink(tail)
        if not self._collector.done and not self.discard:
            self._header_done(*self._collector.finish())
        txn = self.transaction
        txn.data_bytes = self.size
        parser, too_many = self._parser, False
        errors: tuple[BaseException, ...] = ()
        if parser is not None:
            self._store(parser.close())
            txn.body = parser.body
            txn.mime_part_count = parser.mime_part_count
            too_many, errors = parser.too_many_parts, tuple(parser.errors)
        if self._store_error is None and not self.discard:
            try:  # (a spool file's buffer: a full disk may only show now)
                txn.message_stream.flush()
            except OSError as e:
                self._store_error = e
        reader = self._reader
        if reader is None:  # (BDAT)
            return MessageEnd(
                size=self._chunked,
                exceeded=self._chunk_exceeded,
                long_lines=False,
                bare_lf=newlines.bare_lf if newlines is not None else 0,
                bare_cr=newlines.bare_cr if newlines is not None else 0,
                too_many_parts=too_many,
                plugin_errors=errors,
                store_error=self._store_error,
            )
        return MessageEnd(
            size=reader.size,
            exceeded=reader.exceeded,
            long_lines=reader.long_lines,
            bare_lf=reader.bare_lf,
            bare_cr=reader.bare_cr,
            too_many_parts=too_many,
            plugin_errors=errors,
            store_error=self._store_error,
        )

    def close(self) -> None:
        """The message is abandoned (the client left, or the transaction was reset)."""
        if self._reader is not None:
            self._reader.close()

    @property
    def size(self) -> int:
        """Bytes received so far (before unstuffing, for DATA)."""
        return self._reader.size if self._reader is not None else self._chunked

    def _sink(self, data: bytes) -> None:
        if self.discard:
            return
        if not self._collector.done:
            split = self._collector.feed(data)
            if split is not None:
                self._header_done(*split)
            return
        if self._parser is not None:
            data = self._parser.feed(data)
        self._store(data)

    def _store(self, data: bytes) -> None:
        """Body bytes into the transaction's stream. A write that fails (the spool
        directory unusable, the disk full) is kept for L{finish}, which tells the session
        to refuse the message for now; the rest of the message is read and dropped."""
        if self._store_error is not None:
            return
        try:
            self.transaction.message_stream.write(data)
        except OSError as e:
            self._store_error = e

    def _header_done(self, head: bytes, body: bytes) -> None:
        header = Header.parse(head)
        if self._settings.clean_auth_results:
            header.rename("Authentication-Results", "Original-Authentication-Results")
        if self._settings.add_received and self._received:
            header.add("Received", self._received)
        txn = self.transaction
        if len(txn.header):  # fields plugins added before DATA (spf's Received-SPF at MAIL)
            header.add_on_top(txn.header)
        txn.header = header
        if txn.parse_body:
            rewriter = None
            if txn.body_filters or txn.banner is not None:
                rewriter = BodyRewriter(filters=txn.body_filters, banner=txn.banner)
            self._parser = BodyParser(
                header,
                max_mime_parts=self._settings.max_mime_parts,
                attachment_hooks=txn.attachment_hook_list,
                rewriter=rewriter,
            )
            body = self._parser.feed(body)
        self._store(body)
