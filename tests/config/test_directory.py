"""Tests for haraka_tw.config.directory: the overlaid, cached, reloadable reader."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from twisted.logger import capturedLogs

from haraka_tw.config import ConfigDirectory, ConfigError

from .layers import Layers


def test_missing_files_give_defaults(layers: Layers) -> None:
    """Each reader returns its default for a file no directory has."""
    config = layers.config()
    assert config.get_value("me") is None
    assert config.get_value("me", "localhost") == "localhost"
    assert config.get_list("host_list", ["a"]) == ["a"]
    assert config.get_data("greeting") == []
    assert config.get_json("x.json", {"d": 1}) == {"d": 1}
    assert config.get_yaml("x.yaml", []) == []
    assert config.get_binary("tls/key.pem") is None
    assert config.get_ini("smtp.ini") == {"main": {}}


def test_empty_value_file_gives_default(layers: Layers) -> None:
    """A value file with no value line gives the default (Haraka: empty 'me' is the host)."""
    layers.write(layers.operator, "me", "\n# set me\n")
    assert layers.config().get_value("me", "host.example") == "host.example"


def test_nonexistent_directories_are_empty(tmp_path: Path) -> None:
    """A directory in the stack that does not exist simply has no files."""
    config = ConfigDirectory([tmp_path / "nope", tmp_path / "nor"], log=list[str]().append)
    assert config.get_list("plugins") == []
    assert config.directories == [tmp_path / "nope", tmp_path / "nor"]


def test_every_format(layers: Layers) -> None:
    """Each reader parses its format from the operator's directory."""
    layers.write(layers.operator, "plugin_timeout", "30\n")
    layers.write(layers.operator, "host_list", "# domains\nexample.com\n\nexample.net\n")
    layers.write(layers.operator, "banner", "  line one\n\n")
    layers.write(layers.operator, "x.json", '{"a": [1]}')
    layers.write(layers.operator, "tls/k.pem", b"\x00\xffkey")
    config = layers.config()
    assert config.get_value("plugin_timeout") == 30
    assert config.get_list("host_list") == ["example.com", "example.net"]
    assert config.get_data("banner") == ["  line one", ""]
    assert config.get_json("x.json") == {"a": [1]}
    assert config.get_binary("tls/k.pem") == b"\x00\xffkey"


