"""queue/qmail-queue: hand each message to qmail's C{qmail-queue} program.

As qmail-queue(8) wants it: the message on file descriptor 0 (LF line ends), the
envelope on file descriptor 1 as C{F<sender>\\0} then C{T<recipient>\\0} for each
recipient, then one more C{\\0}. The exit code is the answer:

- 0: queued, OK;
- 11 to 40: a permanent error, DENY (e.g. 11 "address too long");
- anything else, or death by a signal: a temporary error, DENYSOFT (e.g. 53 "write
  error", 71 "mail server temporarily refuses").

The reply text names the code and qmail-queue(8)'s meaning of it. The program runs under
Twisted's C{spawnProcess}; the message is streamed to it as the pipe takes it. If the
hook times out the program is killed (before it exits 0, qmail has not queued the
message).

Config: C{qmail-queue.path} (one line, default C{/var/qmail/bin/qmail-queue}; the plugin
refuses to load when it is not there), and C{qmail-queue.ini} C{[main] enable_outbound}
(default true: relayed mail goes to qmail-queue too; false leaves it to the built-in
outbound queue). Unlike Haraka, which answers CONT on any failure, the exit code decides.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from haraka_tw.codes import CONT, DENY, DENYSOFT, OK, HookResult
from haraka_tw.interfaces import IPluginContext, IQueueHook, IQueueOutboundHook, IRegistration
from haraka_tw.plugins.queue.forwarding import queue_wants
from haraka_tw.plugins.queue.quarantine import to_lf
from haraka_tw.smtp.replies import Reply

__all__ = ["DEFAULT_PATH", "EXIT_CODES", "Plugin", "QmailQueue", "answer_for", "envelope"]

DEFAULT_PATH = "/var/qmail/bin/qmail-queue"
QMAIL_QUEUE_INI = "qmail-queue.ini"

#: qmail-queue(8)'s exit codes.
EXIT_CODES = {
    11: "address too long",
    31: "mail server permanently refuses to send the message to any recipients",
    51: "out of memory",
    52: "timeout",
    53: "write error (e.g. disk full)",
    54: "unable to read the message or envelope",
    55: "unable to read a configuration file",
    56: "problem making a network connection",
    61: "problem with the qmail home directory",
    62: "problem with the queue directory",
    63: "problem with queue/pid",
    64: "problem with queue/mess",
    65: "problem with queue/intd",
    66: "problem with queue/todo",
    71: "mail server temporarily refuses to send the message to any recipients",
    72: "connection to mail server timed out",
    73: "connection to mail server rejected",
    74: "communication with mail server failed",
    81: "internal bug",
    91: "envelope format error",
}


def envelope(sender: str, recipients: Iterable[str]) -> bytes:
    """qmail-queue's envelope: C{F<sender>\\0}, C{T<rcpt>\\0} each, and a final C{\\0}."""
    parts = [b"F" + sender.encode("utf-8") + b"\0"]
    parts += [b"T" + r.encode("utf-8") + b"\0" for r in recipients]
    return b"".join(parts) + b"\0"


def answer_for(exit_code: int | None, signal: int | None = None) -> HookResult:
    """The hook's answer for how qmail-queue ended."""
    if exit_code == 0:
        return HookResult(OK)
    if exit_code is None:
        text = f"qmail-queue killed by signal {signal}, try again later"
        return HookResult(DENYSOFT, Reply.of(451, "4.3.0", text))
    meaning = EXIT_CODES.get(exit_code, "unknown error")
    if 11 <= exit_code <= 40:
        return HookResult(DENY, Reply.of(554, "5.3.0", f"qmail-queue: {meaning} ({exit_code})"))
    return HookResult(DENYSOFT, Reply.of(451, "4.3.0", f"qmail-queue: {meaning} ({exit_code})"))


