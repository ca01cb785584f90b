"""Logging: Haraka levels, the three line formats, the log hook, log.ini."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from twisted.logger import Logger, LogLevel, formatTime, textFileLogObserver, timeFormatRFC3339
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from haraka_tw import logging as haraka_logging
from haraka_tw.logging import HarakaLog, Level, LogRecord, TwistdLogObserver, format_record
from tests.support import RunningClock


def capture() -> tuple[HarakaLog, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    return HarakaLog(level=Level.INFO, logger=Logger(observer=events.append)), events


def test_default_line_format() -> None:
    """The default line is [LEVEL] [uuid] [origin] message, fields as key=value."""
    r = LogRecord(Level.NOTICE, "disconnect", "ABC.1", "core", {"ip": "1.2.3.4", "lr": "250 ok"})
    assert format_record(r) == '[NOTICE] [ABC.1] [core] disconnect ip=1.2.3.4 lr="250 ok"'
    assert format_record(LogRecord(Level.INFO, "x")) == "[INFO] [-] [core] x"


def test_logfmt_and_json() -> None:
    """logfmt and json carry the same fields."""
    r = LogRecord(Level.WARN, 'say "hi"', "U", "p", {"n": 1}, 0.0)
    assert format_record(r, "logfmt") == 'level=WARN uuid=U source=p message="say \\"hi\\"" n=1'
    obj = json.loads(format_record(r, "json", timestamps=True))
    assert obj == {
        "level": "WARN",
        "timestamp": "1970-01-01T00:00:00.000Z",
        "uuid": "U",
        "origin": "p",
        "message": 'say "hi"',
        "n": 1,
    }


def test_fields_quoted_alike_from_the_pair_cache() -> None:
    """Fields format the same the second time (from the kept pairs); the cache stays bounded."""
    fields = {"a": [1, 2], "b": "x y", "c": "", "d": True, "e": 3, "f": "ok", "g": None}
    record = LogRecord(Level.INFO, "m", None, "core", fields)
    expected = 'a="[1, 2]" b="x y" c="" d=True e=3 f=ok g=None'
    assert format_record(record).endswith(expected)
    assert format_record(record).endswith(expected)
    for i in range(haraka_logging._PAIRS_KEPT + 10):
        format_record(LogRecord(Level.INFO, "m", None, "core", {"n": f"v{i}"}))
    assert len(haraka_logging._PAIRS) <= haraka_logging._PAIRS_KEPT
    long = "y" * 500
    format_record(LogRecord(Level.INFO, "m", None, "core", {"long": long}))
    assert ("long", long) not in haraka_logging._PAIRS


def test_level_filter_and_twisted_levels() -> None:
    """Lines above the configured level are dropped; CRIT maps to twisted's critical."""
    log, events = capture()
    log.log(Level.DEBUG, "hidden")
    log.log(Level.CRIT, "shown", origin="p")
    assert [e["haraka_text"] for e in events] == ["[CRIT] [-] [p] shown"]
    assert events[0]["log_level"] is LogLevel.critical


def test_log_hook_suppresses_and_does_not_recurse() -> None:
    """A log hook returning True suppresses the line; logging inside the hook is not re-hooked."""
    log, events = capture()
    seen: list[str] = []

    def hook(conn: Any, record: LogRecord) -> bool:
        seen.append(record.message)
        log.log(Level.INFO, "from inside the hook")
        return record.message == "secret"

    log.hook = hook
    log.log(Level.INFO, "secret")
    log.log(Level.INFO, "public")
    assert seen == ["secret", "public"]
    texts = [e["haraka_text"] for e in events]
    assert "[INFO] [-] [core] secret" not in texts
    assert "[INFO] [-] [core] public" in texts


def test_configure_from_log_ini() -> None:
    """log.ini level/format/timestamps apply; a bad level or format is an error."""
    log, _ = capture()
    log.configure({"main": {"level": "warning", "format": "JSON", "timestamps": True}})
    assert (log.level, log.format, log.timestamps) == (Level.WARN, "json", True)
    with pytest.raises(ValueError, match=r"^log\.ini level: unknown log level 'loud' "):
        log.configure({"main": {"level": "loud"}})
    with pytest.raises(ValueError, match="format"):
        log.configure({"main": {"format": "xml"}})


def test_level_names_as_haraka_writes_them() -> None:
    """Haraka's loglevel file takes its logger's constant names (LOGINFO) too; a name that
    is neither says which are."""
    assert Level.parse("LOGINFO") == Level.INFO
    assert Level.parse("logdebug") == Level.DEBUG
    assert Level.parse("LOGWARN") == Level.WARN
    assert Level.parse(" protocol ") == Level.PROTOCOL
    assert Level.parse("9") == Level.DATA
    with pytest.raises(ValueError) as e:
        Level.parse("LOG")
    assert str(e.value) == (
        "unknown log level 'LOG' (one of EMERG, ALERT, CRIT, ERROR, WARN, NOTICE, INFO,"
        " DEBUG, PROTOCOL, DATA, or 0-9)"
    )
    with pytest.raises(ValueError, match="unknown log level '12'"):
        Level.parse("12")