def test_yaml_without_pyyaml_names_file(layers: Layers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a YAML file without PyYAML is a ConfigError naming the file."""
    monkeypatch.setitem(sys.modules, "yaml", None)
    path = layers.write(layers.operator, "x.yaml", "a: 1\n")
    with pytest.raises(ConfigError) as caught:
        layers.config().get_yaml("x.yaml")
    assert caught.value.path == str(path)


def test_yaml_reader(layers: Layers) -> None:
    """get_yaml merges YAML mappings across the directories."""
    pytest.importorskip("yaml")
    layers.write(layers.defaults, "x.yaml", "a: 1\nb: 1\n")
    layers.write(layers.operator, "x.yaml", "b: 2\n")
    assert layers.config().get_yaml("x.yaml") == {"a": 1, "b": 2}


def test_ini_overlay_and_booleans(layers: Layers) -> None:
    """get_ini merges per section and applies the declared booleans and their defaults."""
    layers.write(layers.defaults, "c.ini", "[haproxy]\nenabled=false\n[max]\nbytes=100\n")
    layers.write(layers.operator, "c.ini", "[haproxy]\nenabled=yes\n")
    result = layers.config().get_ini("c.ini", booleans=["-haproxy.enabled", "+main.smtputf8"])
    assert result == {
        "main": {"smtputf8": True},
        "haproxy": {"enabled": True},
        "max": {"bytes": 100},
    }


def test_results_are_copies(layers: Layers) -> None:
    """Changing a returned value does not change what the next reader gets."""
    layers.write(layers.operator, "c.ini", "[s]\nk[]=a\n")
    layers.write(layers.operator, "plugins", "a\n")
    config = layers.config()
    config.get_ini("c.ini")["s"]["k"].append("b")
    config.get_list("plugins").append("b")
    assert config.get_ini("c.ini") == {"main": {}, "s": {"k": ["a"]}}
    assert config.get_list("plugins") == ["a"]


def test_results_cached_until_reload(layers: Layers) -> None:
    """A read is cached: an edit is not seen until reload()."""
    path = layers.write(layers.operator, "me", "one\n")
    config = layers.config()
    assert config.get_value("me") == "one"
    path.write_text("two\n")
    assert config.get_value("me") == "one"
    assert config.reload() == ["me"]
    assert config.get_value("me") == "two"


def test_cache_is_per_booleans(layers: Layers) -> None:
    """The same ini read with different boolean declarations gives each its own result."""
    layers.write(layers.operator, "c.ini", "flag=yes\n")
    config = layers.config()
    assert config.get_ini("c.ini") == {"main": {"flag": "yes"}}
    assert config.get_ini("c.ini", booleans=["flag"]) == {"main": {"flag": True}}


def test_path_is_highest_existing_file(layers: Layers) -> None:
    """path() names the highest-precedence existing file, or None."""
    low = layers.write(layers.defaults, "tls/cert.pem", "low")
    config = layers.config()
    assert config.path("tls/cert.pem") == low
    high = layers.write(layers.operator, "tls/cert.pem", "high")
    assert config.path("tls/cert.pem") == high
    assert config.path("nothing") is None


@pytest.mark.parametrize("name", ["", "/etc/passwd", "../secrets", "tls/../../x", "a\\b"])
def test_names_must_stay_inside(layers: Layers, name: str) -> None:
    """A name that is empty, absolute or climbs out of the directory is a ValueError."""
    config = layers.config()
    with pytest.raises(ValueError):
        config.get_value(name)
    with pytest.raises(ValueError):
        config.path(name)


def test_first_read_error_propagates(layers: Layers) -> None:
    """A syntax error on the first read raises ConfigError naming the file and line."""
    path = layers.write(layers.operator, "smtp.ini", "listen=[::0]:25\n[main\n")
    with pytest.raises(ConfigError) as caught:
        layers.config().get_ini("smtp.ini")
    assert str(caught.value).startswith(f"{path}:2: ")


def test_first_read_error_not_cached(layers: Layers) -> None:
    """After a failed first read, a fixed file reads fine without a reload."""
    path = layers.write(layers.operator, "x.json", "{")
    config = layers.config()
    with pytest.raises(ConfigError):
        config.get_json("x.json")
    path.write_text("{}")
    assert config.get_json("x.json") == {}


def test_reload_error_keeps_last_good_value(layers: Layers) -> None:
    """On reload a malformed file is logged as path:line and the last good value stays."""
    path = layers.write(layers.operator, "smtp.ini", "nodes=4\n")
    config = layers.config()
    calls: list[str] = []
    config.on_change("smtp.ini", lambda: calls.append("smtp.ini"))
    assert config.get_ini("smtp.ini") == {"main": {"nodes": 4}}
    path.write_text("nodes=8\n\n[broken\n")
    assert config.reload() == []
    assert config.get_ini("smtp.ini") == {"main": {"nodes": 4}}
    assert calls == []
    assert len(layers.logged) == 1
    assert layers.logged[0].startswith(f"{path}:3: ")


def test_reload_error_logged_once(layers: Layers) -> None:
    """A broken file is reported once, not again on every reload until it changes."""
    path = layers.write(layers.operator, "x.json", "{}")
    config = layers.config()
    config.get_json("x.json")
    path.write_text("{")
    config.reload()
    config.reload()
    assert len(layers.logged) == 1


def test_reload_after_fix(layers: Layers) -> None:
    """Fixing a broken file is picked up by the next reload, callbacks and all."""
    path = layers.write(layers.operator, "x.json", '{"v": 1}')
    config = layers.config()
    calls: list[int] = []
    config.on_change("x.json", lambda: calls.append(1))
    config.get_json("x.json")
    path.write_text("{")
    config.reload()
    path.write_text('{"v": 2}')
    assert config.reload() == ["x.json"]
    assert config.get_json("x.json") == {"v": 2}
    assert calls == [1]


def test_on_change_after_edit(layers: Layers) -> None:
    """on_change callbacks run after reload() picks up an edit, seeing the new value."""
    path = layers.write(layers.operator, "plugins", "a\n")
    config = layers.config()
    seen: list[list[str]] = []
    config.get_list("plugins")
    config.on_change("plugins", lambda: seen.append(config.get_list("plugins")))
    path.write_text("a\nb\n")
    assert config.reload() == ["plugins"]
    assert seen == [["a", "b"]]
    assert "config: reloaded plugins" in layers.logged


def test_reload_without_changes(layers: Layers) -> None:
    """reload() with nothing changed reports nothing and calls nothing."""
    layers.write(layers.operator, "plugins", "a\n")
    config = layers.config()
    config.get_list("plugins")
    config.on_change("plugins", lambda: pytest.fail("called without a change"))
    assert config.reload() == []


def test_comment_edit_is_not_a_change(layers: Layers) -> None:
    """An edit that leaves the parsed value alone fires no callbacks."""
    path = layers.write(layers.operator, "plugins", "a\n")
    config = layers.config()
    config.get_list("plugins")
    path.write_text("# a comment\na\n")
    assert config.reload() == []


def test_deleted_file_falls_back(layers: Layers) -> None:
    """Deleting the operator's file falls back to the defaults' file and counts as a change."""
    layers.write(layers.defaults, "me", "default.example\n")
    path = layers.write(layers.operator, "me", "operator.example\n")
    config = layers.config()
    assert config.get_value("me") == "operator.example"
    path.unlink()
    assert config.reload() == ["me"]
    assert config.get_value("me") == "default.example"


def test_file_appearing_later(layers: Layers) -> None:
    """A file missing at first read and created later counts as a change."""
    config = layers.config()
    assert config.get_list("host_list") == []
    layers.write(layers.operator, "host_list", "example.com\n")
    assert config.reload() == ["host_list"]
    assert config.get_list("host_list") == ["example.com"]


def test_ini_section_deleted_from_operator(layers: Layers) -> None:
    """Removing an operator's ini key restores the default's value on reload."""
    layers.write(layers.defaults, "c.ini", "[max]\nbytes=100\n")
    path = layers.write(layers.operator, "c.ini", "[max]\nbytes=5\n")
    config = layers.config()
    assert config.get_ini("c.ini")["max"] == {"bytes": 5}
    path.write_text("")
    config.reload()
    assert config.get_ini("c.ini")["max"] == {"bytes": 100}


def test_bundle_edit_changes_names(layers: Layers) -> None:
    """Editing smtp.json reloads the names whose entries it holds."""
    bundle = layers.write(layers.operator, "smtp.json", '{"!me": "one"}')
    config = layers.config()
    assert config.get_value("me") == "one"
    bundle.write_text('{"!me": "two"}')
    assert config.reload() == ["me"]
    assert config.get_value("me") == "two"


def test_names_changed_reported_once(layers: Layers) -> None:
    """A name read as two kinds is reported, and its callbacks run, once per reload."""
    path = layers.write(layers.operator, "plugins", "a\n")
    config = layers.config()
    calls: list[int] = []
    config.on_change("plugins", lambda: calls.append(1))
    config.get_list("plugins")
    config.get_data("plugins")
    path.write_text("b\n")
    assert config.reload() == ["plugins"]
    assert calls == [1]


def test_failing_callback_logged_others_run(layers: Layers) -> None:
    """A callback that raises is logged, and the other callbacks still run."""
    path = layers.write(layers.operator, "me", "one\n")
    config = layers.config()
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    config.on_change("me", broken)
    config.on_change("me", lambda: calls.append("ok"))
    config.get_value("me")
    path.write_text("two\n")
    config.reload()
    assert calls == ["ok"]
    assert any("boom" in line for line in layers.logged)


def test_default_log_is_twisted_logger(layers: Layers) -> None:
    """Without a log callable, reload errors go to the Twisted logger."""
    path = layers.write(layers.operator, "x.json", "{}")
    config = ConfigDirectory([layers.operator])
    config.get_json("x.json")
    path.write_text("{\n")
    with capturedLogs() as events:
        config.reload()
    assert any(str(path) in event.get("message", "") for event in events)


SMTP_INI = """\
; address to listen on (default: all IPv6 and IPv4 addresses, port 25)
listen=[::0]:25

; Note you can listen on multiple IPs/ports using commas:
;listen=127.0.0.1:2529,127.0.0.2:2529,127.0.0.3:2530

; Time in seconds to let sockets be idle with no activity
;inactivity_timeout=300

; Run using cluster to fork multiple backend processes
nodes=cpus

; Daemonize
;daemonize=true
;daemon_log_file=/var/log/haraka.log

[headers]
;add_received=true
"""

CONNECTION_INI = """\
[main]
; Reject a MAIL FROM or RCPT TO with an unrecognised ESMTP parameter
strict_rfc1869=false
smtputf8=true

[haproxy]
; Only enable for IPs/hosts that use the HAProxy PROXY protocol
hosts[] = 192.0.2.10
hosts[] = 198.51.100.0/24

[headers]
add_received=true
max_lines=1000
max_received=100

[max]
bytes=26214400
line_length=512
data_line_length=992

[message]
greeting[]=Haraka is at your service.
greeting[]=Second line

[uuid]
banner_chars=6
deny_chars=0
"""

PLUGINS = """\
# This file lists plugins that Haraka will run
#
# Plugin ordering often matters.

# CONNECT
# ----------
# toobusy
# relay
dnsbl

# RCPT TO
# At least one rcpt_to plugin is REQUIRED for inbound email.
rcpt_to.in_host_list

# QUEUE
queue/smtp_forward
"""


def test_haraka_config_dir_loads(layers: Layers) -> None:
    """A Haraka-style config directory over shipped defaults reads as Haraka reads it."""
    layers.write(layers.defaults, "smtp.ini", "listen=[::0]:25\ninactivity_timeout=300\n")
    layers.write(layers.defaults, "plugin_timeout", "30\n")
    layers.write(layers.operator, "smtp.ini", SMTP_INI)
    layers.write(layers.operator, "connection.ini", CONNECTION_INI)
    layers.write(layers.operator, "plugins", PLUGINS)
    layers.write(layers.operator, "me", "mx.example.com\n")
    layers.write(layers.operator, "host_list", "# domains we accept mail for\nexample.com\n")
    layers.write(layers.operator, "plugin_timeout", "60\n")
    config = layers.config()

    smtp = config.get_ini("smtp.ini", booleans=["-main.daemonize", "+headers.add_received"])
    assert smtp == {
        "main": {
            "listen": "[::0]:25",
            "nodes": "cpus",
            "inactivity_timeout": 300,
            "daemonize": False,
        },
        "headers": {"add_received": True},
    }
    connection = config.get_ini(
        "connection.ini",
        booleans=["-main.strict_rfc1869", "+main.smtputf8", "-haproxy.enabled"],
    )
    assert connection["main"] == {"strict_rfc1869": False, "smtputf8": True}
    assert connection["haproxy"] == {"hosts": ["192.0.2.10", "198.51.100.0/24"], "enabled": False}
    assert connection["headers"] == {"add_received": "true", "max_lines": 1000, "max_received": 100}
    assert connection["max"]["bytes"] == 26214400
    assert connection["message"]["greeting"] == ["Haraka is at your service.", "Second line"]
    assert connection["uuid"] == {"banner_chars": 6, "deny_chars": 0}
    assert config.get_list("plugins") == ["dnsbl", "rcpt_to.in_host_list", "queue/smtp_forward"]
    assert config.get_value("me") == "mx.example.com"
    assert config.get_list("host_list") == ["example.com"]
    assert config.get_value("plugin_timeout") == 60


def test_key_set_twice_warns_once_per_version(layers: Layers) -> None:
    """A key given twice in one ini section keeps the later value (as in Haraka) and is
    logged with both lines, once however many readers parse the file, and again when
    the file changes and still has it. list[] keys and the same key in two sections are
    not repeats."""
    path = layers.write(
        layers.operator,
        "smtp.ini",
        "listen=a\nport[]=1\nport[]=2\n[other]\nlisten=b\n[main]\nlisten=c\n",
    )
    config = layers.config()
    assert config.get_ini("smtp.ini")["main"]["listen"] == "c"
    config.get_ini("smtp.ini", booleans=["+main.x"])  # another reader, the same file
    repeat = f"{path}:7: [main] listen is set again (first on line 1); the later value is used"
    assert layers.logged == [repeat]
    path.write_text("listen=a\n\n\nlisten=d\n", encoding="utf-8")
    config.reload()
    assert config.get_ini("smtp.ini")["main"]["listen"] == "d"
    assert layers.logged[1:] == [
        f"{path}:4: [main] listen is set again (first on line 1); the later value is used",
        "config: reloaded smtp.ini",
    ]


def test_bytes_that_are_not_utf8_warn_with_their_line(layers: Layers) -> None:
    """A file that is not UTF-8 is still read (bad bytes as U+FFFD, as Node does), and the
    log names the file and the first line holding such bytes."""
    path = layers.write(
        layers.operator, "host_list", b"a.test\r\nb.test\r\n# M\xfcller\r\nc.test\r\n"
    )
    config = layers.config()
    assert config.get_list("host_list") == ["a.test", "b.test", "c.test"]
    assert layers.logged == [f"{path}:3: not valid UTF-8; the invalid bytes are read as U+FFFD"]
    layers.write(layers.operator, "me", "mx.test\n")
    assert config.get_value("me") == "mx.test"
    assert len(layers.logged) == 1  # (a UTF-8 file: no warning)
    with_bom = layers.write(layers.operator, "host_list_regex", b"\xef\xbb\xbfa\n\xff\n")
    assert config.get_list("host_list_regex") == ["a", "\ufffd"]
    assert (
        layers.logged[1] == f"{with_bom}:2: not valid UTF-8; the invalid bytes are read as U+FFFD"
    )
