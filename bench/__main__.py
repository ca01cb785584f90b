"""The benchmark suite's command: ``bash bench/run.sh [options]`` (or, with the project venv
set up, ``.venv/bin/python -m bench [options]``).

It fetches its tools (bench/tools.py), starts every server on loopback, runs the scenario
matrix interleaved (bench/matrix.py) and writes results.json, results.md and results.png to
bench/results/ (or --out). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import matrix, report, tools
from bench.plan import DEFAULT_SERVERS, FULL_REPS, PHASES, QUICK_REPS, SERVERS, make_plan
from bench.servers import REPO_ROOT, ServerKind, make_kind, rdns_note, shipped_backlog

RESULTS = Path(__file__).resolve().parent / "results"


def _list(text: str, allowed: tuple[str, ...]) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown: {', '.join(bad)} (known: {', '.join(allowed)})")
    return items


def _counts(text: str) -> dict[str, int]:
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key.strip() not in PHASES[:5] or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected KEY=N with KEY in a,b,c,d,b1: {item!r}")
        out[key.strip()] = int(value)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="full",
        action="store_false",
        help="message counts divided by 4 to 10, 3 repetitions: about 6 minutes",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="the issue's message counts, 2 repetitions (the default): about 13-15 minutes",
    )
    p.set_defaults(full=True)
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help=f"repetitions (medians; default {FULL_REPS} with --full, {QUICK_REPS} with --quick)",
    )
    p.add_argument(
        "--servers",
        type=lambda t: _list(t, SERVERS),
        default=list(DEFAULT_SERVERS),
        help=f"comma list of {','.join(SERVERS)} (default: {','.join(DEFAULT_SERVERS)})",
    )
    p.add_argument(
        "--scenarios",
        type=lambda t: _list(t, PHASES),
        default=list(PHASES),
        help=f"comma list of phases (default: {','.join(PHASES)})",
    )
    p.add_argument(
        "--messages",
        type=_counts,
        default={},
        metavar="KEY=N,...",
        help="message count per load scenario, e.g. a=50,b=5000",
    )
    p.add_argument(
        "--idle",
        type=lambda t: [int(x) for x in t.split(",")],
        default=None,
        metavar="N,...",
        help="idle connection counts (default 1000,10000)",
    )
    p.add_argument("--outbound-messages", type=int, default=None, metavar="N")
    p.add_argument(
        "--haraka-backlog",
        type=int,
        default=None,
        metavar="N",
        help="smtp.ini listen_backlog for haraka_tw (default: as shipped)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    p.add_argument("--no-plot", action="store_true", help="skip results.png (no matplotlib)")
    p.add_argument("--keep", action="store_true", help="keep the servers' work directories")
    return p.parse_args(argv)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.node()}, {os.cpu_count()} cores ({model}), {mem:.0f} GiB RAM, "
        f"Linux {platform.release()}, {platform.python_implementation()} "
        f"{platform.python_version()}"
    )


def revision() -> str:
    """The haraka_tw commit measured, and whether its code had uncommitted changes."""
    git = ["git", "-C", str(REPO_ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "haraka_tw", "twisted", "etc"],
        capture_output=True,
        text=True,
    )
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def raise_nofile() -> None:
    """The idle phase holds 10,000 connections: client and servers need the descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def plot(source: Path, png: Path, say: matrix.Progress) -> bool:
    """results.png from results.json, with matplotlib from its own venv."""
    try:
        python = tools.plot_python()
        subprocess.run(
            [str(python), "-m", "bench.plot", str(source), str(png)], cwd=REPO_ROOT, check=True
        )
    except (tools.ToolError, subprocess.CalledProcessError) as e:
        say(f"no plot: {e}")
        return False
    return True


def prepare_peers(kinds: list[ServerKind], say: matrix.Progress) -> dict[str, str]:
    """Install what each server needs; a peer that cannot be installed (no package
    registry, a failed pip) is left out of the run: {its key: why}. haraka_tw itself,
    twisted.mail (the project's own venv) and the Postfix tools are not optional."""
    skipped: dict[str, str] = {}
    for kind in kinds:
        try:
            kind.prepare()
        except tools.ToolError as e:
            if not kind.optional:
                raise
            say(f"leaving {kind.key} out: {e}")
            skipped[kind.key] = str(e)
    return skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = make_plan(
        full=args.full,
        reps=args.reps or (FULL_REPS if args.full else QUICK_REPS),
        servers=args.servers,
        phases=args.scenarios,
        messages=args.messages,
        idle_counts=args.idle,
        outbound_messages=args.outbound_messages,
        haraka_backlog=args.haraka_backlog,
    )
    say = matrix.Progress()
    raise_nofile()
    started = time.monotonic()
    say("fetching tools")
    postfix = tools.postfix()
    kinds = [make_kind(key, plan.haraka_backlog) for key in plan.servers]
    skipped = prepare_peers(kinds, say)
    kinds = [kind for kind in kinds if kind.key not in skipped]
    plan.servers = [key for key in plan.servers if key not in skipped]
    needs_10k = max(plan.idle_counts, default=0)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if needs_10k and nofile < needs_10k + 200:
        say(f"warning: RLIMIT_NOFILE is {nofile}: fewer than {needs_10k:,} connections fit")
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": plan.mode,
        "reps": plan.reps,
        "servers": plan.servers,
        "machine": machine(),
        "load_before": load_average(),
        "versions": sorted({k.version for k in kinds}),
        "revision": revision(),
        "postfix": postfix.version,
        "rdns": rdns_note(),
        "haraka_config": (
            "twistd -n haraka --config DIR on the shipped defaults overlaid with: "
            "plugins rcpt_to.in_host_list + queue/discard (or queue/maildir, maildir.ini "
            "fsync=true); host_list bench.test; smtp.ini max_connections=0 and listen "
            + (
                f"127.0.0.1:PORT, listen_backlog={plan.haraka_backlog}"
                if plan.haraka_backlog
                else f"127.0.0.1:PORT with the shipped listen_backlog ({shipped_backlog()})"
            )
            + "; log level info (one line per connection) to a file. haraka-nodes2: the "
            "same with smtp.ini nodes=2 (a master that logs for two worker processes); its "
            "CPU and RSS are summed over the master, the fork server and the workers (RSS "
            "counts the pages a fork shares in each)."
        ),
        "peers": (
            "stock twisted.mail: ESMTP + an IMessageDelivery that accepts and discards "
            "(listen backlog 1024, as smtp-sink's, so it is not measured on SYN retries); "
            "aiosmtpd: SMTP(handler, hostname=...) on asyncio's create_server (backlog 100); "
            "smtp-sink -m 20000 with backlog 1024."
        ),
        "skipped": skipped,
        "command": shlex.join(["bash", "bench/run.sh", *(sys.argv[1:] if argv is None else argv)]),
    }
    work = Path(tempfile.mkdtemp(prefix="haraka-bench-"))
    try:
        results = matrix.run(plan, postfix, work, say)
    finally:
        if args.keep:
            say(f"work directories kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    meta["run_seconds"] = time.monotonic() - started
    meta["load_after"] = load_average()
    results = {"meta": meta, **results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_plot:
        meta["plot"] = plot(args.out / "results.json", args.out / "results.png", say)
    (args.out / "results.md").write_text(report.markdown(results))
    say(f"results in {args.out / 'results.md'} ({meta['run_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
