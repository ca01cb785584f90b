"""twistd's haraka command line: the log observer it picks (haraka_tw.tap)."""

from __future__ import annotations

import io
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import globalLogPublisher
from twisted.scripts.twistd import ServerOptions

from haraka_tw import tap
from haraka_tw.logging import TwistdLogObserver


def parsed(*argv: str) -> ServerOptions:
    options = ServerOptions()
    options.parseOptions([*argv, "haraka"])
    return options


@pytest.fixture
def sigusr1() -> Iterator[None]:
    """The log file's SIGUSR1 rotation handler is the test process's only for the test."""
    before = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGUSR1, before)


def test_twistd_haraka_logs_through_log_file_observer(tmp_path: Path, sigusr1: None) -> None:
    """With --logfile, twistd's logger is ours, writing the file twistd would have, and
    SIGUSR1 is set to rotate it."""
    path = tmp_path / "haraka.log"
    options = parsed("--logfile", str(path))
    assert options["logger"] is tap.twistd_log_observer
    observer = options["logger"]()
    assert isinstance(observer, TwistdLogObserver)
    observer({"log_format": "{haraka_text}", "haraka_text": "hello", "log_time": 0.0})
    observer.close()
    assert path.read_text().endswith("[-#-] hello\n")
    assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)


def test_foreground_without_a_log_file_is_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    """twistd -n with no --logfile (or --logfile -) writes to stdout, as twistd does."""
    for argv in (["-n"], ["-n", "--logfile", "-"]):
        out = io.StringIO()
        monkeypatch.setattr(sys, "stdout", out)
        observer = parsed(*argv)["logger"]()
        observer({"log_format": "{haraka_text}", "haraka_text": "hi", "log_time": None})
        assert out.getvalue() == "- [-#-] hi\n"


def test_the_operators_choice_stands() -> None:
    """--syslog or a --logger of the operator's own is left to twistd."""
    assert parsed("--syslog")["logger"] is None
    chosen = parsed("--logger", "twisted.logger.globalLogPublisher")["logger"]
    assert chosen is globalLogPublisher
