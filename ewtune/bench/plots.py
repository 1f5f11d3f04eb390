"""The plots of BENCHMARKS.md, drawn from the JSON results that ``ewtune bench accountant`` and ``ewtune bench
utility`` wrote: ``python -m ewtune.bench.plots [RESULTS_DIR]`` writes ``accountants.png`` and ``utility.png`` there
(``scripts/benchmarks-md`` runs it). Nothing is measured here: every point is a figure of those files.

- accountants.png: each accountant's epsilon relative to the reference (dp_accounting PLD at a fine
  interval), per case, in percent on a symmetric-log axis (RDP is several times off where the PLD-based
  accountants are within a fraction of a percent); the certified bound is drawn solid.
- utility.png: held-out accuracy against the certified epsilon each setting actually spent, private rows
  as points joined per setting and policy, the non-private accuracy and the majority-class baseline as lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def accountant_figure(result: dict):
    figure, axes = _figure()
    cases = [case["name"] for case in result["cases"]]
    names = sorted({name for case in result["cases"] for name in case["accountants"]})
    for name in names:
        points = [(index, 100 * case["accountants"][name]["relative_error"]) for index, case in enumerate(result["cases"])
                  if case["accountants"].get(name, {}).get("relative_error") is not None]
        if points:
            certified = name == "certified"
            axes.plot([i for i, _ in points], [v for _, v in points], marker="o", markersize=4, label=name,
                      linewidth=2.5 if certified else 1.0, linestyle="-" if certified else "--", zorder=3 if certified else 2)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_yscale("symlog", linthresh=0.1)
    axes.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=7)
    axes.set_ylabel("epsilon relative to the reference (%)")
    axes.set_title(f"accountants against the reference ({result['reference']})", fontsize=9)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def utility_figure(result: dict):
    figure, axes = _figure()
    series: dict[str, list[tuple[float, float]]] = {}
    dashes = iter(("--", "-."))
    for row in result["rows"]:
        mode = row.get("mode", "probe")
        if row["epsilon_certified"] is None:
            axes.axhline(row["accuracy_mean"], color="black", linestyle=next(dashes, ":"), label=f"non-private ({row['setting']}, {mode})")
        else:
            series.setdefault(f"{row['setting']}, {mode}, {row['privacy']}", []).append((row["epsilon_certified"], row["accuracy_mean"]))
    for (name, points), marker in zip(series.items(), "osD^v<>p"):
        points.sort()
        axes.plot([e for e, _ in points], [a for _, a in points], marker=marker, markersize=7, label=name, alpha=0.85)
    axes.axhline(result["majority_baseline"], color="grey", linestyle=":", label="majority-class baseline")
    axes.set_xlabel(f"certified epsilon spent (delta {result['delta']:g})")
    axes.set_ylabel(f"held-out accuracy (mean of {result['seeds']} seeds)")
    axes.set_title(f"{result['model']} on {result['held_out']} held-out MR sentences", fontsize=9)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def draw(results: Path) -> list[Path]:
    written = []
    for name, draw_figure in (("accountant", accountant_figure), ("utility", utility_figure)):
        source = results / f"{name}.json"
        if source.is_file():
            target = results / ("accountants.png" if name == "accountant" else "utility.png")
            draw_figure(json.loads(source.read_text())).savefig(target, format="png")
            written.append(target)
    return written


def _figure():
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.2), dpi=100, layout="constrained")
    return figure, figure.add_subplot()


if __name__ == "__main__":
    for path in draw(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")):
        print(f"drew {path}")
