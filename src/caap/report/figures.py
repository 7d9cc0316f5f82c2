"""The report's figures of values (matplotlib, `caap.report.render`'s style and sizes): layer-range heatmaps,
each value with its 95% CI (whiskers), and the mean deletion / insertion curves with their bands. The map
gallery is `caap.report.gallery`.

Every figure fits the page (`PAGE_WIDTH_PX`; panels wrap into rows) with text of at least 10 pt. Heatmap cells
carry their value (and the CI's half-width where it fits) in a font scaled to the cell, dropped where a 10 pt
label would not fit; undefined values are hatched and labelled, and a metric equal in every cell (or too
close to tell apart: `flat_range`) is drawn as such (hatched, "constant = v" / "flat") instead of spreading a
colour scale over noise.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import ScalarFormatter

from caap.report.render import DPI, MIN_FONT_PT, PAGE_WIDTH_PX, report_style
from caap.report.runs import RunRecord

#: average advance of a character of the default font, in em (digits, '.', '±': 0.55-0.84)
CHAR_EM = 0.64
LINE_EM = 1.25
MAX_CELL_FONT_PT = 12.0
HATCH = "////"
PAGE_WIDTH_IN = PAGE_WIDTH_PX / 100


def shorten(text: str, width: int) -> str:
    """`text` cut to `width` characters, an ellipsis marking the cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def wrap_label(text: str, width: int) -> str:
    """A run label on lines of about `width` characters, broken after its commas, underscores and spaces
    (a method name such as `libragrad_input_x_gradient` breaks between its words, not inside one)."""
    spaced = text.replace(",", ", ").replace("_", "_ ")
    return textwrap.fill(spaced, width, break_long_words=True).replace(", ", ",").replace("_ ", "_")


def value_of(record: RunRecord, metric: str) -> float:
    """The run's value of `metric`, NaN where absent."""
    return record.metrics.get(metric, math.nan)


def rank(records: Sequence[RunRecord], metric: str, higher: bool) -> list[RunRecord]:
    """Runs sorted best first by `metric` (NaN last)."""
    sign = -1.0 if higher else 1.0
    return sorted(records, key=lambda r: (not math.isfinite(value_of(r, metric)), sign * value_of(r, metric)))


def representatives(
    records: Sequence[RunRecord], metric: str, higher: bool, top_if_one_method: int = 6
) -> list[RunRecord]:
    """The best run of each method by `metric` (best method first); the `top_if_one_method` best runs when
    all runs share one method (a layer or neutral sweep)."""
    ranked = rank(records, metric, higher)
    if len({r.method for r in records}) == 1:
        return ranked[:top_if_one_method]
    best_per_method: dict[str, RunRecord] = {}
    for r in ranked:
        best_per_method.setdefault(r.method, r)
    return list(best_per_method.values())


def layer_grid(records: Sequence[RunRecord], metric: str, depth: int) -> np.ndarray:
    """`[L+1, L+1]` values: row = start (0..L), column = stop - 1 (stop 1..L+1), NaN where no run."""
    grid = np.full((depth + 1, depth + 1), np.nan)
    for record in records:
        if record.layer_range is not None:
            start, stop = record.layer_range
            grid[start, stop - 1] = value_of(record, metric)
    return grid


def cell_font(cell_pt: float, lines: Sequence[str]) -> float | None:
    """The font size (pt) at which `lines` fill at most 85% of a square cell of side `cell_pt` (at most 12 pt),
    or None where that is under 10 pt (the label is dropped rather than shrunk below legibility)."""
    widest = max(len(line) for line in lines)
    size = min(MAX_CELL_FONT_PT, 0.85 * cell_pt / (CHAR_EM * widest), 0.85 * cell_pt / (LINE_EM * len(lines)))
    return size if size >= MIN_FONT_PT else None


