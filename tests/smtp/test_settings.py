"""Session settings from a Haraka config directory: the keys mean the same here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from haraka_tw.config import ConfigDirectory
from haraka_tw.paths import default_config_dir
from haraka_tw.smtp.data import BareNewline
from haraka_tw.smtp.settings import SessionSettings

HARAKA_CONNECTION_INI = """\
[main]
spool_dir=/var/spool/haraka
spool_after=-1
strict_rfc1869=true
smtputf8=false

[haproxy]
hosts[]=192.168.1.1
hosts[]=10.0.0.0/8

[headers]
add_received=true
clean_auth_results=false
show_version=false
max_lines=500
max_received=50

[max]
bytes=1048576
line_length=1000
data_line_length=2000

[message]
greeting[]=mx.example.org ESMTP
greeting[]=no UBE
helo=Hi there
close=Bye now

[uuid]
banner_chars=0
"""


def settings(tmp_path: Path, files: dict[str, str]) -> SessionSettings:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return SessionSettings.from_config(ConfigDirectory([default_config_dir(), tmp_path]))


def test_haraka_connection_ini(tmp_path: Path) -> None:
    """A Haraka connection.ini, smtp.ini and me mean the same here."""
    s = settings(
        tmp_path,
        {
            "connection.ini": HARAKA_CONNECTION_INI,
            "smtp.ini": "listen=[::0]:25\nnodes=cpus\ninactivity_timeout=60\n",
            "me": "mx.example.org\n",
        },
    )
    assert s.me == "mx.example.org"
    assert (s.spool_dir, s.spool_after) == ("/var/spool/haraka", -1)
    assert (s.strict_rfc1869, s.smtputf8) == (True, False)
    assert (s.clean_auth_results, s.show_version, s.add_received) == (False, False, True)
    assert (s.header_max_lines, s.header_max_received) == (500, 50)
    assert (s.max_bytes, s.max_line_length, s.max_data_line_length) == (1048576, 1000, 2000)
    assert s.greeting == ("mx.example.org ESMTP", "no UBE")
    # Haraka's meaning: the text after "<me> Hello <remote>, " and "<me> "
    assert s.helo_message == "{me} Hello {remote}, Hi there"
    assert (s.close_message, s.banner_chars) == ("{me} Bye now", 0)
    assert s.inactivity_timeout == 60


def test_defaults(tmp_path: Path) -> None:
    """The shipped defaults: Haraka's limits, bare newlines rejected, 1 MiB spool threshold."""
    s = settings(tmp_path, {"me": "a.test"})
    assert (s.max_bytes, s.max_line_length, s.max_data_line_length) == (26214400, 512, 992)
    assert (s.header_max_lines, s.header_max_received, s.inactivity_timeout) == (1000, 100, 300)
    assert s.bare_newline is BareNewline.REJECT
    assert s.spool_after == 1048576


def test_bad_values_are_named(tmp_path: Path) -> None:
    """A non-number limit or an unknown bare_newline names the key."""
    with pytest.raises(ValueError, match="bytes"):
        settings(tmp_path, {"connection.ini": "[max]\nbytes=lots\n"})
    with pytest.raises(ValueError, match="bare_newline"):
        settings(tmp_path, {"connection.ini": "bare_newline=allow\n"})


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"smtp.ini": "inactivity_timeout=-1\n"}, "smtp.ini inactivity_timeout: -1"),
        ({"smtp.ini": "inactivity_timeout=abc\n"}, "smtp.ini inactivity_timeout: 'abc'"),
        ({"smtp.ini": "data_timeout=-5\n"}, "smtp.ini data_timeout: -5"),
        ({"smtp.ini": "max_connections=-5\n"}, "smtp.ini max_connections: -5"),
        ({"connection.ini": "[max]\nline_length=0\n"}, "connection.ini [max] line_length: 0"),
        ({"connection.ini": "[max]\nline_length=100\n"}, "line_length: 100 is not a whole"),
        ({"connection.ini": "[max]\nbytes=-1\n"}, "connection.ini [max] bytes: -1"),
        ({"connection.ini": "[max]\nbytes=1.5\n"}, "connection.ini [max] bytes: 1.5"),
        ({"connection.ini": "[max]\nrecipients=0\n"}, "connection.ini [max] recipients: 0"),
        ({"connection.ini": "[max]\ndata_line_length=1\n"}, "data_line_length: 1"),
        ({"connection.ini": "[max]\ndata_line_length=-2\n"}, "data_line_length: -2"),
        ({"connection.ini": "[headers]\nmax_received=0\n"}, "[headers] max_received: 0"),
        ({"connection.ini": "[uuid]\nbanner_chars=-3\n"}, "[uuid] banner_chars: -3"),
        ({"connection.ini": "[main]\nspool_after=-2\n"}, "[main] spool_after: -2"),
        ({"connection.ini": "[haproxy]\ntimeout=0\n"}, "[haproxy] timeout: 0"),
    ],
)
def test_numbers_out_of_range_are_named(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    """A limit or timeout that is no number, or out of its range (which would refuse every
    client or command), stops start-up (or a reload) naming the file, section and key."""
    with pytest.raises(ValueError, match=re.escape(message)):
        settings(tmp_path, files)


def test_zero_means_what_it_means_in_haraka(tmp_path: Path) -> None:
    """inactivity_timeout=0 and [headers] max_lines=0 mean their defaults, as Haraka reads
    them (never "no timeout"); data_timeout=0 follows inactivity_timeout; max_connections=0
    and bytes=0 mean no limit; spool_after=-1 never spools."""
    s = settings(
        tmp_path,
        {
            "smtp.ini": "inactivity_timeout=0\nmax_connections=0\n",
            "connection.ini": "[max]\nbytes=0\n[main]\nspool_after=-1\n[headers]\nmax_lines=0\n",
        },
    )
    assert (s.inactivity_timeout, s.data_timeout, s.header_max_lines) == (300, 300, 1000)
    assert (s.max_connections, s.max_bytes, s.spool_after) == (0, 0, -1)
    s = settings(tmp_path, {"smtp.ini": "inactivity_timeout=60\ndata_timeout=0\n"})
    assert (s.inactivity_timeout, s.data_timeout) == (60, 60)
