#!/usr/bin/env python3
"""Summarises scripts/fleet-bench output: medians over the rounds of each size.

    scripts/fleet-report.py fleet.jsonl                      # a Markdown table
    scripts/fleet-report.py fleet.jsonl --plot docs/fleet-scale.png

The plot (needs matplotlib) shows the orchestrator's CPU and resident memory
against the number of agents, medians with the range of the rounds as bars,
beside the reference: a minimal tonic server that only records last-seen time
(46.6% of a core and 26.7 KiB per connection at 50,000 agents on their own
connections, scaled linearly to other sizes), and 1.5 times it, the goal.
"""

import argparse
import json
import statistics
import sys
from collections import defaultdict

REFERENCE_CPU_AT_50K = 0.466  # share of one core
REFERENCE_KIB_PER_CONNECTION = 26.7


def load(path):
    runs = defaultdict(list)
    with open(path) as lines:
        for line in lines:
            line = line.strip()
            if line.startswith("{"):
                run = json.loads(line)
                if "error" in run:
                    print(f"skipped: {line}", file=sys.stderr)
                    continue
                runs[(run["agents"], run["streams_per_connection"])].append(run)
    return dict(sorted(runs.items()))


def dig(run, *path):
    for key in path:
        if not isinstance(run, dict) or run.get(key) is None:
            return None
        run = run[key]
    return run


def spread(runs, *path):
    values = [v for v in (dig(run, *path) for run in runs) if v is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values), len(values)


def fmt(stat, scale=1.0, digits=1, unit=""):
    if stat is None:
        return "n/a"
    median, low, high, n = stat
    if n > 1 and f"{low * scale:.{digits}f}" != f"{high * scale:.{digits}f}":
        return f"{median * scale:.{digits}f}{unit} ({low * scale:.{digits}f}-{high * scale:.{digits}f})"
    return f"{median * scale:.{digits}f}{unit}"


def table(runs):
    rows = [
        "| agents | connections | orchestrator CPU, % of a core | reference | RSS | RSS per agent | reference"
        " | heartbeat handling p99 | false failures | crash detection p50 / p99 | hang detection p50 / p99"
        " | all back after restart | runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (agents, per), group in runs.items():
        connections = "own" if per == 1 else f"{per} per connection"
        false_failures = sum(run["false_failures"] for run in group)
        cpu = spread(group, "orchestrator_cpu_share_of_one_core")
        reference_cpu = REFERENCE_CPU_AT_50K * agents / 50_000
        kib = spread(group, "orchestrator_rss_bytes_per_agent")
        p99 = spread(group, "heartbeat_handling", "p99_s_at_most")
        rows.append(
            f"| {agents:,} | {connections} "
            f"| {fmt(cpu, 100)} | {reference_cpu * 100:.1f} ({cpu[0] / reference_cpu:.2f}x) "
            f"| {fmt(spread(group, 'orchestrator_rss_bytes'), 1 / 2**20, 0, ' MiB')} "
            f"| {fmt(kib, 1 / 1024, 1, ' KiB')} "
            f"| {REFERENCE_KIB_PER_CONNECTION} KiB ({kib[0] / 1024 / REFERENCE_KIB_PER_CONNECTION:.2f}x) "
            f"| ≤ {fmt(p99, 1000, 2, ' ms')} "
            f"| {false_failures} "
            f"| {fmt(spread(group, 'crash_detection', 'p50_s'), 1, 2)} / "
            f"{fmt(spread(group, 'crash_detection', 'p99_s'), 1, 2)} s "
            f"| {fmt(spread(group, 'hang_detection', 'p50_s'), 1, 2)} / "
            f"{fmt(spread(group, 'hang_detection', 'p99_s'), 1, 2)} s "
            f"| {fmt(spread(group, 'reconnect', 'all_back_s'), 1, 1, ' s')} "
            f"| {len(group)} |"
        )
    return "\n".join(rows)


def plot(runs, output):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (cpu_axes, rss_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for per, marker, label in ((1, "o", "own connection each"), (10, "s", "10 per connection")):
        group = [(agents, g) for (agents, p), g in runs.items() if p == per]
        if not group:
            continue
        xs = [agents for agents, _ in group]
        for axes, path, scale in (
            (cpu_axes, ("orchestrator_cpu_share_of_one_core",), 100),
            (rss_axes, ("orchestrator_rss_bytes",), 1 / 2**20),
        ):
            stats = [spread(g, *path) for _, g in group]
            medians = [s[0] * scale for s in stats]
            errors = [
                [(s[0] - s[1]) * scale for s in stats],
                [(s[2] - s[0]) * scale for s in stats],
            ]
            axes.errorbar(xs, medians, yerr=errors, marker=marker, capsize=3, label=f"SecBeat, {label}")
    cpu_axes.plot([50_000], [REFERENCE_CPU_AT_50K * 100], "k*", markersize=12, label="reference, measured (minimal server)")
    cpu_axes.plot([0, 50_000], [0, REFERENCE_CPU_AT_50K * 100], "k:", label="reference, scaled linearly")
    cpu_axes.plot([0, 50_000], [0, REFERENCE_CPU_AT_50K * 150], color="grey", linestyle="--", label="goal: 1.5 × reference")
    reference_mib = [REFERENCE_KIB_PER_CONNECTION * n / 1024 for n in (0, 50_000)]
    rss_axes.plot([0, 50_000], reference_mib, "k:", label="reference: 26.7 KiB per connection")
    rss_axes.plot([0, 50_000], [1.5 * m for m in reference_mib], color="grey", linestyle="--", label="goal: 1.5 × reference")
    cpu_axes.set(xlabel="agents (1 heartbeat + 1 CPU sample per second each)", ylabel="orchestrator CPU, % of one core",
                 title="CPU (steady state)")
    rss_axes.set(xlabel="agents", ylabel="orchestrator RSS, MiB", title="Resident memory")
    for axes in (cpu_axes, rss_axes):
        axes.set_xlim(left=0)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="scripts/fleet-bench output (JSON lines)")
    parser.add_argument("--plot", metavar="PNG", help="also draw CPU and memory against agents")
    args = parser.parse_args()
    runs = load(args.input)
    if not runs:
        sys.exit(f"{args.input}: no runs")
    print(table(runs))
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
