"""Where the memory of an idle greeted connection goes, in haraka_tw (or stock twisted.mail).

    .venv/bin/python -m bench.memprofile [--count 2000] [--server haraka|twisted] [--top 25]

The server runs in this process on loopback (haraka_tw: the bench's chain,
rcpt_to.in_host_list + queue/discard over the shipped etc/); a child process opens
C{--count} connections, reads each banner and holds them. Then this prints:

- the RSS growth per connection (as bench/measure.py measures it, but in-process);
- the new objects per connection by type (gc-tracked objects, with sys.getsizeof);
- the tracemalloc snapshot difference per connection, grouped by source line;
- one session's attributes and what each holds on its own (objects reachable from it that
  no other session reaches).

RSS is measured in a first round without tracemalloc (which costs memory of its own), the
rest in a second round.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet import protocol, reactor

from bench.measure import rss_kb

__all__ = ["main"]


# -- the child: holds connections until its stdin closes ------------------------------------


def _client(port: int, count: int) -> None:
    import selectors

    sel = selectors.DefaultSelector()
    held: list[socket.socket] = []
    waiting: dict[socket.socket, bytes] = {}
    opened = 0
    while len(held) < count:
        while opened < count and len(waiting) < 40:
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            sel.register(s, selectors.EVENT_READ)
            waiting[s] = b""
            opened += 1
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj  # type: ignore[assignment]
            data = waiting[s] + s.recv(4096)
            waiting[s] = data
            if data.endswith(b"\r\n") and b"\n220 " in b"\n" + data:
                sel.unregister(s)
                del waiting[s]
                held.append(s)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the parent closes it
    for s in held:
        s.close()


class _Child(protocol.ProcessProtocol):
    def __init__(self, on_ready: Any, on_end: Any) -> None:
        self.on_ready = on_ready
        self.on_end = on_end
        self.buf = b""

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        if b"ready\n" in self.buf:
            self.buf = b""
            reactor.callLater(0.5, self.on_ready, self)  # type: ignore[attr-defined]

    def processEnded(self, reason: Any) -> None:
        self.on_end()


def _spawn(port: int, count: int, on_ready: Any, on_end: Any) -> None:
    """A child process that holds C{count} greeted connections until its stdin closes."""
    reactor.spawnProcess(  # type: ignore[attr-defined]
        _Child(on_ready, on_end),
        sys.executable,
        [sys.executable, "-m", "bench.memprofile", "--client", str(port), str(count)],
        env=dict(os.environ),
        path=str(Path(__file__).resolve().parent.parent),
    )


def _stop() -> None:
    if reactor.running:  # type: ignore[attr-defined]
        reactor.stop()  # type: ignore[attr-defined]


# -- the servers ------------------------------------------------------------------------------


def _haraka(work: Path) -> tuple[Any, Any]:
    """A haraka_tw factory as the bench runs it; returns (factory, sessions getter)."""
    from bench.servers import write_haraka_config
    from haraka_tw.server import HarakaServer

    confdir = work / "config"
    write_haraka_config(confdir, 0, ["rcpt_to.in_host_list", "queue/discard"])
    (confdir / "outbound.ini").write_text(f"[main]\nqueue_dir={work}/queue\ndisabled=true\n")
    server = HarakaServer.from_directory(confdir, reactor)
    server.log.hook = lambda c, r: True  # quiet
    return server.factory, lambda: list(server.factory.sessions)


def _twisted() -> tuple[Any, Any]:
    sys.path.insert(0, str(Path(__file__).parent / "peers"))
    import twisted_noop  # type: ignore[import-not-found]

    built: list[Any] = []
    factory = twisted_noop.NoopESMTPFactory()
    factory.delivery = twisted_noop.AcceptEverything()
    make = factory.buildProtocol

    def keep(addr: Any) -> Any:
        p = make(addr)
        built.append(p)
        return p

    factory.buildProtocol = keep  # type: ignore[method-assign]
    return factory, lambda: [p for p in built if p.transport is not None and p.transport.connected]


# -- what one session holds -------------------------------------------------------------


def _size(obj: Any) -> int:
    try:
        return sys.getsizeof(obj)
    except TypeError:
        return 0


def _reachable(root: Any, stop: set[int], within: dict[int, Any] | None = None) -> dict[int, Any]:
    """Every object reachable from C{root}, not entering objects whose id is in C{stop}
    (nor, if given, objects not in C{within})."""
    seen: dict[int, Any] = {}
    todo = [root]
    while todo:
        obj = todo.pop()
        oid = id(obj)
        if oid in seen or oid in stop or (within is not None and oid not in within):
            continue
        seen[oid] = obj
        todo.extend(gc.get_referents(obj))
    return seen


def _parts(session: Any) -> list[Any]:
    """A session, its transport and its timers: what the reactor reaches it through."""
    parts = [session, session.transport]
    for call in reactor.getDelayedCalls():  # type: ignore[attr-defined]
        if getattr(call.func, "__self__", None) is session:
            parts.append(call)
    return parts


def _own(sessions: list[Any]) -> tuple[dict[int, Any], set[int]]:
    """The objects the first session (with its transport and timers) reaches that nothing
    else does: not the modules (and so the reactor, the factory, the settings, the
    runner), not the other sessions."""
    me = sessions[0]
    stop = {id(p) for s in sessions for p in _parts(s)}
    shared = set(_reachable(sys.modules, stop))
    for other in sessions[1:4]:
        for part in _parts(other):
            shared |= set(_reachable(part, stop | shared)) - {id(part)}
    mine: dict[int, Any] = {}
    mine_parts = _parts(me)
    for part in mine_parts:
        mine.update(_reachable(part, (stop | shared) - {id(part)}))
    return mine, shared


def _attribute_report(session: Any, mine: dict[int, Any]) -> list[str]:
    """The connection, the transport, the timers, then the session: each attribute with the
    bytes of what it alone holds (each object counted once, where first met)."""
    lines = []
    counted: set[int] = {id(p) for p in _parts(session)}  # each is walked on its own

    def held(value: Any) -> tuple[int, int]:
        objs = _reachable(value, counted, mine)
        counted.update(objs)
        return sum(_size(o) for o in objs.values()), len(objs)

    def walk(label: str, obj: Any) -> None:
        # (reading __dict__ gives an instance using shared keys a dict of its own: this
        # one object is changed by being looked at, so its size here is the full dict's)
        d = getattr(obj, "__dict__", None)
        slots = [
            n for c in type(obj).__mro__ for n in getattr(c, "__slots__", ()) if hasattr(obj, n)
        ]
        own = _size(obj) + (_size(d) if d is not None else 0)
        counted.add(id(obj))
        if d is not None:
            counted.add(id(d))
        lines.append(f"  {label}: {type(obj).__name__}, the object and its __dict__: {own} B")
        items = list(d.items()) if d is not None else []
        items += [(n, getattr(obj, n)) for n in slots]
        rows = []
        for name, value in items:
            if id(value) not in mine or id(value) in counted:
                continue
            size, n = held(value)
            if size:
                rows.append((size, name, type(value).__name__, n))
        for size, name, kind, n in sorted(rows, reverse=True):
            lines.append(f"    .{name:<28} {kind:<22} {size:6d} B in {n} objects")

    conn = getattr(session, "connection", None)
    if conn is not None:
        walk("connection", conn)
    if session.transport is not None:
        walk("transport", session.transport)
    for call in _parts(session)[2:]:
        walk("timer", call)
    walk("session", session)
    rest = sum(_size(o) for k, o in mine.items() if k not in counted)
    total = sum(_size(o) for o in mine.values())
    lines.append(f"  not attributed above: {rest} B; all it alone holds: {total} B")
    return lines


# -- the rounds ---------------------------------------------------------------------------


def _round(kind: str, count: int, trace: bool, top: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="memprofile-"))
    factory, sessions = _haraka(work) if kind == "haraka" else _twisted()
    port = reactor.listenTCP(0, factory, backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    portno = port.getHost().port
    state: dict[str, Any] = {}

    def warm_up() -> None:
        # a few connections opened and closed first, so first-use costs are not counted
        _spawn(
            portno,
            20,
            lambda child: child.transport.closeStdin(),
            lambda: reactor.callLater(0.5, start),
        )  # type: ignore[attr-defined]

    def start() -> None:
        gc.collect()
        if trace:
            tracemalloc.start(8)
            state["snap"] = tracemalloc.take_snapshot()
            state["objs"] = Counter(type(o).__name__ for o in gc.get_objects())
            state["sizes"] = Counter()
            for o in gc.get_objects():
                state["sizes"][type(o).__name__] += _size(o)
        state["rss"] = rss_kb(os.getpid())
        _spawn(portno, count, ready, _stop)

    def ready(child: _Child) -> None:
        gc.collect()
        held = len(sessions())
        rss = rss_kb(os.getpid())
        print(f"\n== {kind}: {held} idle greeted connections")
        if not trace:
            print(f"RSS growth: {1024 * (rss - state['rss']) / held:.0f} B per connection")
        else:
            snap = tracemalloc.take_snapshot()
            tracemalloc.stop()
            objs = Counter(type(o).__name__ for o in gc.get_objects())
            sizes: Counter[str] = Counter()
            for o in gc.get_objects():
                sizes[type(o).__name__] += _size(o)
            print("\n-- new gc-tracked objects per connection, by type (count, sys.getsizeof)")
            rows = []
            for name in set(objs) | set(state["objs"]):
                dn = objs[name] - state["objs"][name]
                ds = sizes[name] - state["sizes"][name]
                if abs(dn) >= held // 2:
                    rows.append((ds / held, dn / held, name))
            for ds, dn, name in sorted(rows, reverse=True):
                print(f"  {name:<28} {dn:6.2f} objects {ds:8.1f} B")
            print(f"  total {sum(r[0] for r in rows):.0f} B (gc-tracked only; str/bytes/int not)")
            stats = snap.compare_to(state["snap"], "lineno")
            total = sum(s.size_diff for s in stats)
            print(f"\n-- tracemalloc: {total / held:.0f} B per connection, by line (top {top})")
            for s in stats[:top]:
                frame = s.traceback[0]
                name = frame.filename.split("site-packages/")[-1].split("/main/")[-1]
                print(
                    f"  {s.size_diff / held:7.1f} B {s.count_diff / held:5.2f} blocks"
                    f"  {name}:{frame.lineno}"
                )
            stats = snap.compare_to(state["snap"], "traceback")
            print(f"\n-- tracemalloc by traceback (top {min(top, 12)})")
            for s in stats[: min(top, 12)]:
                print(f"  {s.size_diff / held:7.1f} B {s.count_diff / held:5.2f} blocks")
                for frame in s.traceback.format(most_recent_first=True)[:8:2]:
                    print(f"      {frame.strip().split('/main/')[-1]}")
            live = sessions()
            del snap, stats, state["snap"]
            mine, _shared = _own(live)
            print("\n-- one session: what it alone holds (sys.getsizeof, deep)")
            for line in _attribute_report(live[0], mine):
                print(line)
            by_type: Counter[str] = Counter()
            n_type: Counter[str] = Counter()
            for o in mine.values():
                by_type[type(o).__name__] += _size(o)
                n_type[type(o).__name__] += 1
            print("  by type:")
            for name, size in by_type.most_common(30):
                print(f"    {name:<28} {n_type[name]:3d} {size:6d} B")
        sys.stdout.flush()
        child.transport.closeStdin()

    reactor.callWhenRunning(warm_up)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.memprofile", description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--server", choices=("haraka", "twisted"), default="haraka")
    p.add_argument("--top", type=int, default=25)
    p.add_argument(
        "--round",
        choices=("both", "rss", "trace"),
        default="both",
        help="rss: RSS growth only; trace: tracemalloc and the object census; both (default)",
    )
    p.add_argument("--client", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        _client(*args.client)
        return
    if args.round == "both":
        # one process per round: the reactor runs once, and the RSS round must not carry
        # tracemalloc's own memory
        import subprocess

        base = [sys.executable, "-m", "bench.memprofile", "--server", args.server]
        base += ["--count", str(args.count), "--top", str(args.top)]
        for name in ("rss", "trace"):
            subprocess.run([*base, "--round", name], check=False)
        return
    _round(args.server, args.count, trace=args.round == "trace", top=args.top)


if __name__ == "__main__":
    main()
