"""The hook runner's chain rules (reference section 1), on task.Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from haraka_tw.codes import CONT, DENY, DENYSOFT, OK, Code, HookResult
from haraka_tw.hooks.runner import HookRunner, LoadedPlugin, then
from haraka_tw.logging import Level
from haraka_tw.smtp.state import Notes
from tests.support import ListLog, plugin_with


class FakeTxn:
    def __init__(self) -> None:
        self.notes = Notes()
        self.uuid = "T.1"


class FakeRemote:
    closed = False


class FakeConn:
    def __init__(self) -> None:
        self.remote = FakeRemote()
        self.transaction: FakeTxn | None = FakeTxn()
        self.uuid = "T"


class RunnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.log = ListLog()
        self.calls: list[str] = []

    def runner(
        self,
        *plugins: tuple[str, dict[str, Any]],
        priorities: dict[str, dict[str, int]] | None = None,
        timeout: float = 30,
    ) -> HookRunner:
        loaded = [
            LoadedPlugin(name, plugin_with(hooks), (priorities or {}).get(name, {}))
            for name, hooks in plugins
        ]
        return self.runner_of(loaded, timeout)

    def runner_of(self, loaded: list[LoadedPlugin], timeout: float = 30) -> HookRunner:
        return HookRunner(loaded, self.clock, self.log, timeout)

    def answer(self, name: str, value: Any) -> Any:
        def hook(conn: Any, *args: Any) -> Any:
            self.calls.append(name)
            return value

        return hook

    def result(self, d: Deferred[HookResult]) -> HookResult:
        return self.successResultOf(d)

    def test_order_and_first_non_cont_stops(self) -> None:
        """Plugins run in file order and the chain stops at the first non-CONT answer."""
        r = self.runner(
            ("a", {"mail": self.answer("a", None)}),
            ("b", {"mail": self.answer("b", (DENY, "no"))}),
            ("c", {"mail": self.answer("c", OK)}),
        )
        res = self.result(r.run("mail", FakeConn(), "s", {}))
        self.assertEqual(self.calls, ["a", "b"])
        self.assertEqual((res.code, res.message, res.plugin), (DENY, "no", "b"))

    def test_priority_then_file_order(self) -> None:
        """Lower priority runs first; equal priorities keep plugins-file order."""
        r = self.runner(
            ("a", {"rcpt": self.answer("a", CONT)}),
            ("b", {"rcpt": self.answer("b", CONT)}),
            ("c", {"rcpt": self.answer("c", CONT)}),
            priorities={"c": {"rcpt": -10}, "a": {"rcpt": 5}},
        )
        self.result(r.run("rcpt", FakeConn(), "x", {}))
        self.assertEqual(self.calls, ["c", "b", "a"])
        self.assertEqual(r.chain("rcpt"), ["c", "b", "a"])

    def test_dispatch_by_interface_only(self) -> None:
        """A method named hook_x on an object that does not provide IXHook is never called."""

        class Sneaky:
            def hook_mail(self, *a: Any) -> Code:
                raise AssertionError("called without providing IMailHook")

        r = self.runner_of([LoadedPlugin("sneaky", Sneaky())])
        self.assertEqual(self.result(r.run("mail", FakeConn(), "s", {})).code, CONT)
        self.assertFalse(r.has("mail"))

    def test_return_forms(self) -> None:
        """None, a code, (code, msg), a HookResult, a Deferred and a coroutine all work."""

        async def coro(conn: Any, *args: Any) -> Any:
            return (DENYSOFT, "later")

        cases: list[tuple[Any, Code, Any]] = [
            (None, CONT, None),
            (OK, OK, None),
            ((DENY, "nope"), DENY, "nope"),
            (HookResult(DENY, ["a", "b"]), DENY, ["a", "b"]),
            (succeed((OK, "fine")), OK, "fine"),
        ]
        for value, code, msg in cases:
            r = self.runner(("p", {"mail": (lambda v: lambda *a: v)(value)}))
            res = self.result(r.run("mail", FakeConn(), "s", {}))
            self.assertEqual((res.code, res.message), (code, msg), value)
        r = self.runner(("p", {"mail": coro}))
        res = self.result(r.run("mail", FakeConn(), "s", {}))
        self.assertEqual((res.code, res.message), (DENYSOFT, "later"))

    def test_deferred_answer_waits(self) -> None:
        """The chain waits for a Deferred answer, then goes on to the next plugin."""
        pending: Deferred[Any] = Deferred()
        r = self.runner(
            ("slow", {"mail": lambda *a: pending}),
            ("next", {"mail": self.answer("next", OK)}),
        )
        d = r.run("mail", FakeConn(), "s", {})
        self.assertNoResult(d)
        pending.callback(None)
        self.assertEqual(self.result(d).plugin, "next")

    def test_run_all_hooks_ignore_results(self) -> None:
        """connect_init, reset_transaction and disconnect run every plugin; results are ignored."""
        for hook in ("connect_init", "reset_transaction", "disconnect"):
            self.calls.clear()
            r = self.runner(
                ("a", {hook: self.answer("a", DENY)}),
                ("b", {hook: self.answer("b", OK)}),
            )
            self.assertEqual(self.result(r.run(hook, FakeConn())).code, CONT)
            self.assertEqual(self.calls, ["a", "b"], hook)

    def test_deny_hook_sees_denial(self) -> None:
        """A denial runs the deny hook with the code, message, plugin, method, params and hook."""
        seen: list[tuple[Any, ...]] = []
        r = self.runner(
            ("blocker", {"rcpt": self.answer("blocker", (DENY, "go away"))}),
            ("watcher", {"deny": lambda conn, *a: seen.append(a)}),
        )
        res = self.result(r.run("rcpt", FakeConn(), "x@y", {"A": None}))
        self.assertEqual(res.code, DENY)
        self.assertEqual(
            seen, [(DENY, "go away", "blocker", "hook_rcpt", ("x@y", {"A": None}), "rcpt")]
        )

    def test_deny_hook_override_resumes_chain(self) -> None:
        """A deny plugin answering OK overrides the denial; the rest of the chain runs."""
        r = self.runner(
            ("blocker", {"rcpt": self.answer("blocker", DENY)}),
            ("later", {"rcpt": self.answer("later", OK)}),
            ("whitelist", {"deny": lambda conn, *a: OK}),
        )
        res = self.result(r.run("rcpt", FakeConn(), "x", {}))
        self.assertEqual((res.code, res.plugin), (OK, "later"))
        self.assertEqual(self.calls, ["blocker", "later"])

    def test_non_denial_skips_deny_hook(self) -> None:
        """OK does not run the deny hook."""
        r = self.runner(
            ("a", {"rcpt": self.answer("a", OK)}),
            ("watcher", {"deny": self.answer("watcher", CONT)}),
        )
        self.result(r.run("rcpt", FakeConn(), "x", {}))
        self.assertEqual(self.calls, ["a"])

    def test_timeout_is_denysoft(self) -> None:
        """A hook that never answers gets DENYSOFT "plugin timeout" after plugin_timeout."""
        r = self.runner(("stuck", {"mail": lambda *a: Deferred()}), timeout=2)
        d = r.run("mail", FakeConn(), "s", {})
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        res = self.result(d)
        self.assertEqual((res.code, res.message, res.plugin), (DENYSOFT, "plugin timeout", "stuck"))
        self.assertTrue(any("timeout" in m for m in self.log.messages(Level.ERROR)))

    def test_per_plugin_timeout_and_zero_disables(self) -> None:
        """<plugin>.timeout overrides plugin_timeout; 0 disables the timeout."""
        loaded = [LoadedPlugin("p", plugin_with({"mail": lambda *a: Deferred()}), timeout=0)]
        r = self.runner_of(loaded, timeout=1)
        d = r.run("mail", FakeConn(), "s", {})
        self.clock.advance(1000)
        self.assertNoResult(d)
        loaded = [LoadedPlugin("p", plugin_with({"mail": lambda *a: Deferred()}), timeout=5)]
        d = self.runner_of(loaded, timeout=1).run("mail", FakeConn(), "s", {})
        self.clock.advance(4)
        self.assertNoResult(d)
        self.clock.advance(1.1)
        self.assertEqual(self.result(d).code, DENYSOFT)

    def test_exception_is_logged_and_cont(self) -> None:
        """An exception is logged at CRIT with the plugin's name and treated as CONT."""

        def boom(*a: Any) -> None:
            raise RuntimeError("kaboom")

        async def aboom(*a: Any) -> None:
            raise ValueError("async kaboom")

        r = self.runner(
            ("broken", {"mail": boom}),
            ("abroken", {"mail": aboom}),
            ("after", {"mail": self.answer("after", OK)}),
        )
        res = self.result(r.run("mail", FakeConn(), "s", {}))
        self.assertEqual(res.plugin, "after")
        crit = [(rec.origin, rec.message) for rec in self.log.records if rec.level == Level.CRIT]
        self.assertEqual([o for o, _ in crit], ["broken", "abroken"])
        self.assertIn("kaboom", crit[0][1])

    def test_bad_return_value_is_cont(self) -> None:
        """A return value of the wrong shape is logged and treated as CONT."""
        r = self.runner(
            ("odd", {"mail": lambda *a: "yes"}), ("ok", {"mail": self.answer("ok", OK)})
        )
        self.assertEqual(self.result(r.run("mail", FakeConn(), "s", {})).plugin, "ok")
        self.assertTrue(self.log.messages(Level.CRIT))

    def test_skip_plugins(self) -> None:
        """Plugins named in transaction.notes.skip_plugins are skipped."""
        conn = FakeConn()
        assert conn.transaction is not None
        conn.transaction.notes["skip_plugins"] = ["a"]
        r = self.runner(
            ("a", {"rcpt": self.answer("a", DENY)}), ("b", {"rcpt": self.answer("b", OK)})
        )
        self.assertEqual(self.result(r.run("rcpt", conn, "x", {})).plugin, "b")
        self.assertEqual(self.calls, ["b"])

    def test_after_disconnect_only_cleanup_hooks(self) -> None:
        """Once the client has gone only reset_transaction, disconnect and log run."""
        conn = FakeConn()
        conn.remote.closed = True
        r = self.runner(
            (
                "p",
                {
                    "mail": self.answer("mail", DENY),
                    "reset_transaction": self.answer("reset", None),
                    "disconnect": self.answer("disconnect", None),
                },
            )
        )
        self.assertEqual(self.result(r.run("mail", conn, "s", {})).code, CONT)
        self.result(r.run("reset_transaction", conn))
        self.result(r.run("disconnect", conn))
        self.assertEqual(self.calls, ["reset", "disconnect"])

    def test_client_gone_mid_chain(self) -> None:
        """If the client goes while a hook is pending, the rest of that chain does not run."""
        conn = FakeConn()
        pending: Deferred[Any] = Deferred()
        r = self.runner(
            ("slow", {"mail": lambda *a: pending}), ("next", {"mail": self.answer("next", OK)})
        )
        d = r.run("mail", conn, "s", {})
        conn.remote.closed = True
        pending.callback(None)
        self.assertEqual(self.result(d).code, CONT)
        self.assertEqual(self.calls, [])

    def test_log_hook_suppresses(self) -> None:
        """run_log is True when a log plugin answers anything but CONT."""
        r = self.runner(("quiet", {"log": lambda conn, record: OK}))
        self.assertTrue(r.run_log(None, object()))
        r = self.runner(("loud", {"log": lambda conn, record: None}))
        self.assertFalse(r.run_log(None, object()))

    # -- call(): the result itself when every plugin answered synchronously ----------------

    def test_synchronous_chain_gives_the_result_itself(self) -> None:
        """Synchronous plugins (and an empty chain) give a HookResult, not a Deferred."""
        r = self.runner(
            ("a", {"mail": self.answer("a", None)}),
            ("b", {"mail": self.answer("b", (DENY, "no"))}),
        )
        res = r.call("mail", FakeConn(), "s", {})
        assert isinstance(res, HookResult)
        self.assertEqual((res.code, res.message, res.plugin), (DENY, "no", "b"))
        empty = r.call("rcpt", FakeConn(), "x", {})
        assert isinstance(empty, HookResult)
        self.assertIs(empty.code, CONT)

    def test_one_asynchronous_plugin_gives_a_deferred(self) -> None:
        """A Deferred anywhere in the chain makes the answer a Deferred, fired in order."""
        pending: Deferred[Any] = Deferred()
        r = self.runner(
            ("a", {"mail": self.answer("a", None)}),
            ("slow", {"mail": lambda *a: pending}),
            ("c", {"mail": self.answer("c", OK)}),
        )
        res = r.call("mail", FakeConn(), "s", {})
        assert isinstance(res, Deferred)
        self.assertEqual(self.calls, ["a"])
        pending.callback(None)
        self.assertEqual(self.successResultOf(res).plugin, "c")
        self.assertEqual(self.calls, ["a", "c"])

    def test_synchronous_deny_override(self) -> None:
        """A synchronous deny plugin answering OK resumes the chain, still without Deferreds."""
        r = self.runner(
            ("strict", {"mail": self.answer("strict", DENY)}),
            ("forgiving", {"deny": self.answer("forgiving", OK)}),
            ("last", {"mail": self.answer("last", (OK, "fine"))}),
        )
        res = r.call("mail", FakeConn(), "s", {})
        assert isinstance(res, HookResult)
        self.assertEqual((res.code, res.plugin), (OK, "last"))
        self.assertEqual(self.calls, ["strict", "forgiving", "last"])

    def test_then_turns_an_exception_into_a_failure(self) -> None:
        """An exception from the step after a synchronous answer becomes a failed Deferred,
        as it would in a callback, for the session to answer 451."""

        def broken(value: int) -> int:
            raise ValueError(f"bad {value}")

        failed = then(3, broken)
        assert isinstance(failed, Deferred)
        self.assertEqual(str(self.failureResultOf(failed, ValueError).value), "bad 3")

    def test_then_calls_at_once_or_later(self) -> None:
        """then() calls on at once for a value and once a Deferred fires."""
        seen: list[int] = []
        self.assertEqual(then(1, lambda v: seen.append(v) or v + 1), 2)
        pending: Deferred[int] = Deferred()
        chained = then(pending, lambda v: seen.append(v) or v + 1)
        self.assertEqual(seen, [1])
        pending.callback(5)
        self.assertEqual((seen, self.successResultOf(chained)), ([1, 5], 6))
