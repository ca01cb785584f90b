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

from bench import tools
from bench.matrix import turn_order

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


def test_no_server_always_follows_the_same_one() -> None:
    """The rounds' orders rotate, and every other one is reversed: over the rounds each
    server follows at least two different servers, and runs early, midway and late."""
    servers = ["haraka", "nodes2", "maildir", "twisted", "aiosmtpd", "sink"]
    orders = [turn_order(servers, turn) for turn in range(6)]
    for server in servers:
        before = {order[order.index(server) - 1] for order in orders if order[0] != server}
        assert len(before) >= 2, (server, before)
        assert len({order.index(server) for order in orders}) >= 3, server
