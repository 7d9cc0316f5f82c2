"""Log a report to a W&B summary run: the method x metric table and the figures (heatmaps, curves).

The run is offline unless `WANDB_MODE` says otherwise (upload later: `make wandb-sync`), lives in
`<report dir>/wandb/`, has `job_type="report"`, and joins the W&B group of the runs it summarises when they
share one (`logger.wandb.group`), else a group named after the sweep folder.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

from caap.report.comparison import ReportStatistics
from caap.report.runs import RunRecord
from caap.report.table import metric_names, report_statistics

TABLE_KEY = "report/table"


def summary_group(records: Sequence[RunRecord], source: Path) -> str:
    """The runs' common W&B group, or the sweep folder's name (`<date>/<time>` for Hydra's layout)."""
    groups = {((r.config.get("logger") or {}).get("wandb") or {}).get("group") for r in records}
    if len(groups) == 1 and (group := groups.pop()):
        return str(group)
    source = source.resolve()
    return f"{source.parent.name}/{source.name}" if source.parent.name[:2].isdigit() else source.name


def table_rows(
    records: Sequence[RunRecord], stats: ReportStatistics | None = None
) -> tuple[list[str], list[list]]:
    """Columns and rows of the W&B table: run, method, layers_start, layers_stop, metrics, best flags (True
    only where significantly best, see `caap.report.comparison`)."""
    stats = stats or report_statistics(records)
    names = metric_names(records)
    columns = ["run", "method", "layers_start", "layers_stop", *names, *(f"best_{n}" for n in names)]
    rows = []
    for i, r in enumerate(records):
        start, stop = r.layer_range or (None, None)
        values = [r.metrics.get(n) if math.isfinite(r.metrics.get(n, math.nan)) else None for n in names]
        rows.append([r.label, r.method, start, stop, *values, *(stats.mark(n, i) == "best" for n in names)])
    return columns, rows


def log_summary(
    records: Sequence[RunRecord],
    source: Path,
    out_dir: Path,
    figures: dict[str, list[tuple[str, bytes]]],
    stats: ReportStatistics | None = None,
    project: str | None = None,
) -> Path:
    """Log the table (`report/table`) and figures (`report/<section>/<i>`) to a new W&B run, with the
    significantly best run of each metric in the summary (`best/<metric>`, `best/<metric>_value`; none where
    the leaders are tied); returns its folder (`out_dir/wandb/<offline-run-...>`)."""
    stats = stats or report_statistics(records)
    import wandb
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project or os.environ.get("WANDB_PROJECT", "caap"),
        entity=os.environ.get("WANDB_ENTITY"),
        group=summary_group(records, source),
        job_type="report",
        name=f"report {source.resolve().name}",
        dir=str(out_dir),
        mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
        config={"source": str(source), "num_runs": len(records)},
        reinit="create_new",
    )
    try:
        columns, rows = table_rows(records, stats)
        payload: dict[str, object] = {TABLE_KEY: wandb.Table(columns=list(columns), data=rows)}
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
        return Path(run.dir).parent
    finally:
        run.finish()
