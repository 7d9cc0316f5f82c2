"""`build_report(dir)`: read the runs, compare them (`caap.report.comparison`), write report.md, report.csv,
comparisons.csv and report.html, log to W&B."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from caap.report import figures as fig
from caap.report.comparison import ReportStatistics
from caap.report.gallery import gallery_figures
from caap.report.page import render_page
from caap.report.render import RenderedFigure, render
from caap.report.runs import RunRecord, load_runs
from caap.report.table import (
    LEGEND,
    comparisons_csv,
    higher_is_better,
    metric_names,
    report_statistics,
    to_csv,
    to_markdown,
)

log = logging.getLogger(__name__)


def make_figures(
    records: list[RunRecord],
    rank_by: str | None = None,
    gallery_maps: int = 6,
    stats: ReportStatistics | None = None,
) -> dict[str, list[RenderedFigure]]:
    """`{section: [figure]}`: each value with its CI, layer-range heatmaps (CAAP runs over at least two ranges,
    one figure per otherwise-equal variant; the marks of `stats` boxed), mean curves with their bands, and
    the map gallery of each method's best run by `rank_by` (default: the first metric)."""
    higher = higher_is_better(records)
    stats = stats or report_statistics(records)
    sections: dict[str, list[RenderedFigure]] = {
        "Metric values": [],
        "Layer ranges": [],
        "Curves": [],
        "Maps": [],
    }
    intervals = fig.interval_figure(records, higher, stats.marks)
    if intervals is not None:
        caption = (
            "each metric's value with its 95% bootstrap CI (images resampled), best first; green: significantly "
            "best, orange: tied leaders"
        )
        sections["Metric values"].append(render(intervals, caption))
    variants: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.layer_range is not None and r.depth is not None:
            variants[r.variant].append(r)
    marks = {m: {records[i].path: mark for i, mark in by_run.items()} for m, by_run in stats.marks.items()}
    for variant, runs in variants.items():
        if len({r.layer_range for r in runs}) >= 2:
            caption = (
                f"{variant}: metric by CAAP layer range (start x stop, positions 0..{runs[0].depth}); cells give "
                "the value and ± the larger half of its 95% CI where they fit; significantly best boxed "
                "(solid), tied leaders dashed; hatched: undefined (NaN), or a metric equal in every cell or spread "
                "over less than 1% of its CI width (no colour scale)"
            )
            sections["Layer ranges"].append(render(fig.layer_heatmaps(runs, higher, variant, marks), caption))
    curves = fig.curve_figure(records, higher)
    if curves is not None:
        caption = (
            "mean curves with their 95% pointwise bootstrap bands, of each method's best run or of the best "
            "runs of a one-method sweep (legend: the area with its CI)"
        )
        sections["Curves"].append(render(curves, caption))
    metric = rank_by or metric_names(records)[0]
    if metric not in higher:
        raise ValueError(f"rank_by={metric!r} is not a metric of these runs; available: {sorted(higher)}")
    chosen = fig.representatives(records, metric, higher[metric])
    class_names = (chosen[0].config.get("model") or {}).get("class_names") if chosen else None
    for gallery, tiles in gallery_figures(chosen, class_names, gallery_maps):
        caption = (
            f"maps over the images (red +, blue -, opacity = |value| / max |value| of the map; ground truth "
            f"outlined in green; hatched: an undefined or constant map): each method's best run by {metric}, "
            "or the best runs of a one-method sweep"
        )
        sections["Maps"].append(render(gallery, caption, tiles))
    return sections


def build_report(
    source: str | Path | list[str | Path],
    out_dir: str | Path | None = None,
    rank_by: str | None = None,
    wandb: bool = True,
    gallery_maps: int = 6,
) -> dict[str, Path]:
    """Write `report.md`, `report.csv` and `report.html` for the run or multirun folder `source` (or several,
    reported together) into `out_dir` (default `<first source>/report`), and log the table and figures to a
    W&B summary run (`wandb`). Returns the written paths (`md`, `csv`, `comparisons`, `html`, and `wandb`
    when logged)."""
    sources = [Path(s) for s in (source if isinstance(source, list) else [source])]
    source = sources[0]
    out = Path(out_dir) if out_dir is not None else source / "report"
    records = load_runs(*sources)
    out.mkdir(parents=True, exist_ok=True)
    stats = report_statistics(records)
    figures = make_figures(records, rank_by, gallery_maps, stats)
    title = "caap report: " + " + ".join(s.resolve().name for s in sources)
    where = ", ".join(str(s) for s in sources)
    paths = {
        "md": out / "report.md",
        "csv": out / "report.csv",
        "comparisons": out / "comparisons.csv",
        "html": out / "report.html",
    }
    paths["md"].write_text(
        f"# {title}\n\n{len(records)} runs from `{where}`; {LEGEND}.\n\n" + to_markdown(records, stats)
    )
    paths["csv"].write_text(to_csv(records, stats))
    paths["comparisons"].write_text(comparisons_csv(records, stats))
    paths["html"].write_text(render_page(title, where, records, figures, stats))
    if wandb:
        from caap.report.wandb_summary import log_summary

        paths["wandb"] = log_summary(records, source, out, figures, stats)
    return paths