def cell_labels(
    value: float, interval: tuple[float, float] | None, cell_pt: float
) -> tuple[str, float] | None:
    """The label of a heatmap cell and its font size: value and CI half-width on two lines where they fit,
    else the value alone, else None."""
    text = f"{value:.2f}"
    choices = [[text]]
    if interval is not None and all(math.isfinite(v) for v in interval):
        half = max(value - interval[0], interval[1] - value)
        choices.insert(0, [text, f"±{half:.1g}"])
    for lines in choices:
        size = cell_font(cell_pt, lines)
        if size is not None:
            return "\n".join(lines), size
    return None


def text_colour(rgba: Sequence[float]) -> str:
    """Black on light colours, white on dark ones (relative luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def flat_range(values: np.ndarray, widths: Sequence[float] = ()) -> bool:
    """Whether the finite values are too close to tell apart by colour: all equal (or at most one), equal to
    four significant digits (what the tables print), or spread over less than 1% of the median CI width
    `widths` (the colours would show noise)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return False
    spread = float(np.ptp(finite))
    finite_widths = [w for w in widths if math.isfinite(w)]
    tolerance = max(1e-4 * float(np.abs(finite).max()), 0.01 * float(np.median(finite_widths or [0.0])))
    return spread == 0.0 or spread < tolerance


