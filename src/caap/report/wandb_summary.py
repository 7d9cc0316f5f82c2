"""Log a report to a W&B summary run: the method x metric table with CIs and marks, the paired comparisons,
the mean ranks and the figures (heatmaps, curves, gallery).

The run is offline unless `WANDB_MODE` says otherwise (upload later: `make wandb-sync`), lives in
`<report dir>/wandb/`, has `job_type="report"`, and joins the W&B group of the runs it summarises when they
share one (metrics.json's `wandb_group`, or a `logger.wandb.group` set in their config), else a group named
after the sweep folder.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

from caap.report.comparison import ReportStatistics
from caap.report.runs import RunRecord
from caap.report.table import comparison_rows, metric_names, report_statistics

TABLE_KEY = "report/table"
COMPARISONS_KEY = "report/comparisons"
RANKS_KEY = "report/mean_ranks"
REPORT_JOB_TYPE = "report"


def run_group(record: RunRecord) -> str | None:
    """The W&B group a run logged to (metrics.json's `wandb_group`, else a group set in its logger config)."""
    return record.facts.get("wandb_group") or ((record.config.get("logger") or {}).get("wandb") or {}).get(
        "group"
    )


def summary_group(records: Sequence[RunRecord], source: Path) -> str:
    """The runs' common W&B group, or the sweep folder's name (`<date>/<time>` for Hydra's layout)."""
    groups = {run_group(r) for r in records}
    if len(groups) == 1 and (group := groups.pop()):
        return str(group)
    source = source.resolve()
    return f"{source.parent.name}/{source.name}" if source.parent.name[:2].isdigit() else source.name


def table_rows(
    records: Sequence[RunRecord], stats: ReportStatistics | None = None
) -> tuple[list[str], list[list]]:
    """Columns and rows of the W&B table: run, method, layers_start, layers_stop, pairs group, metrics, their
    CIs (`<metric>_ci_low`, `_ci_high`), best flags (True only where significantly best, see
    `caap.report.comparison`) and tied flags; undefined numbers are None."""
    stats = stats or report_statistics(records)
    names = metric_names(records)
    columns = ["run", "method", "layers_start", "layers_stop", "pairs", *names]
    columns += [f"{n}_ci_{end}" for n in names for end in ("low", "high")]
    columns += [f"best_{n}" for n in names] + [f"tied_{n}" for n in names]
    rows = []
    for i, r in enumerate(records):
        start, stop = r.layer_range or (None, None)
        values = [_finite(r.metrics.get(n)) for n in names]
        intervals = [_finite(r.ci.get(n, (None, None))[k]) for n in names for k in (0, 1)]
        marks = [stats.mark(n, i) == "best" for n in names] + [stats.mark(n, i) == "tied" for n in names]
        rows.append([r.label, r.method, start, stop, stats.group_of(i), *values, *intervals, *marks])
    return columns, rows


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def rank_rows(records: Sequence[RunRecord], stats: ReportStatistics) -> tuple[list[str], list[list]]:
    """Columns and rows of the mean-rank table: pairs group, run, mean rank, its CI, number of metrics."""
    columns = ["pairs", "run", "mean_rank", "ci_low", "ci_high", "num_metrics"]
    rows = [
        [stats.group_of(r.run), records[r.run].label, r.mean, r.low, r.high, len(r.metrics)]
        for r in sorted(stats.ranks, key=lambda r: (r.group, r.mean))
    ]
    return columns, rows


def log_summary(
    records: Sequence[RunRecord],
    source: Path,
    out_dir: Path,
    figures: dict[str, list[tuple[str, bytes]]],
    stats: ReportStatistics | None = None,
    project: str | None = None,
) -> Path:
    """Log the table (`report/table`), the paired comparisons (`report/comparisons`, `comparison_rows`), the
    mean ranks (`report/mean_ranks`) and the figures (`report/<section>/<i>`) to a new W&B run
    (`job_type=report`), with the significantly best run of each metric in the summary (`best/<metric>`,
    `best/<metric>_value`; none where the leaders are tied) and the report's notes (`notes`); returns its
    folder (`out_dir/wandb/<offline-run-...>`)."""
    stats = stats or report_statistics(records)
    import wandb
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project or os.environ.get("WANDB_PROJECT", "caap"),
        entity=os.environ.get("WANDB_ENTITY"),
        group=summary_group(records, source),
        job_type=REPORT_JOB_TYPE,
        name=f"report {source.resolve().name}",
        dir=str(out_dir),
        mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
        config={"source": str(source), "num_runs": len(records)},
        reinit="create_new",
    )
    try:
        columns, rows = table_rows(records, stats)
        payload: dict[str, object] = {TABLE_KEY: wandb.Table(columns=list(columns), data=rows)}
        if stats.comparisons:
            columns, rows = comparison_rows(records, stats)
            payload[COMPARISONS_KEY] = wandb.Table(columns=list(columns), data=rows)
        if stats.ranks:
            columns, rows = rank_rows(records, stats)
            payload[RANKS_KEY] = wandb.Table(columns=list(columns), data=rows)
        for section, items in figures.items():
            slug = section.lower().replace(" ", "_").replace("/", "_")
            for i, (caption, png) in enumerate(items):
                payload[f"report/{slug}/{i}"] = wandb.Image(Image.open(io.BytesIO(png)), caption=caption)
        run.log(payload)
        for name, marks in stats.marks.items():
            for i, mark in marks.items():
                if mark == "best":
                    run.summary[f"best/{name}"] = records[i].label
                    run.summary[f"best/{name}_value"] = records[i].metrics[name]
        if stats.notes:
            run.summary["notes"] = "\n".join(stats.notes)
        return Path(run.dir).parent
    finally:
        run.finish()
