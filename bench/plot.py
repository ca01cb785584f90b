"""results.json -> results.png: msg/s per scenario per server (log scale), and memory per
idle connection. Runs with the python of bench/.tools/venv-plot (matplotlib lives there,
not in the project): ``python -m bench.plot results.json results.png`` from the repo root.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.report import medians


def plot(results: dict[str, Any], out: Path) -> None:
    servers = list(results["meta"]["servers"])
    load = results["load"]
    idle = results["idle"]
    panels = 1 + bool(idle)
    fig, axes = plt.subplots(
        1, panels, figsize=(12 if panels == 2 else 9, 5.5), width_ratios=[3, 1][:panels]
    )
    axes = axes if panels > 1 else [axes]
    ax = axes[0]
    width = 0.8 / max(len(servers), 1)
    keys = list(load)
    for i, server in enumerate(servers):
        values = [medians(load[k]["runs"], "rate").get(server, 0.0) for k in keys]
        xs = [j + (i - (len(servers) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, values, width, label=server)
        for bar, value in zip(bars, values, strict=False):
            if value:
                ax.annotate(
                    f"{value:,.0f}",
                    (bar.get_x() + bar.get_width() / 2, value),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    rotation=90,
                )
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([load[k]["title"].replace(", one", ",\none") for k in keys], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("messages/s (median, log scale)")
    meta = results["meta"]
    ax.set_title(f"haraka_tw vs peers, {meta['mode']} mode, {meta['date']}", fontsize=9)
    ax.legend(fontsize=7)
    if idle:
        top = max(idle, key=int)
        per = medians(idle[top]["runs"], "bytes_per_connection")
        names = [s for s in servers if s in per]
        axes[1].bar(names, [per[s] / 1024 for s in names], color="gray")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("KB per idle connection (log)")
        axes[1].set_title(f"{int(top):,} idle greeted connections", fontsize=9)
        axes[1].tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    results = json.loads(Path(sys.argv[1]).read_text())
    plot(results, Path(sys.argv[2]))


if __name__ == "__main__":
    main()
