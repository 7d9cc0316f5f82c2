"""One self-contained HTML page for a report: the table and every figure inlined (base64 PNG, no files)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence

from caap.report.runs import RunRecord
from caap.report.table import best_runs, higher_is_better, metric_names

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
td.best { font-weight: bold; background: #d8f0d8; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
.note { color: #666; font-size: 12px; }
"""


def data_uri(png: bytes) -> str:
    """A `data:image/png;base64,...` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def table_html(records: Sequence[RunRecord], digits: int = 4) -> str:
    """The method x metric table, best per column in a `best` cell (bold, green)."""
    names = metric_names(records)
    higher = higher_is_better(records)
    best = best_runs(records)
    head = "".join(f"<th>{html.escape(n)} {'↑' if higher.get(n, True) else '↓'}</th>" for n in names)
    rows = []
    for i, r in enumerate(records):
        cells = []
        for n in names:
            v = r.metrics.get(n, math.nan)
            text = f"{v:.{digits}f}" if math.isfinite(v) else "nan"
            cells.append(f'<td class="best">{text}</td>' if i in best[n] else f"<td>{text}</td>")
        span = f"{r.layer_range[0]}:{r.layer_range[1]}" if r.layer_range else ""
        rows.append(
            f"<tr><td>{html.escape(r.label)}</td><td>{html.escape(r.method)}</td><td>{span}</td>"
            + "".join(cells)
            + f"<td>{r.facts.get('num_maps', '')}</td></tr>"
        )
    return (
        f"<table><thead><tr><th>run</th><th>method</th><th>layers</th>{head}<th>maps</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def render_page(
    title: str, source: str, records: Sequence[RunRecord], figures: dict[str, list[tuple[str, bytes]]]
) -> str:
    """The HTML page: title, the table, then one section per figure group (`{section: [(caption, png)]}`)."""
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{len(records)} runs from {html.escape(source)}; best value per metric in bold '
        "(↑ higher is better, ↓ lower is better).</p>",
        "<h2>Metrics</h2>",
        table_html(records),
    ]
    for section, items in figures.items():
        if not items:
            continue
        parts.append(f"<h2>{html.escape(section)}</h2>")
        for caption, png in items:
            parts.append(f'<figure><img alt="{html.escape(caption)}" src="{data_uri(png)}">')
            parts.append(f"<figcaption class='note'>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
