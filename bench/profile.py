"""Profile one server under smtp-source load: how the fast paths were found.

    .venv/bin/python -m bench.profile [--server haraka] [--sessions 20] [--messages 10000]
        [--size 1024] [--reuse] [--rounds 3] [--cprofile FILE] [--top 30]

Starts one server as bench/ does (same config, same tools), warms it up, then runs
smtp-source C{--rounds} times and prints, per round, messages/s and the server's CPU
milliseconds per message split into user and system time (the process and its
descendants, from /proc), with its voluntary context switches per message. With
C{--cprofile FILE} (haraka_tw only) the server runs under C{twistd --profiler=cprofile}:
the rates are then slower, but the functions that take the time are printed at the end
(tottime order) and the stats kept in FILE for C{python -m pstats}. They cover the server's
whole life (start, the warm-up's 20 messages, the rounds, the stop): with thousands of
messages a round, the rounds are nearly all of it.

An A/B comparison of a change is this run twice, on two checkouts, alternating: one pair
on this shared machine says little (see docs/architecture.md, "Decisions").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import measure, tools
from bench.plan import SERVERS
from bench.servers import Haraka, Launch, ServerKind, ServerProcess, make_kind

__all__ = ["Usage", "main", "usage_of"]


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user, system) and voluntary context switches of a process tree."""

    user: float
    system: float
    switches: int

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.user - other.user, self.system - other.system, self.switches - other.switches
        )


def usage_of(pid: int) -> Usage:
    """L{Usage} of C{pid} and its live descendants, every thread of each."""
    user = system = 0.0
    switches = 0
    for each in measure.process_tree(pid):
        with contextlib.suppress(OSError, ValueError):  # (gone meanwhile)
            used = measure.cpu_times(each)
            user, system = user + used[0], system + used[1]
            for task in os.listdir(f"/proc/{each}/task"):
                with open(f"/proc/{each}/task/{task}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            switches += int(line.split()[1])
    return Usage(user, system, switches)


class _Profiled(ServerKind):
    """A haraka_tw kind run under twistd's cProfile, its stats saved to C{path}."""

    def __init__(self, kind: Haraka, path: Path) -> None:
        self.kind = kind
        self.path = path
        self.key, self.label, self.version = kind.key, kind.label, kind.version

    def launch(self, work: Path, port: int) -> Launch:
        plain = self.kind.launch(work, port)
        at = plain.argv.index("-n") + 1
        argv = [
            *plain.argv[:at],
            "--profiler=cprofile",
            f"--profile={self.path}",
            "--savestats",
            *plain.argv[at:],
        ]
        return Launch(argv, plain.env, plain.cwd)

    def after_run(self, work: Path) -> None:
        self.kind.after_run(work)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--server", default="haraka", choices=SERVERS)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--size", type=int, default=1024, help="message bytes")
    parser.add_argument("--reuse", action="store_true", help="one connection per session")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cprofile", type=Path, help="run haraka_tw under cProfile")
    parser.add_argument("--top", type=int, default=30, help="functions printed")
    args = parser.parse_args(argv)
    if args.cprofile and not args.server.startswith("haraka"):
        parser.error("--cprofile profiles haraka_tw only")
    if args.cprofile and args.server == "haraka-nodes2":
        parser.error("--cprofile profiles one process: not haraka-nodes2")
    if min(args.sessions, args.messages, args.size, args.rounds) < 1:
        parser.error("--sessions, --messages, --size and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    postfix = tools.postfix()
    kind = make_kind(args.server)
    kind.prepare()
    if args.cprofile:
        assert isinstance(kind, Haraka)
        kind = _Profiled(kind, args.cprofile.absolute())
    if args.cprofile:
        args.cprofile.unlink(missing_ok=True)  # (so an old profile is never read as this one)
    work = Path(tempfile.mkdtemp(prefix="haraka-profile-"))
    server = ServerProcess(kind, work / kind.key)
    try:
        server.start()
        warm = measure.warm_up(postfix, server.pid, server.port)
        if warm.error:
            print(f"the warm-up run failed: {warm.error}")
            return 1
        print(f"{kind.label}: {args.sessions} sessions x {args.messages:,} x {args.size} bytes")
        for n in range(args.rounds):
            before = usage_of(server.pid)
            sample = measure.load(
                postfix,
                server.pid,
                server.port,
                sessions=args.sessions,
                messages=args.messages,
                size=args.size,
                reuse=args.reuse,
                timeout=120 + args.messages * 0.05,
            )
            used = usage_of(server.pid) - before
            server.after_run()
            if sample.error:
                print(f"round {n + 1}: {sample.error}")
                return 1
            per = 1000 / args.messages
            cpu = (used.user + used.system) * per
            print(
                f"round {n + 1}: {sample.rate:,.0f} msg/s, CPU {cpu:.3f}"
                f" ms/msg (user {used.user * per:.3f}, system {used.system * per:.3f}), "
                f"{used.switches / args.messages:.2f} voluntary switches/msg"
            )
    finally:
        server.stop()  # (SIGTERM: twistd writes the profile as it stops)
        shutil.rmtree(work, ignore_errors=True)
    if args.cprofile:
        if not args.cprofile.exists():
            print(f"twistd wrote no profile to {args.cprofile} (killed before it stopped?)")
            return 1
        print()
        pstats.Stats(str(args.cprofile)).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
