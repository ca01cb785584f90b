"""The haraka-tw command: init, plugins, hooks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from haraka_tw.cli import main
from haraka_tw.paths import default_config_dir

HARAKA_TW = Path(sys.executable).parent / "haraka-tw"


def test_init_copies_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """init DIR creates a config directory holding every shipped default file."""
    target = tmp_path / "conf"
    assert main(["init", str(target)]) == 0

    def files(root: Path) -> list[str]:
        return sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file()
            and not p.name.startswith(("_", "."))
            and p.suffix != ".py"
            and "__pycache__" not in p.parts
        )

    assert files(target) == files(default_config_dir())
    assert (target / "plugins").read_text() == (default_config_dir() / "plugins").read_text()
    assert "twistd -n haraka --config" in capsys.readouterr().out


def test_init_refuses_non_empty(tmp_path: Path) -> None:
    """init refuses a non-empty directory unless --force, which only adds missing files."""
    (tmp_path / "plugins").write_text("queue/discard\n")
    assert main(["init", str(tmp_path)]) == 1
    assert main(["init", "--force", str(tmp_path)]) == 0
    assert (tmp_path / "plugins").read_text() == "queue/discard\n"
    assert (tmp_path / "smtp.ini").exists()


def test_console_script_plugins_and_hooks(tmp_path: Path) -> None:
    """The installed haraka-tw lists a config's plugins with their hooks, and the hook order."""
    (tmp_path / "plugins").write_text("queue/discard\nrcpt_to.in_host_list\n")
    out = subprocess.run(
        [str(HARAKA_TW), "plugins", "-c", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == [
        "queue/discard: queue, queue_outbound",
        "rcpt_to.in_host_list: mail, rcpt",
    ]
    out = subprocess.run(
        [str(HARAKA_TW), "hooks"], capture_output=True, text=True, check=True
    ).stdout
    names = [line.split()[0] for line in out.splitlines()]
    assert (
        names.index("connect_init")
        < names.index("connect")
        < names.index("ehlo")
        < names.index("capabilities")  # (it runs after a successful ehlo, for its reply)
        < names.index("mail")
        < names.index("queue")
    )


def test_init_onto_a_file_or_under_one_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """init DIR where DIR is a file, or under one: a one-line error, exit status 1."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["init", str(afile)]) == 1
    assert capsys.readouterr().err == f"haraka-tw: {afile} is not a directory\n"
    assert main(["init", str(afile / "sub")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"haraka-tw: {afile}/sub") and err.endswith(": Not a directory\n")


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    """haraka-tw hooks | head -1: the closed pipe ends the command quietly."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (buffered output)
    proc = subprocess.Popen(
        [str(HARAKA_TW), "hooks"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    proc.stdout.close()  # (before it writes: every write meets a closed pipe)
    _, err = proc.communicate(timeout=30)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err
    assert proc.returncode == 1


def test_plugins_reports_bad_plugin(tmp_path: Path) -> None:
    """A plugin that cannot load is reported by name, exit status 1."""
    (tmp_path / "plugins").write_text("no/such_thing\n")
    proc = subprocess.run(
        [str(HARAKA_TW), "plugins", "-c", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "plugin 'no/such_thing' failed to load" in proc.stderr


def test_plugins_reports_every_missing_plugin_with_its_line(tmp_path: Path) -> None:
    """A plugins file from Haraka naming plugins this server lacks: all of them in one run,
    each with its line, and no traceback."""
    plugins = tmp_path / "plugins"
    plugins.write_text("# from Haraka\nwatch\nqueue/discard\nknown-senders\n")
    proc = subprocess.run(
        [str(HARAKA_TW), "plugins", "-c", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "haraka-tw: 2 plugins failed to load:",
        f"  {plugins}:2: plugin 'watch' failed to load: no such built-in plugin or entry point",
        f"  {plugins}:4: plugin 'known-senders' failed to load: no such built-in plugin or"
        " entry point",
    ]


def test_plugins_lists_what_ignore_bad_plugins_left_out(tmp_path: Path) -> None:
    """With smtp.ini ignore_bad_plugins the tool lists the plugins that load and, marked,
    the ones left out, so the check shows what the server would run without."""
    plugins = tmp_path / "plugins"
    plugins.write_text("watch\nqueue/discard\n")
    (tmp_path / "smtp.ini").write_text("[main]\nignore_bad_plugins=true\n")
    proc = subprocess.run(
        [str(HARAKA_TW), "plugins", "-c", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == [
        "queue/discard: queue, queue_outbound",
        f"watch: NOT LOADED: no such built-in plugin or entry point ({plugins}:1)",
    ]