def test_plugin_logger_tags_uuid() -> None:
    """A plugin logger tags lines with the transaction uuid when there is one."""
    log, events = capture()

    class Conn:
        uuid = "C"
        transaction = type("T", (), {"uuid": "C.2"})()

    log.for_origin("my/plugin").info("hello", Conn())
    assert events[0]["haraka_text"] == "[INFO] [C.2] [my/plugin] hello"


def _event(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "log_time": 1_763_700_000.25,
        "log_namespace": "haraka_tw",
        "log_level": LogLevel.info,
    }
    event.update(fields)
    return event


def test_log_file_observer_writes_twisteds_lines() -> None:
    """TwistdLogObserver writes, byte for byte, what twistd's file observer writes: for a
    HarakaLog line (its fast path), a multi-line one, a Twisted event with fields, one with
    a log_system, and one with a failure."""
    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    events = [
        _event(log_format="{haraka_text}", haraka_text="[NOTICE] [U] [core] disconnect ip=1"),
        _event(log_format="{haraka_text}", haraka_text="[CRIT] [-] [core] a\nb"),
        _event(log_format="Starting factory {f!r}", f=object, log_namespace="x.y"),
        _event(log_format="(TCP Port {p} Closed)", p=25, log_system="-"),
        _event(log_format="{haraka_text}", haraka_text="[INFO] x", log_system="sys"),
        _event(log_format="{haraka_text}!", haraka_text="[INFO] y"),
        _event(log_format="{haraka_text}", haraka_text="[ERROR] x", log_failure=failure),
        _event(log_format="", log_level=None),
        {"log_format": "{haraka_text}", "haraka_text": "[INFO] [-] [core] no time"},
    ]
    ours, theirs = io.StringIO(), io.StringIO()
    observer, reference = TwistdLogObserver(ours), textFileLogObserver(theirs)
    for event in events:
        observer(event)
        reference(event)
    assert ours.getvalue() == theirs.getvalue()
    assert "[haraka_tw#info] [NOTICE] [U] [core] disconnect ip=1\n" in ours.getvalue()
    assert "a\n\tb\n" in ours.getvalue()


def test_log_file_observer_line_is_on_disk_at_once(tmp_path: Path) -> None:
    """A line written to twistd's LogFile is in the file before the observer returns."""
    out = LogFile.fromFullPath(str(tmp_path / "twistd.log"))
    observer = TwistdLogObserver(out)
    log = HarakaLog(Level.INFO, logger=Logger(namespace="haraka_tw", observer=observer))
    log.log(Level.NOTICE, "disconnect", uuid="U1", ip="192.0.2.1")
    text = (tmp_path / "twistd.log").read_text()
    assert text.endswith("[NOTICE] [U1] [core] disconnect ip=192.0.2.1\n")
    out.close()


def test_log_file_observer_time_prefix_follows_the_clock() -> None:
    """The time prefix is cached for its second only, and a bytes file gets UTF-8."""
    out = io.BytesIO()
    observer = TwistdLogObserver(out)
    for when in (100.1, 100.9, 101.0):
        observer(_event(log_time=when, log_format="{haraka_text}", haraka_text="é"))
    lines = out.getvalue().decode("utf-8").splitlines()
    expected = [formatTime(when, timeFormatRFC3339) for when in (100, 100, 101)]
    assert [line.split(" ")[0] for line in lines] == expected
    assert all(line.endswith("] é") for line in lines)


def test_log_file_observer_with_a_reactor_writes_lines_in_batches(tmp_path: Path) -> None:
    """Given the reactor, lines logged in its thread reach twistd's LogFile together after
    the delay, in one write; the rest is written after shutdown and on close."""
    out = LogFile.fromFullPath(str(tmp_path / "twistd.log"))
    clock = RunningClock()
    writes: list[Any] = []
    real_write = out.write
    out.write = lambda data: (writes.append(data), real_write(data))  # type: ignore[method-assign]
    observer = TwistdLogObserver(out, reactor=clock, delay=0.02)
    log = HarakaLog(Level.INFO, logger=Logger(namespace="haraka_tw", observer=observer))
    path = tmp_path / "twistd.log"
    with mock.patch.object(haraka_logging, "isInIOThread", lambda: True):
        log.log(Level.NOTICE, "one", uuid="U1")
        log.log(Level.NOTICE, "two", uuid="U2")
        assert path.read_text() == ""
        assert len(clock.getDelayedCalls()) == 1  # one timer for the batch
        clock.advance(0.02)
        assert len(writes) == 1
        lines = path.read_text().splitlines()
        assert [line.split("] ", 2)[-1] for line in lines] == ["[U1] [core] one", "[U2] [core] two"]
        log.log(Level.NOTICE, "three", uuid="U3")
        [(phase, event, flush)] = clock.triggers
        assert (phase, event) == ("after", "shutdown")
        flush()  # the reactor stopped: what was gathered is written
        assert path.read_text().splitlines()[-1].endswith("[U3] [core] three")
        log.log(Level.NOTICE, "four", uuid="U4")
    observer.close()  # (the LogFile is closed after the write)
    assert path.read_text().splitlines()[-1].endswith("[U4] [core] four")


