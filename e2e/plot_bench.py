#!/usr/bin/env python3
"""Draws the distributions behind BENCHMARKS.md from the last bench run
(e2e/.cache/bench-raw.json) into docs/bench/*.svg.

matplotlib is installed into a venv under e2e/.cache on first use; the
bench itself needs nothing beyond the standard library.

usage: e2e/plot_bench.py
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RAW = ROOT / "e2e" / ".cache" / "bench-raw.json"
OUT = ROOT / "docs" / "bench"
VENV = ROOT / "e2e" / ".cache" / "plot-venv"


def in_venv():
    """Re-runs this script under a venv that has matplotlib."""
    python = VENV / "bin" / "python3"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "matplotlib==3.9.2"], check=True)
    os.execv(python, [str(python), __file__, *sys.argv[1:]])


def cdf(ax, values, label):
    v = sorted(values)
    ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", label=f"{label} (n={len(v)})")


def main():
    try:
        import matplotlib
    except ImportError:
        in_venv()
    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    raw = json.loads(RAW.read_text())
    OUT.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update({"svg.hashsalt": "weir", "svg.fonttype": "none"})  # stable output, text kept as text
    drawn = []
    if "B5" in raw:
        series = {name: pen for name, pen in raw["B5"].items() if pen and name != "shell"}
        drawn.append(cdf_figure(plt, series, "first-packet penalty (ms): first RTT minus a control ping's, entries in place",
                                "fraction of trials", "B5: on-demand first packet, weir beside responders doing the same work",
                                "b5-first-packet-cdf.svg"))
    if "F3" in raw:
        series = {f"{kind}, alone": v for kind, v in raw["F3"].items()}
        series.update({f"{kind}, both kinds at once": v for kind, v in raw.get("F3-together", {}).items()})
        drawn.append(cdf_figure(plt, series, "Node created -> route on every agent of the kind (ms)",
                                "fraction of joins", "F3: node-join convergence at 5,000 Nodes, 10 agents",
                                "f3-join-convergence-cdf.svg"))
    if "F1" in raw:
        fig, ax = plt.subplots(figsize=(7, 4))
        nodes = [r[0] for r in raw["F1"]]
        ax.plot(nodes, [r[1] for r in raw["F1"]], "o-", label="weir-agent")
        ax.plot(nodes, [r[2] for r in raw["F1"]], "s-", label="flanneld")
        ax.set_xlabel("Nodes in the cluster")
        ax.set_ylabel("RSS (MB)")
        ax.set_title("F1: agent memory against cluster size")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        drawn.append(save(fig, "f1-rss.svg"))
    print("\n".join(drawn) or f"nothing to draw in {RAW}")


def cdf_figure(plt, series, xlabel, ylabel, title, name):
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in series.items():
        cdf(ax, values, label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, name)


def save(fig, name):
    fig.tight_layout()
    path = OUT / name
    fig.savefig(path, metadata={"Date": None})
    return str(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
