"""What a bench run does: the scenarios, their sizes in --quick and --full mode, the servers.

Load scenarios (smtp-source; a new connection per message unless noted):

- (a)  1 session, 1 KB messages
- (b)  20 sessions, 1 KB
- (c)  100 sessions, 1 KB
- (d)  20 sessions, 1 MB
- (b1) as (b), but every session sends all its messages over one connection (-d)

then memory per idle greeted connection (1,000 and 10,000 held at once), then delivery
from haraka_tw's outbound queue to smtp-sink (1 destination domain and 100).

The default, --full, uses the issue's counts (2,000 / 20,000 / 20,000 / 2,000 / 20,000
messages; 5,000 outbound), twice: on a 2-core machine the load runs alone take about 5
minutes a repetition (aiosmtpd's 2,000 MB messages one of them), so a third repetition
would take the run past 15 minutes (19.8 measured). --quick divides the counts by 4 to 10
and runs them three times, in about 6 minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = [
    "DEFAULT_SERVERS",
    "FULL_REPS",
    "QUICK_REPS",
    "SERVERS",
    "LoadScenario",
    "Plan",
    "make_plan",
]

KB = 1024
MB = 1024 * 1024

# Every server --servers may name, in the order of the columns in the results; haraka_tw
# first. All run by default: issue 5's goals for nodes=2 compare it with every peer.
SERVERS = ("haraka", "haraka-nodes2", "haraka-maildir", "twisted", "aiosmtpd", "smtp-sink")
DEFAULT_SERVERS = SERVERS
LOAD_KEYS = ("a", "b", "c", "d", "b1")
PHASES = (*LOAD_KEYS, "idle", "outbound")


@dataclass(frozen=True)
class LoadScenario:
    key: str
    sessions: int
    messages: int
    size: int
    reuse: bool = False

    @property
    def title(self) -> str:
        size = f"{self.size // MB} MB" if self.size >= MB else f"{self.size // KB} KB"
        reuse = ", one connection per session" if self.reuse else ""
        return f"({self.key}) {self.sessions} x {self.messages:,} x {size}{reuse}"


FULL = {
    "a": LoadScenario("a", 1, 2000, KB),
    "b": LoadScenario("b", 20, 20000, KB),
    "c": LoadScenario("c", 100, 20000, KB),
    "d": LoadScenario("d", 20, 2000, MB),
    "b1": LoadScenario("b1", 20, 20000, KB, reuse=True),
}
# 5,000 messages make (b), (c) and (b1) last several seconds: with 2,000 a run took about
# 2 s and the ratios between servers moved by 0.15 from one run to the next.
QUICK_MESSAGES = {"a": 500, "b": 5000, "c": 5000, "d": 200, "b1": 5000}
# 4,000 outbound messages take a few seconds to deliver: with 1,000 (under a second, the
# SIGHUP's config reload included) one run's rate moved by a third from the next's.
FULL_OUTBOUND, QUICK_OUTBOUND = 5000, 4000
FULL_REPS, QUICK_REPS = 2, 3


@dataclass
class Plan:
    mode: str
    reps: int
    servers: list[str]
    load: list[LoadScenario]
    idle_counts: list[int] = field(default_factory=lambda: [1000, 10000])
    outbound_messages: int = QUICK_OUTBOUND
    outbound_domains: list[int] = field(default_factory=lambda: [1, 100])
    outbound_size: int = KB
    haraka_backlog: int | None = None

    def load_timeout(self, scenario: LoadScenario) -> float:
        """Seconds one smtp-source run may take before it counts as failed."""
        return 120.0 + scenario.messages * scenario.size / MB * 0.5 + scenario.messages * 0.05


def make_plan(
    *,
    full: bool,
    reps: int,
    servers: list[str],
    phases: list[str],
    messages: dict[str, int],
    idle_counts: list[int] | None,
    outbound_messages: int | None,
    haraka_backlog: int | None,
) -> Plan:
    load = []
    for key in LOAD_KEYS:
        if key not in phases:
            continue
        scenario = FULL[key] if full else replace(FULL[key], messages=QUICK_MESSAGES[key])
        if key in messages:
            scenario = replace(scenario, messages=messages[key])
        load.append(scenario)
    return Plan(
        mode="full" if full else "quick",
        reps=reps,
        servers=servers,
        load=load,
        idle_counts=(idle_counts or [1000, 10000]) if "idle" in phases else [],
        outbound_messages=outbound_messages or (FULL_OUTBOUND if full else QUICK_OUTBOUND),
        outbound_domains=[1, 100] if "outbound" in phases else [],
        haraka_backlog=haraka_backlog,
    )
