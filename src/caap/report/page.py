"""One self-contained HTML page for a report: the table and every figure inlined (base64 PNG, no files).

Text is at least 10 pt (14 px); the content column is wider than `caap.report.render.PAGE_WIDTH_PX`, so every
figure shows at one CSS pixel per PNG pixel (its `width` / `height`; `max-width: 100%` shrinks it only in a
narrower window). Each `<img>` says, in `data-min-font-px` and `data-min-tile-px`, the smallest text and map
tile in its PNG, so that a browser can check the rendered sizes.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence

from caap.report.comparison import ReportStatistics
from caap.report.render import RenderedFigure
from caap.report.runs import RunRecord
from caap.report.table import LEGEND, comparison_rows, higher_is_better, metric_names
from caap.stats import format_value

STYLE = """
body { font-family: system-ui, sans-serif; font-size: 15px; margin: 2em auto; padding: 0 1em; max-width: 1240px;
       color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
td.best { font-weight: bold; background: #d8f0d8; }
td.tied { font-style: italic; background: #f4f0d0; }
.ci { color: #555; font-size: 14px; }
.warning { color: #a04000; }
figure { margin: 0.5em 0 1.5em; }
img { max-width: 100%; height: auto; display: block; }
.note { color: #555; font-size: 14px; }
"""


def data_uri(png: bytes) -> str:
    """A `data:image/png;base64,...` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_html(figure: RenderedFigure) -> str:
    """The `<img>` of a figure at its PNG size, with its smallest text and tile (PNG pixels) as data."""
    tile = "" if figure.min_tile_px is None else f' data-min-tile-px="{figure.min_tile_px:.1f}"'
    return (
        f'<img alt="{html.escape(figure.caption)}" width="{figure.width_px}" height="{figure.height_px}" '
        f'data-min-font-px="{figure.min_font_px:.2f}"{tile} src="{data_uri(figure.png)}">'
    )


def table_html(records: Sequence[RunRecord], stats: ReportStatistics, digits: int = 4) -> str:
    """The runs x metrics table: each value with its CI, the significantly best in a `best` cell (bold, green),
    tied leaders in a `tied` cell (italic, yellow, 'tied'); a `pairs` column when the runs scored different
    pairs."""
    names = metric_names(records)
    higher = higher_is_better(records)
    grouped = len(stats.groups) > 1 or bool(stats.unpaired)
    head = "".join(f"<th>{html.escape(n)} {'↑' if higher.get(n, True) else '↓'}</th>" for n in names)
    rows = []
    for i, r in enumerate(records):
        cells = []
        for n in names:
            value, _, interval = format_value(r.metrics.get(n, math.nan), r.ci.get(n), digits).partition(" ")
            mark = stats.mark(n, i)
            text = value + (f' <span class="ci">{interval}</span>' if interval else "")
            text += " (tied)" if mark == "tied" else ""
            cells.append(f'<td class="{mark}">{text}</td>' if mark else f"<td>{text}</td>")
        span = f"{r.layer_range[0]}:{r.layer_range[1]}" if r.layer_range else ""
        group = f"<td>{stats.group_of(i) or '-'}</td>" if grouped else ""
        rows.append(
            f"<tr><td>{html.escape(r.label)}</td><td>{html.escape(r.method)}</td><td>{span}</td>{group}"
            + "".join(cells)
            + f"<td>{r.facts.get('num_maps', '')}</td></tr>"
        )
    group_head = "<th>pairs</th>" if grouped else ""
    return (
        f"<table><thead><tr><th>run</th><th>method</th><th>layers</th>{group_head}{head}<th>maps</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def ranks_html(records: Sequence[RunRecord], stats: ReportStatistics) -> str:
    """The mean-rank summary table (best first per group), or ''."""
    if not stats.ranks:
        return ""
    rows = "".join(
        f"<tr><td>{stats.group_of(r.run)}</td><td>{html.escape(records[r.run].label)}</td><td>{r.mean:.2f}</td>"
        f"<td>[{r.low:.2f}, {r.high:.2f}]</td><td>{len(r.metrics)}</td></tr>"
        for r in sorted(stats.ranks, key=lambda r: (r.group, r.mean))
    )
    return (
        "<h2>Mean rank over the metrics</h2><p class='note'>1 = best; 95% CI with images resampled jointly for "
        "every run and metric.</p><table><thead><tr><th>pairs</th><th>run</th><th>mean rank</th><th>95% CI</th>"
        f"<th>metrics</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def comparisons_html(records: Sequence[RunRecord], stats: ReportStatistics) -> str:
    """The paired-comparison table, or ''."""
    if not stats.comparisons:
        return ""
    rows = []
    for metric, group, leader, other, diff, low, high, p, p_holm, said, *_ in comparison_rows(records, stats)[
        1
    ]:
        rows.append(
            f"<tr><td>{html.escape(metric)}</td><td>{group}</td><td>{html.escape(leader)}</td>"
            f"<td>{html.escape(other)}</td><td>{diff:+.4f}</td><td>[{low:+.4f}, {high:+.4f}]</td>"
            f"<td>{p:.3g}</td><td>{p_holm:.3g}</td><td>{'leader better' if said == 'better' else said}</td></tr>"
        )
    return (
        "<h2>Paired comparisons</h2><p class='note'>The leader of each metric against every other run that scored "
        "the same pairs: mean difference (leader − other) with its paired bootstrap CI, Wilcoxon signed-rank "
        "p-value on per-image differences, Holm-adjusted across the table.</p><table><thead><tr><th>metric</th>"
        "<th>pairs</th><th>leader</th><th>vs</th><th>difference</th><th>95% CI</th><th>Wilcoxon p</th>"
        f"<th>Holm p</th><th>verdict</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def render_page(
    title: str,
    source: str,
    records: Sequence[RunRecord],
    figures: dict[str, list[RenderedFigure]],
    stats: ReportStatistics,
) -> str:
    """The HTML page: title, the table, notes, mean ranks and paired comparisons, then one section per figure
    group (`{section: [figure]}`)."""
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{len(records)} runs from {html.escape(source)}; '
        + html.escape(LEGEND.replace("**bold**", "bold")).replace("(tied)", "<i>(tied)</i>")
        + ".</p>",
        "<h2>Metrics</h2>",
        table_html(records, stats),
        *(f'<p class="note warning">{html.escape(note)}</p>' for note in stats.notes),
        ranks_html(records, stats),
        comparisons_html(records, stats),
    ]
    for section, items in figures.items():
        if not items:
            continue
        parts.append(f"<h2>{html.escape(section)}</h2>")
        for item in items:
            parts.append(f"<figure>{image_html(item)}")
            parts.append(f"<figcaption class='note'>{html.escape(item.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
