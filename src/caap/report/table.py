"""The method x metric table of a report: rows = runs, columns = metrics, the best value per column marked."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

from caap.report.runs import RunRecord


def metric_names(records: Sequence[RunRecord]) -> list[str]:
    """Every metric of the runs, in first-seen order."""
    return list(dict.fromkeys(m for r in records for m in r.metrics))


def higher_is_better(records: Sequence[RunRecord]) -> dict[str, bool]:
    """`{metric: higher is better}`, as the runs' metrics.json say (runs disagreeing is an error)."""
    out: dict[str, bool] = {}
    for record in records:
        for name, higher in record.higher_is_better.items():
            if out.setdefault(name, higher) != higher:
                raise ValueError(f"runs disagree on whether higher {name} is better ({record.path})")
    return out


def best_runs(records: Sequence[RunRecord]) -> dict[str, list[int]]:
    """`{metric: [row indices of the best value]}` (ties all marked; NaN never best; higher_is_better kept)."""
    higher = higher_is_better(records)
    best: dict[str, list[int]] = {}
    for name in metric_names(records):
        values = [r.metrics.get(name, math.nan) for r in records]
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            best[name] = []
            continue
        target = max(finite) if higher.get(name, True) else min(finite)
        best[name] = [i for i, v in enumerate(values) if v == target]
    return best


def _range(record: RunRecord) -> str:
    return f"{record.layer_range[0]}:{record.layer_range[1]}" if record.layer_range else ""


def to_markdown(records: Sequence[RunRecord], digits: int = 4) -> str:
    """A Markdown table: run, method, layer range, one column per metric (arrow = better direction, best in bold)."""
    names = metric_names(records)
    higher = higher_is_better(records)
    best = best_runs(records)
    head = [
        "run",
        "method",
        "layers",
        *(f"{n} ({'↑' if higher.get(n, True) else '↓'})" for n in names),
        "maps",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * len(names) + "---:|"]
    for i, record in enumerate(records):
        cells = []
        for name in names:
            value = record.metrics.get(name, math.nan)
            text = f"{value:.{digits}f}" if math.isfinite(value) else "nan"
            cells.append(f"**{text}**" if i in best[name] else text)
        label = record.label.replace("|", "\\|")
        maps = record.facts.get("num_maps", "")
        lines.append(
            f"| {label} | {record.method} | {_range(record)} | " + " | ".join(cells) + f" | {maps} |"
        )
    return "\n".join(lines) + "\n"


def to_csv(records: Sequence[RunRecord]) -> str:
    """CSV: run, method, layers_start, layers_stop, every metric, `best_<metric>` flags (1/0), maps, seconds, path."""
    names = metric_names(records)
    best = best_runs(records)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "run",
            "method",
            "layers_start",
            "layers_stop",
            *names,
            *(f"best_{n}" for n in names),
            "num_maps",
            "seconds",
            "path",
        ]
    )
    for i, r in enumerate(records):
        start, stop = r.layer_range or ("", "")
        writer.writerow(
            [r.label, r.method, start, stop, *(r.metrics.get(n, math.nan) for n in names)]
            + [int(i in best[n]) for n in names]
            + [r.facts.get("num_maps", ""), r.facts.get("seconds", ""), str(r.path)]
        )
    return out.getvalue()
