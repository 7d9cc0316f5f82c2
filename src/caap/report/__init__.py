"""Reports over run folders: `python -m caap.report DIR` turns a run or a multirun into tables and one page.

`load_runs(dir)` reads the run folders (`caap.report.runs`), `caap.report.comparison` compares runs that scored
the same pairs (paired tests, best / tied marks, mean ranks; see `caap.stats`), `caap.report.table` writes the
method x metric table with CIs and marks, the mean ranks and the paired comparisons (Markdown, CSV),
`caap.report.figures` draws the layer-range heatmaps, the deletion / insertion curves and the map gallery
(matplotlib, PNG), `caap.report.page` puts them in one self-contained HTML page and
`caap.report.wandb_summary` logs the table and heatmaps to a W&B run.
"""

from caap.report.build import build_report
from caap.report.comparison import ReportStatistics, compare_runs
from caap.report.runs import PairValues, RunRecord, latest_run_dir, load_runs
from caap.report.table import report_statistics

__all__ = [
    "PairValues",
    "ReportStatistics",
    "RunRecord",
    "build_report",
    "compare_runs",
    "latest_run_dir",
    "load_runs",
    "report_statistics",
]
