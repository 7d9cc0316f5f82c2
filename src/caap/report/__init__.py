"""Reports over run folders: `python -m caap.report DIR` turns a run or a multirun into tables and one page.

`load_runs(dir)` reads the run folders (`caap.report.runs`), `caap.report.table` writes the method x metric
table (Markdown, CSV) with the best value per metric marked, `caap.report.figures` draws the layer-range
heatmaps, the deletion / insertion curves and the map gallery (matplotlib, PNG), `caap.report.page` puts them
in one self-contained HTML page and `caap.report.wandb_summary` logs the table and heatmaps to a W&B run.
"""

from caap.report.build import build_report
from caap.report.runs import RunRecord, latest_run_dir, load_runs

__all__ = ["RunRecord", "build_report", "latest_run_dir", "load_runs"]
