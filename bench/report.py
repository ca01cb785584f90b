"""results.json -> results.md: medians, ratios to every peer, the issue's goals.

Ratios are taken per repetition (servers ran back to back within it) and then the median
of those is shown, so drift between repetitions does not enter a ratio.

The shape of results.json::

    {"meta": {...},
     "load": {"b": {"title": ..., "scenario": {...},
                    "runs": [{"rep", "server", "rate", "seconds", "cpu_ms",
                              "peak_rss_kb", "listen_drops", "error"}, ...]}, ...},
     "idle": {"10000": {"runs": [{"rep", "server", "held", "bytes_per_connection", ...}]}},
     "outbound": {"1": {"runs": [{"rep", "rate", "queue_rate", "cpu_ms", ...}]}, ...}}
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from bench.plan import LOAD_KEYS

__all__ = ["LABELS", "markdown", "medians", "ratio"]

LABELS = {
    "haraka": "haraka_tw, in_host_list + queue/discard",
    "haraka-maildir": "haraka_tw, in_host_list + queue/maildir (fsync)",
    "haraka-nodes2": "haraka_tw, in_host_list + queue/discard, nodes=2 (master + 2 workers)",
    "twisted": "stock twisted.mail ESMTP, no-op delivery",
    "aiosmtpd": "aiosmtpd 1.4.6, discard",
    "smtp-sink": "Postfix smtp-sink (C, does nothing: the ceiling)",
}
MB = 1024 * 1024


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def medians(runs: list[dict[str, Any]], field: str) -> dict[str, float]:
    """Per server, the median of C{field} over its successful runs."""
    by: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        if not run.get("error"):
            by[run["server"]].append(float(run[field]))
    return {server: statistics.median(values) for server, values in by.items()}


def ratio(runs: list[dict[str, Any]], row: str, col: str, field: str = "rate") -> float | None:
    """Median over repetitions of row's C{field} / col's, both from the same repetition."""
    per_rep: dict[int, dict[str, float]] = defaultdict(dict)
    for run in runs:
        if not run.get("error"):
            per_rep[run["rep"]][run["server"]] = float(run[field])
    values = [rep[row] / rep[col] for rep in per_rep.values() if rep.get(row) and rep.get(col)]
    return _median(values)


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _last_line(text: str) -> str:
    """The last non-empty line of C{text} (a tool's error output, for one Markdown line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


def _servers(results: dict[str, Any]) -> list[str]:
    return list(results["meta"]["servers"])


def _header(cells: list[str]) -> list[str]:
    return ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def summary_table(results: dict[str, Any]) -> list[str]:
    load = results["load"]
    idle = results["idle"]
    cols = [load[k]["title"] for k in load]
    cpu_key = "b" if "b" in load else next(iter(load), None)
    extra = []
    if cpu_key:
        extra.append(f"server CPU ms per message ({cpu_key})")
    idle_key = max(idle, key=int) if idle else None
    if idle_key:
        extra.append(f"memory per idle connection ({int(idle_key):,})")
    lines = _header(["server", *cols, *extra])
    for server in _servers(results):
        cells = [LABELS.get(server, server)]
        for k in load:
            cells.append(_num(medians(load[k]["runs"], "rate").get(server)))
        if cpu_key:
            cells.append(_num(medians(load[cpu_key]["runs"], "cpu_ms").get(server), 2))
        if idle_key:
            per = medians(idle[idle_key]["runs"], "bytes_per_connection").get(server)
            cells.append("-" if per is None else f"{per / 1024:.1f} KB")
        lines.append(_row(cells))
    return lines


def scenario_tables(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    servers = _servers(results)
    for scenario in results["load"].values():
        runs = scenario["runs"]
        size = scenario["scenario"]["size"]
        out += ["", f"### {scenario['title']}", ""]
        out += _header(
            [
                "server",
                "msg/s (median)",
                "min-max",
                "MB/s",
                "CPU ms/msg",
                "peak RSS MB",
                "SYNs dropped",
                *[f"÷ {s}" for s in servers],
            ]
        )
        rates = medians(runs, "rate")
        cpu = medians(runs, "cpu_ms")
        rss = medians(runs, "peak_rss_kb")
        for server in servers:
            mine = [r for r in runs if r["server"] == server]
            ok = [r["rate"] for r in mine if not r.get("error")]
            errors = [r["error"] for r in mine if r.get("error")]
            drops = sum(r.get("listen_drops", 0) for r in mine)
            rate = rates.get(server)
            cells = [
                server,
                _num(rate) + (f" ({len(errors)} failed: {errors[0]})" if errors else ""),
                f"{min(ok):,.0f}-{max(ok):,.0f}" if ok else "-",
                _num(rate * size / MB if rate else None, 1),
                _num(cpu.get(server), 2),
                _num(rss[server] / 1024 if server in rss else None),
                str(drops),
            ]
            cells += [
                "1" if other == server else _x(ratio(runs, server, other)) for other in servers
            ]
            out.append(_row(cells))
    return out


def idle_table(results: dict[str, Any]) -> list[str]:
    idle = results["idle"]
    if not idle:
        return []
    counts = sorted(idle, key=int)
    top_runs = idle[counts[-1]]["runs"]
    measured = [s for s in _servers(results) if any(r["server"] == s for r in top_runs)]
    out = _header(
        [
            "server",
            *[f"{int(c):,} connections: KB each (held)" for c in counts],
            "RSS with most, MB",
            *[f"÷ {s}" for s in measured],
        ]
    )
    for server in _servers(results):
        cells = [server]
        held_any = False
        for c in counts:
            runs = [r for r in idle[c]["runs"] if r["server"] == server]
            if not runs:
                cells.append("-")
                continue
            held_any = True
            per = statistics.median(r["bytes_per_connection"] for r in runs) / 1024
            held = min(r["held"] for r in runs)
            cells.append(f"{per:.1f} ({held:,})")
        if not held_any:
            continue
        top = [r["rss_with_kb"] for r in top_runs if r["server"] == server]
        cells.append(_num(statistics.median(top) / 1024 if top else None))
        for peer in measured:
            per_rep = ratio(top_runs, server, peer, "bytes_per_connection")
            cells.append("1" if peer == server else _x(per_rep))
        out.append(_row(cells))
    return out


def outbound_table(results: dict[str, Any]) -> list[str]:
    outbound = results["outbound"]
    if not outbound:
        return []
    out = _header(
        [
            "destination domains",
            "messages",
            "queued msg/s (send_email, fsynced)",
            "delivered msg/s (median)",
            "min-max",
            "CPU ms/msg",
            "peak RSS MB",
        ]
    )
    for domains in sorted(outbound, key=int):
        runs = outbound[domains]["runs"]
        ok = [r for r in runs if not r.get("error")]
        errors = [r["error"] for r in runs if r.get("error")]
        rates = [r["rate"] for r in ok]
        out.append(
            _row(
                [
                    domains,
                    f"{runs[0]['messages']:,}" if runs else "-",
                    _num(_median([r["queue_rate"] for r in runs])),
                    _num(_median(rates))
                    + (f" ({len(errors)} failed: {errors[0]})" if errors else ""),
                    f"{min(rates):,.0f}-{max(rates):,.0f}" if rates else "-",
                    _num(_median([r["cpu_ms"] for r in ok]), 2),
                    _num(_median([r["peak_rss_kb"] / 1024 for r in ok])),
                ]
            )
        )
    return out


def goals(results: dict[str, Any]) -> list[str]:
    """Issue 5's goals that one process can be held to, with the measured ratio."""
    load, idle, outbound = results["load"], results["idle"], results["outbound"]
    ran = set(_servers(results))
    # (goal, measured, target, higher is better, the servers it needs)
    rows: list[tuple[str, float | None, float, bool, tuple[str, ...]]] = []

    def vs(key: str, row: str, col: str, target: float) -> None:
        if key in load:
            title = load[key]["title"].split(")")[0] + ")"
            measured = ratio(load[key]["runs"], row, col)
            rows.append((f"{title} {row} ÷ {col}", measured, target, True, (row, col)))

    for key in ("b", "c"):
        vs(key, "haraka", "twisted", 0.9)
        vs(key, "haraka", "aiosmtpd", 2.0)
    vs("b1", "haraka", "twisted", 0.9)
    vs("d", "haraka", "twisted", 2.0)
    vs("d", "haraka", "aiosmtpd", 3.0)
    vs("d", "haraka", "smtp-sink", 0.5)
    for key in ("b", "d"):
        vs(key, "haraka-maildir", "haraka", 0.5)
        vs(key, "haraka-nodes2", "haraka", 1.5)
    for key in LOAD_KEYS:  # nodes=2: ahead of every peer but the ceiling, in every scenario
        vs(key, "haraka-nodes2", "twisted", 1.0)
        vs(key, "haraka-nodes2", "aiosmtpd", 1.0)
    if idle:
        top = max(idle, key=int)
        runs = [r for r in idle[top]["runs"] if r["server"] == "haraka"]
        if runs:
            per = statistics.median(r["bytes_per_connection"] for r in runs) / 1024
            goal = f"idle: KB per connection, {int(top):,} held"
            rows.append((goal, per, 4.0, False, ("haraka",)))
            if int(top) >= 10000:
                held = min(r["held"] for r in runs)
                rows.append(("idle: connections held at once", held, 10000, True, ("haraka",)))
    if "1" in outbound:
        rates = [r["rate"] for r in outbound["1"]["runs"] if not r.get("error")]
        rows.append(("outbound to 1 domain, msg/s", _median(rates), 1000, True, ()))
    if not rows:
        return []
    out = _header(["goal", "measured", "target", "met"])
    for goal, measured, target, higher, servers in rows:
        met = measured is not None and (measured >= target if higher else measured <= target)
        shown = _num(measured, 2) if measured is not None and measured < 100 else _num(measured)
        sign = "≥" if higher else "≤"
        verdict = "yes" if met else "**no**"
        if measured is None and not all(s in ran for s in servers):
            verdict = "not measured"  # (a server left out; one whose runs failed is a no)
        out.append(_row([goal, shown, f"{sign} {target:g}", verdict]))
    return out


def notes(results: dict[str, Any]) -> list[str]:
    out = []
    for scenario in results["load"].values():
        by: dict[str, int] = defaultdict(int)
        for run in scenario["runs"]:
            by[run["server"]] += run.get("listen_drops", 0)
        for server, drops in by.items():
            if drops:
                out.append(
                    f"- {scenario['title']}: {drops} SYNs were dropped while {server} ran "
                    "(TcpExt ListenOverflows: its accept queue was full); each costs the client "
                    "TCP retransmissions (1 s, then doubling), which dominate that figure."
                )
    for scenario in results["load"].values():
        for run in scenario["runs"]:
            if run.get("error"):
                out.append(f"- {scenario['title']} {run['server']}: {run['error']}")
    return out


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# haraka_tw benchmark results",
        "",
        f"- Date: {meta['date']}; mode: **{meta['mode']}**; medians of {meta['reps']} "
        f"repetition(s); whole run {meta['run_seconds'] / 60:.1f} min.",
        f"- Machine: {meta['machine']}.",
        f"- Load average before / after: {meta['load_before']} / {meta['load_after']}.",
        f"- Versions: {'; '.join(meta['versions'])}; haraka_tw commit "
        f"{meta.get('revision', 'unknown')}.",
        f"- Load generator: Postfix smtp-source {meta['postfix']} (from the Debian package, "
        "unpacked, no daemon), on the same machine; a new connection per message unless the "
        "scenario says one connection per session (`smtp-source -d`).",
        f"- haraka_tw lookup_rdns: {meta['rdns']}.",
        f"- haraka_tw config: {meta['haraka_config']}",
        f"- Peers: {meta['peers']}",
        *(
            f"- Not measured: {key}, which could not be installed ({_last_line(why)})."
            for key, why in meta.get("skipped", {}).items()
        ),
        f"- Command: `{meta['command']}`",
        "",
        "Absolute figures drift on a shared machine; compare servers by the ratios, which are "
        "taken within each repetition (the servers ran back to back) and then the median.",
        "",
        "## Summary (messages/s, median)",
        "",
        *summary_table(results),
    ]
    goal_lines = goals(results)
    if goal_lines:
        lines += ["", "## Issue 5 goals", "", *goal_lines]
    if results["load"]:
        lines += [
            "",
            "## Per scenario",
            "",
            "`÷ X`: this row's msg/s divided by X's (median of the per-repetition ratios). "
            "CPU ms/msg: the server process's user+system time (all threads; with "
            "worker processes, theirs too) from /proc/<pid>/stat over the run, per "
            "message. Peak RSS: sampled every 20 ms during the run (the process is "
            "long-lived, so it includes earlier scenarios).",
            *scenario_tables(results),
        ]
    idle_lines = idle_table(results)
    if idle_lines:
        lines += [
            "",
            "## Memory per idle greeted connection",
            "",
            "A fresh server process per measurement: N connections opened (at most 40 waiting "
            "for their banner at once), every 220 banner read, nothing sent; (RSS with them - "
            "RSS before) / N, median. haraka-maildir is skipped (same server as haraka). "
            "`÷ X`: this row's KB per connection divided by X's at the largest count "
            "(lower is better), median of the per-repetition ratios.",
            "",
            *idle_lines,
        ]
    out_lines = outbound_table(results)
    if out_lines:
        lines += [
            "",
            "## Outbound: haraka_tw's queue to smtp-sink",
            "",
            "1 KB messages queued with `OutboundService.send_email` while delivery is disabled, "
            "then delivery enabled (outbound.ini + SIGHUP) and timed until smtp-sink "
            "(`-M N`) has every message. MX from a loopback DNS server (every domain -> "
            "127.0.0.1), `mx_port` = the sink, `local_mx_ok=true`; haraka_tw's own defaults "
            "otherwise (concurrency, connection pool). No peer is measured here: stock "
            "twisted.mail's relay manager (twisted.mail.relaymanager) does not run on "
            "Python 3, and aiosmtpd and smtp-sink only receive.",
            "",
            *out_lines,
        ]
    note_lines = notes(results)
    if note_lines:
        lines += ["", "## Notes", "", *note_lines]
    if meta.get("plot"):
        lines += ["", "![msg/s per scenario and server](results.png)"]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Rewrite results.md from results.json: ``python -m bench.report [results.json]``."""
    import json
    import sys
    from pathlib import Path

    source = Path(
        sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "results.json"
    )
    results = json.loads(source.read_text())
    (source.parent / "results.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
