"""The worker's log output: lines gathered in the reactor thread, written together."""

from __future__ import annotations

import os
import threading
from typing import Any
from unittest import mock

import pytest
from twisted.logger import LogLevel

from haraka_tw import logging as haraka_logging
from haraka_tw.workers import worker
from haraka_tw.workers.worker import LineObserver
from tests.support import RunningClock


def event(text: str, level: LogLevel = LogLevel.info) -> dict[str, Any]:
    return {"haraka_text": text, "log_level": level, "log_format": "{haraka_text}"}


@pytest.fixture
def pipe() -> Any:
    read, write = os.pipe()
    os.set_blocking(read, False)
    yield read, write
    os.close(read)
    os.close(write)


def drain(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


def test_reactor_thread_lines_wait_for_the_delay_then_go_together(pipe: Any) -> None:
    """Lines logged in the running reactor's thread are written together after the delay."""
    read, write = pipe
    clock = RunningClock()
    observer = LineObserver(write, clock, delay=0.02)
    with mock.patch.object(haraka_logging, "isInIOThread", lambda: True):
        observer(event("one"))
        observer(event("two", LogLevel.warn))
        assert drain(read) == b""
        assert len(clock.getDelayedCalls()) == 1  # one timer for the batch
        clock.advance(0.02)
    assert drain(read) == b"info\tone\nwarn\ttwo\n"


def test_other_threads_write_at_once_after_what_was_gathered(pipe: Any) -> None:
    """A line from another thread goes out at once, after the lines gathered before it."""
    read, write = pipe
    clock = RunningClock()
    observer = LineObserver(write, clock)
    with mock.patch.object(haraka_logging, "isInIOThread", lambda: True):
        observer(event("gathered"))
    thread = threading.Thread(target=observer, args=(event("from a thread"),))
    thread.start()
    thread.join()
    assert drain(read) == b"info\tgathered\ninfo\tfrom a thread\n"
    with mock.patch.object(haraka_logging, "isInIOThread", lambda: True):
        clock.advance(1)  # the reactor's timer finds nothing left to write
    assert drain(read) == b""


def test_stopped_reactor_or_no_reactor_writes_at_once(pipe: Any) -> None:
    """Once the reactor has stopped (or with none), each line is written as it comes."""
    read, write = pipe
    clock = RunningClock()
    clock.running = False  # type: ignore[misc]
    with mock.patch.object(haraka_logging, "isInIOThread", lambda: True):
        LineObserver(write, clock)(event("late"))
        LineObserver(write)(event("no reactor"))
    assert drain(read) == b"info\tlate\ninfo\tno reactor\n"
    assert clock.getDelayedCalls() == []


def test_a_line_logged_during_a_write_joins_it(pipe: Any) -> None:
    """A line logged while a write is under way (a signal handler's) follows it, no hang."""
    read, write = pipe
    observer = LineObserver(write)
    real_write = os.write
    calls: list[int] = []

    def interrupted_write(fd: int, data: Any) -> int:
        calls.append(fd)
        if len(calls) == 1:
            observer(event("from the signal handler"))  # (as SIGTERM's "shutting down")
        return real_write(fd, data)

    def log_once() -> None:
        with mock.patch.object(worker.os, "write", interrupted_write):
            observer(event("first"))

    thread = threading.Thread(target=log_once, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "the observer deadlocked"
    assert drain(read) == b"info\tfirst\ninfo\tfrom the signal handler\n"


def test_udp_port_closed_lines_are_dropped(pipe: Any) -> None:
    """Twisted's "(UDP Port N Closed)", one per DNS query, is not sent to the master."""
    read, write = pipe
    observer = LineObserver(write)
    closed = {"log_namespace": "log_legacy", "log_text": "(UDP Port 4242 Closed)"}
    observer({**closed, "log_format": "{log_text}", "log_level": LogLevel.info})
    observer(event("kept"))
    assert drain(read) == b"info\tkept\n"
