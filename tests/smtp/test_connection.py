"""The Connection and its parts: what a plugin sees, and what an idle connection holds."""

from __future__ import annotations

from typing import Any

import pytest

from haraka_tw.smtp.connection import (
    AUTH_NOTES,
    Connection,
    Counts,
    Hello,
    Local,
    Remote,
    TLSInfo,
    Transaction,
    forget_auth,
)
from haraka_tw.smtp.state import Notes, Results

MADE_ON_FIRST_USE = (
    "hello",
    "tls",
    "proxy",
    "notes",
    "results",
    "capabilities",
    "rcpt_count",
    "msg_count",
    "auth_results_list",
)


def connection() -> Connection:
    return Connection(Remote("192.0.2.10", 40000), Local("192.0.2.1", 25, "mx.test"))


def test_idle_connection_holds_none_of_the_first_use_attributes() -> None:
    """A new connection has made none of hello, tls, proxy, notes, results, capabilities,
    the counters or the auth results yet."""
    conn = connection()
    assert not set(MADE_ON_FIRST_USE) & set(vars(conn))


def test_idle_connection_stays_under_the_shared_keys_limit() -> None:
    """A new connection sets fewer than 30 attributes: CPython (3.11) gives instances with
    more a whole dict of their own (about 1.3 KB more each) instead of shared keys."""
    assert len(vars(connection())) < 30


def test_first_use_gives_the_defaults() -> None:
    """Read first, each attribute has the value the connection always started with."""
    conn = connection()
    assert conn.hello == Hello(None, None)
    assert conn.tls == TLSInfo()
    assert conn.proxy == {"allowed": False, "ip": None, "type": None}
    assert isinstance(conn.proxy, Notes)
    assert conn.notes == {} and isinstance(conn.notes, Notes)
    assert isinstance(conn.results, Results) and "p" not in conn.results
    assert conn.capabilities == []
    assert str(conn.rcpt_count) == str(conn.msg_count) == "0/0/0"
    assert conn.auth_results_list == []


def test_first_use_value_is_kept() -> None:
    """What was made on first use is the same object on every later read."""
    conn = connection()
    conn.notes.foo = 1
    conn.capabilities.append("XFOO")
    conn.rcpt_count.accept += 1
    conn.tls.enabled = True
    conn.results.add("p", pass_="x")
    assert conn.notes.foo == 1
    assert conn.capabilities == ["XFOO"]
    assert conn.rcpt_count.accept == 1
    assert conn.tls.enabled
    assert "p" in conn.results
    assert conn.notes is conn.notes


def test_connections_do_not_share_first_use_values() -> None:
    """Each connection makes its own: one's notes or capabilities are not another's."""
    a, b = connection(), connection()
    a.notes.x = 1
    a.capabilities.append("XA")
    a.proxy.allowed = True
    assert b.notes == {} and b.capabilities == [] and b.proxy.allowed is False


@pytest.mark.parametrize("name", MADE_ON_FIRST_USE)
def test_first_use_attributes_can_be_assigned(name: str) -> None:
    """Each can be replaced, before or after it was first read, like any attribute."""
    before, after = connection(), connection()
    getattr(after, name)
    value: Any = object()
    setattr(before, name, value)
    setattr(after, name, value)
    assert getattr(before, name) is value and getattr(after, name) is value


def test_forget_auth_on_a_fresh_connection() -> None:
    """forget_auth with no notes yet changes nothing."""
    conn = connection()
    conn.relaying = True
    forget_auth(conn)
    assert conn.relaying


def test_forget_auth_drops_auth_notes() -> None:
    """forget_auth drops every note AUTH made (the password and auth_bridge's credentials
    too, not only the first one found), its auth= result and the relaying it gave."""
    conn = connection()
    for key in AUTH_NOTES:
        conn.notes[key] = "x"
    conn.relaying = True
    conn.auth_results("auth=pass (plain) smtp.auth=alice")
    conn.auth_results("iprev=pass policy.iprev=192.0.2.10")
    forget_auth(conn)
    assert [key for key in AUTH_NOTES if key in conn.notes] == [] and not conn.relaying
    assert conn.auth_results_list == ["iprev=pass policy.iprev=192.0.2.10"]


def test_forget_auth_in_a_transaction_drops_the_connections_relaying_too() -> None:
    """With a transaction open (STARTTLS after MAIL), the relaying AUTH gave goes for the
    connection as well, not only for that transaction: the next one may not relay."""
    conn = connection()
    conn.notes.auth_user = "alice"
    conn.relaying = True
    conn.transaction = Transaction("T1")
    forget_auth(conn)
    assert not conn.relaying
    conn.transaction = None
    assert not conn.relaying


def test_summary_of_an_idle_connection() -> None:
    """The disconnect summary of a connection that said nothing."""
    fields = connection().summary()
    assert fields["ip"] == "192.0.2.10"
    shown = (fields["helo"], fields["tls"], fields["rcpts"], fields["msgs"])
    assert shown == ("", "N", "0/0/0", "0/0/0")


@pytest.mark.parametrize("cls", [Remote, Local, Hello, TLSInfo, Counts])
def test_value_classes_have_no_instance_dict(cls: type) -> None:
    """Remote, Local, Hello, TLSInfo and Counts keep their fields in slots (no dict each)."""
    assert not hasattr(cls(), "__dict__")


def test_remote_properties() -> None:
    """Remote.is_private and is_local still work with slots."""
    assert Remote("10.1.2.3").is_private and not Remote("10.1.2.3").is_local
    assert Remote("127.0.0.1").is_local
    assert not Remote("not an address").is_private