def test_a_line_the_file_cannot_encode_costs_no_other_line(tmp_path: Path) -> None:
    """Text with a lone surrogate (bytes decoded with surrogateescape, as a queue file's
    address may be) is written escaped, and the lines batched with it are written too;
    a bytes stream gets it escaped as well."""
    out = LogFile.fromFullPath(str(tmp_path / "twistd.log"))
    clock = RunningClock()
    observer = TwistdLogObserver(out, reactor=clock, delay=0.02)
    log = HarakaLog(Level.INFO, logger=Logger(namespace="haraka_tw", observer=observer))
    with mock.patch.object(haraka_logging, "isInIOThread", lambda: True):
        log.log(Level.NOTICE, "before", uuid="U1")
        log.log(Level.NOTICE, "from <al\udcffce@example.com>", uuid="U2")
        log.log(Level.NOTICE, "after", uuid="U3")
        clock.advance(0.02)
    observer.close()
    lines = (tmp_path / "twistd.log").read_text().splitlines()
    assert [line.split("] ", 2)[-1] for line in lines] == [
        "[U1] [core] before",
        "[U2] [core] from <al\\udcffce@example.com>",
        "[U3] [core] after",
    ]
    raw = io.BytesIO()
    TwistdLogObserver(raw)(_event(log_format="{haraka_text}", haraka_text="al\udcffce"))
    assert raw.getvalue().endswith(b"] al\\udcffce\n")


def test_log_file_observer_writes_at_once_outside_the_reactor_thread() -> None:
    """A line from another thread (or with the reactor stopped) is written at once."""
    out = io.StringIO()
    clock = RunningClock()
    observer = TwistdLogObserver(out, reactor=clock)
    line = _event(log_format="{haraka_text}", haraka_text="[INFO] from a thread")
    thread = threading.Thread(target=observer, args=(line,))
    thread.start()
    thread.join()
    assert out.getvalue().endswith("[INFO] from a thread\n")
    clock.running = False  # type: ignore[misc]
    with mock.patch.object(haraka_logging, "isInIOThread", lambda: True):
        observer(_event(log_format="{haraka_text}", haraka_text="[INFO] stopped"))
    assert out.getvalue().endswith("[INFO] stopped\n")
    assert clock.getDelayedCalls() == []


def test_a_failing_write_is_reported_once_and_never_raises(capfd: Any) -> None:
    """A batch whose write fails (a full disk) is lost and reported once on stderr; the
    timer does not raise (the reactor would log that, and the line would fail again); a
    later write that works writes again."""
    clock = RunningClock()
    written: list[str] = []
    failing = [True]

    def write(data: str) -> None:
        if failing[0]:
            raise OSError(28, "No space left on device")
        written.append(data)

    lines = haraka_logging.GatheredWrites(write, clock, delay=0.02)
    with mock.patch.object(haraka_logging, "isInIOThread", lambda: True):
        for text in ("a\n", "b\n"):
            lines.add(text)
            clock.advance(0.02)  # (raises if the write's error escapes)
        assert clock.getDelayedCalls() == []
        failing[0] = False
        lines.add("c\n")
        clock.advance(0.02)
    assert written == ["c\n"]
    reported = capfd.readouterr().err
    assert reported.count("cannot write the log") == 1, reported
    assert "No space left on device" in reported


def test_log_file_observer_drops_the_resolvers_udp_port_lines() -> None:
    """Twisted's legacy lines for each resolver port ("_UDPAttempt starting on N",
    "(UDP Port N Closed)") are left out; other legacy lines are not."""
    out = io.StringIO()
    observer = TwistdLogObserver(out)
    lines = ("_UDPAttempt starting on 51724", "(UDP Port 4242 Closed)", "(TCP Port 25 Closed)")
    for text in lines:
        observer(_event(log_format="{log_text}", log_text=text, log_namespace="log_legacy"))
    assert "UDP" not in out.getvalue()
    assert out.getvalue().endswith("(TCP Port 25 Closed)\n")