def panel_grid(
    num: int, panel_width_in: float, panel_height_in: float
) -> tuple[int, int, tuple[float, float]]:
    """`(rows, cols, figsize)` for `num` panels of the given size, as many per row as the page holds."""
    cols = max(1, min(num, int(PAGE_WIDTH_IN // panel_width_in)))
    rows = math.ceil(num / cols)
    return rows, cols, (min(PAGE_WIDTH_IN, cols * panel_width_in), rows * panel_height_in)


def heatmap_panel(
    fig: Figure,
    ax: Axes,
    records: Sequence[RunRecord],
    metric: str,
    higher: bool,
    depth: int,
    marks: dict[Path, str],
) -> Normalize | None:
    """One metric's start x stop heatmap on `ax`, without cell labels (see `layer_heatmaps`); returns the
    colour scale, None where the metric has none (constant or undefined everywhere)."""
    grid = layer_grid(records, metric, depth)
    widths = [r.ci[metric][1] - r.ci[metric][0] for r in records if metric in r.ci]
    constant = flat_range(grid, widths)
    finite = grid[np.isfinite(grid)]
    norm = None
    if finite.size and not constant:
        norm = Normalize(float(finite.min()), float(finite.max()))
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=heatmap_cmap(higher), norm=norm, origin="upper")
        bar = fig.colorbar(image, ax=ax, shrink=0.85, label=metric)
        if isinstance(bar.formatter, ScalarFormatter):
            bar.formatter.set_useOffset(False)
    else:
        ax.imshow(np.zeros_like(grid), cmap="Greys", vmin=0, vmax=1, origin="upper")
    for record in records:
        if record.layer_range is None:
            continue
        r, c = record.layer_range[0], record.layer_range[1] - 1
        if constant or not math.isfinite(value_of(record, metric)):  # no colour to give: hatched
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor="0.85", hatch=HATCH, edgecolor="0.5"))
        mark = marks.get(record.path)
        if mark:
            style = "solid" if mark == "best" else "dashed"
            ax.add_patch(
                Rectangle(
                    (c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5, linestyle=style
                )
            )
    ticks = list(range(depth + 1))
    step = 1 if depth < 12 else 2
    ax.set_xticks(ticks[::step], [str(s + 1) for s in ticks[::step]])
    ax.set_yticks(ticks[::step], [str(s) for s in ticks[::step]])
    ax.set_xlabel("layers.stop")
    ax.set_ylabel("layers.start")
    title = f"{metric} ({'higher' if higher else 'lower'} is better)"
    spread = float(np.ptp(finite)) if finite.size else 0.0
    if constant and spread == 0:
        title += f"\nconstant = {finite[0]:.4g}"
    elif constant:
        title += f"\nflat: {finite.mean():.4g} (range {spread:.1g})"
    elif finite.size == 0:
        title += "\nno defined value"
    ax.set_title(title)
    return norm


def heatmap_cmap(higher: bool) -> Colormap:
    """Brighter is better: viridis, reversed for lower-is-better metrics."""
    return plt.get_cmap("viridis" if higher else "viridis_r")


def label_cells(
    ax: Axes, records: Sequence[RunRecord], metric: str, norm: Normalize | None, cmap: Colormap
) -> None:
    """Write each run's value (and its CI's half-width) in its cell at a font scaled to the cell as drawn,
    'NaN' in undefined cells; labels that would be under 10 pt are left out."""
    box = ax.get_window_extent()
    columns = abs(ax.get_xlim()[1] - ax.get_xlim()[0])
    cell_pt = box.width / columns * 72 / ax.figure.dpi
    for record in records:
        if record.layer_range is None:
            continue
        r, c = record.layer_range[0], record.layer_range[1] - 1
        value = value_of(record, metric)
        if norm is None or not math.isfinite(value):
            label = "NaN" if not math.isfinite(value) else f"{value:.2f}"
            size = cell_font(cell_pt, [label])
            if size is not None:
                ax.text(c, r, label, ha="center", va="center", fontsize=size, color="black")
            continue
        labelled = cell_labels(value, record.ci.get(metric), cell_pt)
        if labelled is not None:
            colour = text_colour(cmap(norm(value)))
            ax.text(c, r, labelled[0], ha="center", va="center", fontsize=labelled[1], color=colour)


def layer_heatmaps(
    records: Sequence[RunRecord],
    higher: dict[str, bool],
    title: str = "",
    marks: dict[str, dict[Path, str]] | None = None,
) -> Figure:
    """One heatmap per metric of CAAP runs that differ in their layer range: start x stop -> value (brighter
    is better: the colormap is reversed for lower-is-better metrics), with a colour bar; cells labelled with
    the value and the CI's half-width where they fit at 10 pt or more (measured on the laid-out figure);
    cells of runs `marks` calls 'best' (significantly, see `caap.report.comparison`) boxed solid, 'tied'
    leaders dashed; undefined values and metrics equal in every cell hatched."""
    depth = max(r.depth for r in records if r.depth is not None)
    metrics = list(dict.fromkeys(m for r in records for m in r.metrics))
    n = depth + 1
    # two panels per row where cells of 0.42 in or more allow (0.7 in holds "0.12" over "±0.003" at 11 pt,
    # 0.42 in "0.12" at 10 pt); never wider than the page
    cell_in = min(max(0.42, min(0.7, (PAGE_WIDTH_IN / 2 - 1.9) / n)), (PAGE_WIDTH_IN - 1.9) / n)
    panel = (n * cell_in + 1.9, n * cell_in + 1.4)  # the grid, colour bar and labels
    rows, cols, size = panel_grid(len(metrics), *panel)
    with report_style():
        fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
        panels = list(zip(axes.ravel(), metrics, strict=False))
        norms = [
            heatmap_panel(fig, ax, records, m, higher.get(m, True), depth, (marks or {}).get(m, {}))
            for ax, m in panels
        ]
        for ax in axes.ravel()[len(metrics) :]:
            ax.set_visible(False)
        if title:
            fig.suptitle(textwrap.fill(title, int(size[0] * 12)))
        fig.set_dpi(DPI)
        fig.canvas.draw()  # lay out first: cell labels are sized to the cells as drawn
        fig.set_layout_engine("none")  # and keep that layout: labels stay inside their cells
        for (ax, metric), norm in zip(panels, norms, strict=True):
            label_cells(ax, records, metric, norm, heatmap_cmap(higher.get(metric, True)))
    return fig


def interval_figure(
    records: Sequence[RunRecord],
    higher: dict[str, bool],
    marks: dict[str, dict[int, str]] | None = None,
    max_runs: int = 12,
) -> Figure | None:
    """Each metric's values with their 95% CI as whiskers, one row per run (best first, at most `max_runs`),
    the significantly best in green, tied leaders in orange; None when no run has a CI."""
    metrics = [
        m for m in dict.fromkeys(m for r in records for m in r.metrics) if any(m in r.ci for r in records)
    ]
    metrics = [m for m in metrics if "/" not in m] or metrics
    if not metrics:
        return None
    shown = min(len(records), max_runs)
    rows, cols, size = panel_grid(len(metrics), PAGE_WIDTH_IN / 2, 0.32 * shown + 1.3)
    index = {id(r): i for i, r in enumerate(records)}
    colours = {"best": "tab:green", "tied": "tab:orange", "": "0.3"}
    with report_style():
        fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
        for ax, metric in zip(axes.ravel(), metrics, strict=False):
            up = higher.get(metric, True)
            ranked = rank(records, metric, up)[:shown]
            for y, record in enumerate(ranked):
                value = value_of(record, metric)
                low, high = record.ci.get(metric, (math.nan, math.nan))
                mark = (marks or {}).get(metric, {}).get(index[id(record)], "")
                if math.isfinite(low) and math.isfinite(high):
                    ax.errorbar(
                        value,
                        y,
                        xerr=[[value - low], [high - value]],
                        fmt="o",
                        color=colours[mark],
                        capsize=3,
                    )
                elif math.isfinite(value):
                    ax.plot(value, y, "o", color=colours[mark])
            ax.set_yticks(range(len(ranked)), [shorten(r.label, 34) for r in ranked])
            ax.invert_yaxis()
            ax.grid(axis="x", alpha=0.3)
            more = f" (best {shown} of {len(records)})" if len(records) > shown else ""
            ax.set_title(f"{metric} ({'higher' if up else 'lower'} is better){more}")
        for ax in axes.ravel()[len(metrics) :]:
            ax.set_visible(False)
    return fig


def curve_figure(records: Sequence[RunRecord], higher: dict[str, bool], max_lines: int = 8) -> Figure | None:
    """The mean curve of each curve metric (deletion, insertion) with its 95% pointwise band, one line per
    method's best run (at most `max_lines`, best first; the legend gives the area with its CI); None when no
    run has curves."""
    metrics = list(dict.fromkeys(m for r in records for m in r.curves))
    if not metrics:
        return None
    shown = max(
        len([r for r in representatives(records, m, higher.get(m, True), max_lines) if m in r.curves])
        for m in metrics
    )
    rows, cols, size = panel_grid(len(metrics), PAGE_WIDTH_IN / 2, 3.4 + 0.45 * min(shown, max_lines))
    with report_style():
        fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
        for ax, metric in zip(axes.ravel(), metrics, strict=False):
            up = higher.get(metric, True)
            lines = [r for r in representatives(records, metric, up, max_lines) if metric in r.curves]
            for record in lines[:max_lines]:
                x, y = record.curves[metric]
                value = value_of(record, metric)
                low, high = record.ci.get(metric, (math.nan, math.nan))
                interval = f" [{low:.3f}, {high:.3f}]" if math.isfinite(low) and math.isfinite(high) else ""
                label = f"{shorten(record.label, 40)}: {value:.3f}{interval}"
                (line,) = ax.plot(x, y, label=label, linewidth=1.5)
                if metric in record.curve_bands:
                    band_low, band_high = record.curve_bands[metric]
                    ax.fill_between(x, band_low, band_high, color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_xlabel(
                "fraction of patch tokens removed" if "del" in metric else "fraction of patch tokens"
            )
            ax.set_ylabel("target score")
            ax.set_title(f"{metric} (area: {'higher' if up else 'lower'} is better)")
            ax.grid(alpha=0.3)
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
        for ax in axes.ravel()[len(metrics) :]:
            ax.set_visible(False)
    return fig
