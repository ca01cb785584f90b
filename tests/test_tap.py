"""twistd's haraka command line: the log observer it picks (haraka_tw.tap)."""

from __future__ import annotations

import io
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import globalLogPublisher
from twisted.python.logfile import LogFile
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


def test_a_log_directory_that_does_not_exist_is_one_line(
    tmp_path: Path, sigusr1: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """--logfile in a directory that does not exist: one line naming it, exit status 1."""
    path = tmp_path / "nodir" / "haraka.log"
    with pytest.raises(SystemExit) as stopped:
        parsed("--logfile", str(path))["logger"]()
    assert stopped.value.code == 1
    assert capsys.readouterr().err == f"haraka_tw: --logfile {path}: No such file or directory\n"


def test_sigusr1_rotates_or_reopens_a_log_moved_or_deleted(tmp_path: Path) -> None:
    """SIGUSR1 rotates the log in place; if the file was moved away (logrotate) or deleted,
    a new one is opened at its path instead, and the lines that follow go there."""
    path = tmp_path / "haraka.log"
    log_file = LogFile.fromFullPath(str(path))
    log_file.write("one\n")
    tap.rotate_or_reopen(log_file)  # in place: rotated
    assert (tmp_path / "haraka.log.1").read_text() == "one\n"
    log_file.write("two\n")
    path.rename(tmp_path / "moved.log")
    tap.rotate_or_reopen(log_file)  # moved: a new file, nothing rotated
    log_file.write("three\n")
    assert (tmp_path / "moved.log").read_text() == "two\n"
    assert path.read_text() == "three\n"
    assert not (tmp_path / "haraka.log.2").exists()
    path.unlink()
    tap.rotate_or_reopen(log_file)  # deleted: a new file
    log_file.write("four\n")
    assert path.read_text() == "four\n"
    log_file.close()
