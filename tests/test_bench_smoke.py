"""A small run of the benchmark suite (bench/, run in full by ``bash bench/run.sh``):
scenario (a) scaled down to 1 session x 50 messages against haraka_tw and stock
twisted.mail, through the same command, writing the same results table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

from bench import report, tools
from bench.__main__ import prepare_peers
from bench.matrix import turn_order
from bench.servers import ServerKind

REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchSmokeTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        try:
            tools.postfix()  # smtp-source, from the Debian postfix package
        except tools.ToolError as e:
            raise unittest.SkipTest(f"the postfix .deb cannot be downloaded: {e}") from e
        self.out = Path(tempfile.mkdtemp(prefix="bench-smoke-"))
        self.addCleanup(subprocess.run, ["rm", "-rf", str(self.out)], check=False)

    def test_scenario_a_gives_a_table_with_numbers(self) -> None:
        """1 x 50 messages against haraka_tw and twisted.mail: msg/s, CPU and ratios for both."""
        argv = [sys.executable, "-m", "bench", "--servers", "haraka,twisted"]
        argv += ["--scenarios", "a", "--messages", "a=50", "--reps", "1"]
        argv += ["--no-plot", "--out", str(self.out)]
        done = subprocess.run(
            argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
        )
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])

        results = json.loads((self.out / "results.json").read_text())
        runs = results["load"]["a"]["runs"]
        self.assertEqual(sorted(r["server"] for r in runs), ["haraka", "twisted"])
        for run in runs:
            self.assertEqual(run["error"], "", run)
            self.assertGreater(run["rate"], 0, run)
            self.assertGreater(run["peak_rss_kb"], 0, run)

        table = (self.out / "results.md").read_text()
        self.assertIn("### (a) 1 x 50 x 1 KB", table)
        self.assertIn("lookup_rdns", table)
        for server in ("haraka", "twisted"):
            row = re.search(rf"^\| {server} \| ([\d,]+) \| .*\| ([\d.]+)x \|", table, re.M)
            self.assertIsNotNone(row, f"no row with msg/s and a ratio for {server}:\n{table}")
            assert row is not None
            self.assertGreater(int(row.group(1).replace(",", "")), 0)
            self.assertGreater(float(row.group(2)), 0)

    def test_profile_prints_cpu_per_message_for_each_round(self) -> None:
        """bench.profile: haraka_tw under smtp-source, a line per round with msg/s and the
        server's user and system CPU per message."""
        argv = [sys.executable, "-m", "bench.profile", "--sessions", "2", "--messages", "40"]
        argv += ["--rounds", "2"]
        done = subprocess.run(
            argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
        )
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        rounds = re.findall(
            r"^round \d: ([\d,]+) msg/s, CPU ([\d.]+) ms/msg \(user ([\d.]+), system ([\d.]+)\)",
            done.stdout,
            re.M,
        )
        self.assertEqual(len(rounds), 2, done.stdout)
        for rate, cpu, user, system in rounds:
            self.assertGreater(int(rate.replace(",", "")), 0)
            self.assertGreater(float(cpu), 0)
            self.assertAlmostEqual(float(user) + float(system), float(cpu), delta=0.002)


class _Kind(ServerKind):
    def __init__(self, key: str, optional: bool, fails: bool) -> None:
        self.key, self.optional, self.fails = key, optional, fails

    def prepare(self) -> None:
        if self.fails:
            raise tools.ToolError(f"{self.key}: pip install failed")


def test_a_peer_that_cannot_be_installed_is_left_out() -> None:
    """prepare_peers: an optional peer whose install fails is left out, with why; one
    that is not optional stops the run."""
    said: list[str] = []
    kinds = [_Kind("haraka", False, False), _Kind("aiosmtpd", True, True)]
    assert prepare_peers(kinds, said.append) == {"aiosmtpd": "aiosmtpd: pip install failed"}  # type: ignore[arg-type]
    assert said == ["leaving aiosmtpd out: aiosmtpd: pip install failed"]
    try:
        prepare_peers([_Kind("twisted", False, True)], said.append)  # type: ignore[arg-type]
    except tools.ToolError:
        pass
    else:
        raise AssertionError("a peer that is not optional was left out")


def test_a_goal_whose_peer_was_not_measured_says_so() -> None:
    """A goal against a server that did not run reads "not measured", not "no" (one
    whose runs failed is a no); the results name the peer left out and why, on one line."""
    sample = {"rep": 0, "rate": 2000.0, "seconds": 1.0, "cpu_ms": 0.4, "peak_rss_kb": 9}
    runs = [{**sample, "server": "haraka"}, {**sample, "server": "twisted"}]
    results = {
        "meta": {
            "date": "d",
            "mode": "quick",
            "reps": 1,
            "run_seconds": 60.0,
            "machine": "m",
            "load_before": "0",
            "load_after": "0",
            "versions": [],
            "postfix": "p",
            "rdns": "r",
            "haraka_config": "c",
            "peers": "p",
            "command": "c",
            "servers": ["haraka", "twisted"],
            "skipped": {"aiosmtpd": "pip install failed:\nERROR: no registry"},
        },
        "load": {"b": {"title": "(b) 20 x 5 x 1 KB", "scenario": {"size": 1024}, "runs": runs}},
        "idle": {},
        "outbound": {},
    }
    text = report.markdown(results)
    assert "| (b) haraka ÷ twisted | 1.00 | ≥ 0.9 | yes |" in text, text
    assert "| (b) haraka ÷ aiosmtpd | - | ≥ 2 | not measured |" in text, text
    assert "Not measured: aiosmtpd, which could not be installed (ERROR: no registry)." in text
    runs[0]["error"] = "smtp-source exited 1"  # haraka ran, and failed: that is a no
    text = report.markdown(results)
    assert "| (b) haraka ÷ twisted | - | ≥ 0.9 | **no** |" in text, text
    assert "| (b) haraka ÷ aiosmtpd | - | ≥ 2 | not measured |" in text, text


def test_no_server_always_follows_the_same_one() -> None:
    """The rounds' orders rotate, and every other one is reversed: over the rounds each
    server follows at least two different servers, and runs early, midway and late."""
    servers = ["haraka", "nodes2", "maildir", "twisted", "aiosmtpd", "sink"]
    orders = [turn_order(servers, turn) for turn in range(6)]
    for server in servers:
        before = {order[order.index(server) - 1] for order in orders if order[0] != server}
        assert len(before) >= 2, (server, before)
        assert len({order.index(server) for order in orders}) >= 3, server
