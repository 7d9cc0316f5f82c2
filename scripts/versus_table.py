"""Paired verdicts of one reference run against every other run that scored the same (index, class) pairs.

    python scripts/versus_table.py outputs/caap_vs_baselines_128 [more sweep folders] --reference caap

Reads each run's `per_image.csv` and `metrics.json` (`higher_is_better`), compares reference - other pair by
pair with `caap.stats.paired_difference` (paired image-bootstrap CI, Wilcoxon on per-image differences), Holm
across the whole table, and prints a Markdown table: difference [95% CI] and the verdict of the reference
(better / tied / worse in each metric's direction). Runs are named by their `method=` override.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np

from caap.stats import holm, paired_difference, verdict


def read_runs(folders: list[Path]) -> dict[str, tuple[dict[str, np.ndarray], dict[str, bool]]]:
    """`{method: (columns of per_image.csv sorted by (index, class), higher_is_better)}` of finished runs."""
    runs = {}
    for folder in folders:
        for run in sorted(p.parent for p in folder.glob("*/per_image.csv")):
            rows = sorted(
                csv.DictReader((run / "per_image.csv").open()),
                key=lambda r: (int(r["index"]), int(r["class"])),
            )
            columns = {
                k: np.array([float(r[k]) if k != "class_name" else math.nan for r in rows]) for k in rows[0]
            }
            name = run.name.split("method=")[-1].split(",")[0]
            runs[name] = (columns, json.loads((run / "metrics.json").read_text())["higher_is_better"])
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--reference", default="caap")
    args = parser.parse_args()
    runs = read_runs(args.folders)
    ref, directions = runs.pop(args.reference)
    metrics = [k for k in directions if k in ref]
    results = []
    for name, (other, _) in sorted(runs.items()):
        if not (
            np.array_equal(other["index"], ref["index"]) and np.array_equal(other["class"], ref["class"])
        ):
            print(f"{name}: other (index, class) pairs than {args.reference}, left out")
            continue
        for k in metrics:
            results.append((name, k, paired_difference(ref[k], other[k], ref["index"])))
    adjusted = holm(np.array([r.p_value for *_, r in results]))
    cells: dict[str, dict[str, str]] = {}
    for (name, k, r), p in zip(results, adjusted, strict=True):
        v = verdict(r, float(p), directions[k])
        cells.setdefault(name, {})[k] = f"{r.difference:+.3f} [{r.low:+.3f}, {r.high:+.3f}] {v}"
    arrows = {k: "↑" if directions[k] else "↓" for k in metrics}
    print(f"| {args.reference} − method | " + " | ".join(f"{k} ({arrows[k]})" for k in metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for name, row in cells.items():
        print(f"| {name} | " + " | ".join(row[k] for k in metrics) + " |")


if __name__ == "__main__":
    main()
