"""The report's tables: runs x metrics with each value's CI and the statistical marks (best / tied), the paired
comparisons and the mean-rank summary (Markdown, CSV); the statistics come from `caap.report.comparison`."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

from caap.report.comparison import ReportStatistics, compare_runs
from caap.report.runs import RunRecord
from caap.stats import DEFAULT_SETTINGS, format_value

LEGEND = (
    "values with their 95% bootstrap CI (images resampled); **bold**: significantly best in its group (paired "
    "Wilcoxon, Holm-adjusted p < 0.05, and the paired bootstrap CI of the difference excludes 0), "
    "(tied): leaders not significantly different; ↑ / ↓: higher / lower is better"
)


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


def report_statistics(records: Sequence[RunRecord]) -> ReportStatistics:
    """The paired comparisons, marks and mean ranks of the runs (`caap.report.comparison.compare_runs`)."""
    return compare_runs(records, higher_is_better(records), metric_names(records), DEFAULT_SETTINGS)


def _range(record: RunRecord) -> str:
    return f"{record.layer_range[0]}:{record.layer_range[1]}" if record.layer_range else ""


def _cell(record: RunRecord, name: str, digits: int) -> str:
    return format_value(record.metrics.get(name, math.nan), record.ci.get(name), digits)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(records: Sequence[RunRecord], stats: ReportStatistics | None = None, digits: int = 4) -> str:
    """The runs x metrics table (arrow = better direction; best in bold, tied leaders '(tied)'; a `pairs`
    column when the runs scored different pairs), then the notes, the mean ranks and the paired comparisons."""
    stats = stats or report_statistics(records)
    names = metric_names(records)
    higher = higher_is_better(records)
    grouped = len(stats.groups) > 1 or bool(stats.unpaired)
    head = ["run", "method", "layers", *(["pairs"] if grouped else [])]
    head += [f"{n} ({'↑' if higher.get(n, True) else '↓'})" for n in names] + ["maps"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * (len(head) - len(names) - 1) + "---:|" * (len(names) + 1),
    ]
    for i, record in enumerate(records):
        cells = []
        for name in names:
            text, mark = _cell(record, name, digits), stats.mark(name, i)
            if mark == "best":
                value, _, rest = text.partition(" ")
                text = f"**{value}** {rest}".strip()
            elif mark == "tied":
                text += " (tied)"
            cells.append(text)
        group = [stats.group_of(i) or "-"] if grouped else []
        maps = record.facts.get("num_maps", "")
        lines.append(
            "| "
            + " | ".join([_md(record.label), record.method, _range(record), *group, *cells])
            + f" | {maps} |"
        )
    out = "\n".join(lines) + "\n"
    if stats.notes:
        out += "\n" + "\n".join(f"> {_md(note)}" for note in stats.notes) + "\n"
    return out + ranks_markdown(records, stats) + comparisons_markdown(records, stats)


def ranks_markdown(records: Sequence[RunRecord], stats: ReportStatistics) -> str:
    """The mean-rank summary (one row per run of a compared group, best first), or '' without one."""
    if not stats.ranks:
        return ""
    lines = [
        "\n### Mean rank over the metrics (1 = best; 95% CI, images resampled jointly)\n",
        "| pairs | run | mean rank | 95% CI | metrics |",
        "|---|---|---:|---:|---:|",
    ]
    for row in sorted(stats.ranks, key=lambda r: (r.group, r.mean)):
        lines.append(
            f"| {stats.group_of(row.run)} | {_md(records[row.run].label)} | {row.mean:.2f} | "
            f"[{row.low:.2f}, {row.high:.2f}] | {len(row.metrics)} |"
        )
    return "\n".join(lines) + "\n"


def comparison_rows(records: Sequence[RunRecord], stats: ReportStatistics) -> tuple[list[str], list[list]]:
    """Columns and rows of the paired-comparison table: metric, group, leader, other, difference (leader -
    other), its CI, Wilcoxon p, Holm p, verdict, pairs, images (for CSV, Markdown, HTML and W&B)."""
    columns = [
        "metric", "pairs", "leader", "other", "difference", "ci_low", "ci_high", "p", "p_holm", "verdict",
        "num_pairs", "num_images",
    ]  # fmt: skip
    rows = [
        [
            c.metric,
            stats.group_of(c.leader),
            records[c.leader].label,
            records[c.other].label,
            c.result.difference,
            c.result.low,
            c.result.high,
            c.result.p_value,
            c.p_holm,
            c.verdict,
            c.result.pairs,
            c.result.images,
        ]
        for c in stats.comparisons
    ]
    return columns, rows


def comparisons_markdown(records: Sequence[RunRecord], stats: ReportStatistics) -> str:
    """The paired comparisons of each metric's leader with the other runs of its group, or ''."""
    if not stats.comparisons:
        return ""
    lines = [
        "\n### Paired comparisons (leader of each metric vs every other run with the same pairs)\n",
        "| metric | pairs | leader | vs | difference | 95% CI | Wilcoxon p | Holm p | verdict |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in comparison_rows(records, stats)[1]:
        metric, group, leader, other, diff, low, high, p, p_holm, said = row[:10]
        lines.append(
            f"| {metric} | {group} | {_md(leader)} | {_md(other)} | {diff:+.4f} | [{low:+.4f}, {high:+.4f}] | "
            f"{p:.3g} | {p_holm:.3g} | {'leader better' if said == 'better' else said} |"
        )
    return "\n".join(lines) + "\n"


def to_csv(records: Sequence[RunRecord], stats: ReportStatistics | None = None) -> str:
    """CSV: run, method, layers_start, layers_stop, pairs group, every metric, `<metric>_ci_low` /
    `_ci_high`, `best_<metric>` and `tied_<metric>` flags (1/0), mean rank and its CI, maps, seconds, path."""
    stats = stats or report_statistics(records)
    names = metric_names(records)
    ranks = {row.run: row for row in stats.ranks}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["run", "method", "layers_start", "layers_stop", "pairs", *names]
        + [f"{n}_ci_{end}" for n in names for end in ("low", "high")]
        + [f"best_{n}" for n in names]
        + [f"tied_{n}" for n in names]
        + ["mean_rank", "mean_rank_ci_low", "mean_rank_ci_high", "num_maps", "seconds", "path"]
    )
    for i, r in enumerate(records):
        start, stop = r.layer_range or ("", "")
        rank = ranks.get(i)
        writer.writerow(
            [r.label, r.method, start, stop, stats.group_of(i), *(r.metrics.get(n, math.nan) for n in names)]
            + [r.ci.get(n, ("", ""))[k] for n in names for k in (0, 1)]
            + [int(stats.mark(n, i) == "best") for n in names]
            + [int(stats.mark(n, i) == "tied") for n in names]
            + ([rank.mean, rank.low, rank.high] if rank else ["", "", ""])
            + [r.facts.get("num_maps", ""), r.facts.get("seconds", ""), str(r.path)]
        )
    return out.getvalue()


def comparisons_csv(records: Sequence[RunRecord], stats: ReportStatistics) -> str:
    """The paired comparisons as CSV (`comparison_rows`)."""
    columns, rows = comparison_rows(records, stats)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()