@implementer(IPullProducer)
class _MessageWriter:
    """Feeds the message to the child's fd 0 as the pipe takes it, then closes it."""

    def __init__(self, transport: Any, chunks: Iterator[bytes]) -> None:
        self._transport = transport
        self._chunks = chunks

    def resumeProducing(self) -> None:
        try:
            chunk = next(self._chunks, None)
        except Exception:
            chunk = None
            self._transport.signalProcess("KILL")  # a broken message must not be queued
        if chunk is not None:
            self._transport.writeToChild(0, chunk)
            return
        self._transport.pipes[0].unregisterProducer()
        self._transport.closeChildFD(0)

    def stopProducing(self) -> None:
        pass


class QmailQueue(ProcessProtocol):
    """One run of qmail-queue; L{done} fires with (exit code or None, signal or None)."""

    def __init__(self, message: Iterable[bytes], envelope: bytes) -> None:
        self._message = iter(message)
        self._envelope = envelope
        self.stderr = bytearray()
        self.done: Deferred[tuple[int | None, int | None]] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.writeToChild(1, self._envelope)
        transport.closeChildFD(1)
        transport.pipes[0].registerProducer(_MessageWriter(transport, self._message), False)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2 and len(self.stderr) < 4096:
            self.stderr += data[: 4096 - len(self.stderr)]

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            result: tuple[int | None, int | None] = (0, None)
        elif isinstance(value, ProcessTerminated):
            result = (value.exitCode, value.signal)
        else:
            result = (None, None)
        if not self.done.called:
            self.done.callback(result)

    def kill(self) -> None:
        with contextlib.suppress(Exception):  # already gone
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]


@implementer(IRegistration, IQueueHook, IQueueOutboundHook)
class Plugin:
    """queue/qmail-queue; see the module docstring."""

    name = "queue/qmail-queue"

    def register(self, context: IPluginContext) -> None:
        self.name = context.name
        self.log = context.log
        self.reactor = context.reactor
        self.config = context.config
        self.path = str(context.config.get_value("qmail-queue.path", None) or DEFAULT_PATH)
        if not os.access(self.path, os.X_OK):
            raise ValueError(f"cannot run qmail-queue at {self.path} (qmail-queue.path)")
        self._read()
        context.config.on_change(QMAIL_QUEUE_INI, self._read)

    def _read(self) -> None:
        ini = self.config.get_ini(QMAIL_QUEUE_INI, booleans=["+main.enable_outbound"])
        self.enable_outbound = bool(ini["main"]["enable_outbound"])

    def hook_queue(self, connection: Any) -> Any:
        txn = connection.transaction
        if txn is None or not txn.rcpt_to:
            return CONT
        wants = queue_wants(txn.notes)
        if wants and wants != "qmail-queue":
            return CONT
        sender = txn.mail_from.address if txn.mail_from else ""
        proto = QmailQueue(
            to_lf(txn.message_stream.chunks()), envelope(sender, [r.address for r in txn.rcpt_to])
        )
        self.reactor.spawnProcess(
            proto,
            self.path,
            [self.path],
            env=dict(os.environ),
            childFDs={0: "w", 1: "w", 2: "r"},
        )
        answer: Deferred[Any] = Deferred(canceller=lambda _: proto.kill())

        def ended(result: tuple[int | None, int | None]) -> None:
            code, signal = result
            if proto.stderr:
                text = proto.stderr.decode("utf-8", "replace").strip()
                connection.logwarn(f"qmail-queue said: {text}", self.name)
            outcome = answer_for(code, signal)
            if code == 0:
                connection.loginfo("queued by qmail-queue", self.name)
            else:
                connection.logerror(
                    f"qmail-queue failed: {outcome.text or outcome.message}", self.name
                )
            if not answer.called:
                answer.callback(outcome)

        proto.done.addCallback(ended)
        return answer

    def hook_queue_outbound(self, connection: Any) -> Any:
        if not self.enable_outbound:
            return CONT
        return self.hook_queue(connection)
