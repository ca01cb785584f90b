"""The interleaved run: every scenario against every server back to back, the server order
rotated per repetition (and per scenario), so the drift of a shared machine hits all alike,
and reversed every other time, so that no server always runs right after the same one
(with rotation alone, haraka_tw followed smtp-sink in every round but its first).

Load scenarios run against one long-lived process per server (started once, warmed up with
a few messages). The idle-connection phase starts a fresh process for every measurement, so
memory freed by an earlier phase cannot hide what connections cost. The outbound phase
starts its own haraka_tw, DNS server and smtp-sink per run (see L{bench.outbound}).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import measure, outbound
from bench.plan import LoadScenario, Plan
from bench.servers import ServerProcess, make_kind
from bench.tools import Postfix

__all__ = ["listen_overflows", "rotated", "run", "turn_order"]

# haraka-maildir differs from haraka only in its queue plugin, haraka-nodes2 in running
# the same code in two workers: an idle connection costs the same, so the idle phase skips
# them.
IDLE_SKIP = frozenset({"haraka-maildir", "haraka-nodes2"})


def rotated(items: list[str], by: int) -> list[str]:
    if not items:
        return items
    by %= len(items)
    return items[by:] + items[:by]


def turn_order(items: list[str], turn: int) -> list[str]:
    """The servers' order for round C{turn}: rotated by C{turn}, and reversed when C{turn}
    is odd, so each server starts early and late, and follows different servers."""
    order = rotated(items, turn)
    return order[::-1] if turn % 2 else order


def listen_overflows() -> int:
    """TcpExt ListenOverflows (SYNs dropped because an accept queue was full), system-wide."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            fields = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(fields.get("ListenOverflows", 0))
    return 0


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        took = time.monotonic() - self.started
        print(f"[{took:6.0f}s] {text}", file=sys.stderr, flush=True)


def run(plan: Plan, postfix: Postfix, work: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Run every phase of C{plan}; the raw samples (see L{bench.report} for the shape)."""
    results: dict[str, Any] = {"load": {}, "idle": {}, "outbound": {}}
    if plan.load:
        results["load"] = run_load(plan, postfix, work / "load", say)
    if plan.idle_counts:
        results["idle"] = run_idle(plan, work / "idle", say)
    if plan.outbound_domains:
        results["outbound"] = run_outbound(plan, postfix, work / "outbound", say)
    return results


def run_load(
    plan: Plan, postfix: Postfix, work: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    servers: dict[str, ServerProcess] = {}
    out: dict[str, Any] = {
        s.key: {"title": s.title, "scenario": s.__dict__, "runs": []} for s in plan.load
    }
    try:
        for key in plan.servers:
            server = ServerProcess(make_kind(key, plan.haraka_backlog), work / key)
            server.start()
            servers[key] = server
            warm = measure.warm_up(postfix, server.pid, server.port)
            server.after_run()
            if warm.error:
                raise RuntimeError(f"{key} failed the warm-up run: {warm.error}")
            say(f"started {key} (pid {server.pid}, port {server.port})")
        for rep in range(plan.reps):
            for i, scenario in enumerate(plan.load):
                for key in turn_order(plan.servers, rep + i):
                    server = servers[key]
                    sample = one_load(postfix, server, scenario, plan.load_timeout(scenario))
                    out[scenario.key]["runs"].append({"rep": rep, "server": key, **sample})
                    drops = sample["listen_drops"]
                    say(
                        f"rep {rep + 1}/{plan.reps} {scenario.title} {key}: "
                        f"{sample['rate']:,.0f} msg/s, {sample['cpu_ms']:.2f} ms CPU/msg"
                        + (f", {drops} SYNs dropped" if drops else "")
                        + (f" ERROR {sample['error']}" if sample["error"] else "")
                    )
    finally:
        for server in servers.values():
            server.stop()
    return out


def one_load(
    postfix: Postfix, server: ServerProcess, scenario: LoadScenario, timeout: float
) -> dict[str, Any]:
    # Every run starts on a quiet disk: the kernel's writeback of the run before (queue/
    # maildir's 20,000 files) otherwise took CPU from whichever server came next (twisted.mail
    # ran at 1,919-2,463 msg/s right after maildir, 2,641-3,715 elsewhere in the same runs).
    os.sync()
    drops = listen_overflows()
    sample = measure.load(
        postfix,
        server.pid,
        server.port,
        sessions=scenario.sessions,
        messages=scenario.messages,
        size=scenario.size,
        reuse=scenario.reuse,
        timeout=timeout,
    )
    drops = listen_overflows() - drops
    server.after_run()
    return {
        "rate": sample.rate,
        "seconds": sample.seconds,
        "cpu_ms": sample.cpu_ms_per_message,
        "peak_rss_kb": sample.peak_rss_kb,
        "listen_drops": drops,
        "error": sample.error,
    }


def run_idle(plan: Plan, work: Path, say: Callable[[str], None]) -> dict[str, Any]:
    keys = [k for k in plan.servers if k not in IDLE_SKIP]
    out: dict[str, Any] = {str(n): {"runs": []} for n in plan.idle_counts}
    for rep in range(plan.reps):
        for i, count in enumerate(plan.idle_counts):
            for key in rotated(keys, rep + i):
                server = ServerProcess(make_kind(key, plan.haraka_backlog), work / key)
                server.start()
                try:
                    sample = measure.hold_idle(server.pid, server.port, count)
                finally:
                    server.stop()
                out[str(count)]["runs"].append(
                    {
                        "rep": rep,
                        "server": key,
                        "held": sample.held,
                        "bytes_per_connection": sample.bytes_per_connection,
                        "rss_before_kb": sample.rss_before_kb,
                        "rss_with_kb": sample.rss_with_kb,
                        "seconds": sample.seconds,
                    }
                )
                say(
                    f"rep {rep + 1}/{plan.reps} idle {count:,} {key}: held {sample.held:,}, "
                    f"{sample.bytes_per_connection / 1024:.1f} KB each"
                )
    return out


def run_outbound(
    plan: Plan, postfix: Postfix, work: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    out: dict[str, Any] = {str(d): {"runs": []} for d in plan.outbound_domains}
    timeout = 60.0 + plan.outbound_messages * 0.05
    for rep in range(plan.reps):
        for domains in rotated([str(d) for d in plan.outbound_domains], rep):
            sample = outbound.deliver(
                postfix,
                work / f"{rep}-{domains}",
                messages=plan.outbound_messages,
                domains=int(domains),
                size=plan.outbound_size,
                timeout=timeout,
            )
            out[domains]["runs"].append(
                {
                    "rep": rep,
                    "messages": sample.messages,
                    "rate": sample.rate,
                    "seconds": sample.seconds,
                    "queue_rate": sample.queue_rate,
                    "cpu_ms": sample.cpu_ms_per_message,
                    "peak_rss_kb": sample.peak_rss_kb,
                    "error": sample.error,
                }
            )
            say(
                f"rep {rep + 1}/{plan.reps} outbound to {domains} domain(s): "
                f"queued {sample.queue_rate:,.0f} msg/s, delivered {sample.rate:,.0f} msg/s"
                + (f" ERROR {sample.error}" if sample.error else "")
            )
    return out
