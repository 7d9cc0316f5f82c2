"""The report's figures are readable: text of at least 10 pt, heatmap labels that fit their cells (or none),
undefined and constant values marked instead of coloured, CI whiskers and bands on means, gallery tiles of at
least 160 px with the ground truth outlined and a colour bar."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from safetensors.torch import save_file

from caap.maps_io import write_maps
from caap.report import figures as fig
from caap.report.gallery import gallery_figures
from caap.report.render import DPI, MIN_FONT_PT, MIN_TILE_PX, PAGE_WIDTH_PX, render, visible_texts
from caap.report.runs import RunRecord


def record(path: Path, start: int, stop: int, depth: int, values: dict[str, float], **extra) -> RunRecord:
    """A CAAP run at range (start, stop) with `values` and a CI of ±0.01 around each."""
    ci = {m: (v - 0.01, v + 0.01) for m, v in values.items() if math.isfinite(v)}
    return RunRecord(
        path=path / f"{start}_{stop}",
        method="caap",
        overrides=[f"layers.start={start}", f"layers.stop={stop}"],
        config={},
        metrics=values,
        higher_is_better={m: m != "mif" for m in values},
        ci=ci,
        layer_range=(start, stop),
        depth=depth,
        label=f"caap layers.start={start},layers.stop={stop}",
        **extra,
    )


def layer_sweep(tmp_path: Path, depth: int) -> list[RunRecord]:
    rng = np.random.default_rng(0)
    return [
        record(tmp_path, s, e, depth, {"srg": float(rng.uniform(0, 0.5)), "mif": float(rng.uniform(0, 1))})
        for s in range(depth + 1)
        for e in range(s + 1, depth + 2)
    ]


def cell_texts(figure: Figure) -> list:
    """(text, axes) of the heatmap cell labels (texts placed in data coordinates)."""
    return [(t, ax) for ax in figure.axes for t in ax.texts]


@pytest.mark.parametrize("depth", [2, 6, 12])
def test_heatmap_labels_fit_their_cells_at_10pt_or_are_dropped(tmp_path: Path, depth: int) -> None:
    runs = layer_sweep(tmp_path, depth)
    figure = fig.layer_heatmaps(runs, {"srg": True, "mif": False}, "caap")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    labels = cell_texts(figure)
    assert all(t.get_fontsize() >= MIN_FONT_PT for t, _ in labels)
    for text, ax in labels:  # inside its cell: the cell's corners in pixels hold the text's box
        x, y = text.get_position()
        (x0, y0), (x1, y1) = ax.transData.transform([(x - 0.5, y + 0.5), (x + 0.5, y - 0.5)])
        box = text.get_window_extent(renderer)
        assert x0 - 0.5 <= box.x0 and box.x1 <= x1 + 0.5 and y0 - 0.5 <= box.y0 and box.y1 <= y1 + 0.5, text
    if depth <= 6:  # cells large enough: every run labelled, with its CI's half-width
        assert len(labels) == 2 * len(runs) and all("±" in t.get_text() for t, _ in labels)
    rendered = render(figure, "heatmaps")
    assert rendered.width_px <= PAGE_WIDTH_PX
    assert rendered.min_font_px >= MIN_FONT_PT * DPI / 72 - 1e-6
    assert Image.open(io.BytesIO(rendered.png)).size == (rendered.width_px, rendered.height_px)


def test_heatmap_marks_constant_and_undefined_values(tmp_path: Path) -> None:
    """A metric equal in every cell, or spread far less than its CIs, gets no colour scale (which would show
    noise as contrast) but hatched cells and 'constant' / 'flat' in its title; a run's NaN value is a hatched
    cell labelled NaN, and the other cells keep their colour scale."""
    runs = layer_sweep(tmp_path, 2)
    for k, r in enumerate(runs):
        r.metrics["flat"] = 0.25
        r.metrics["noise"] = 0.1 + 1e-6 * k  # CIs of ±0.01: differences of 1e-6 are not a colour scale
        r.ci["noise"] = (r.metrics["noise"] - 0.01, r.metrics["noise"] + 0.01)
    runs[1].metrics["srg"] = math.nan
    higher = {"srg": True, "mif": False, "flat": True, "noise": True}
    figure = fig.layer_heatmaps(runs, higher, "caap")
    panels = {ax.get_title().split(" ")[0]: ax for ax in figure.axes if ax.get_title()}
    flat, srg = panels["flat"], panels["srg"]
    assert "constant = 0.25" in flat.get_title()
    hatched = [p for p in flat.patches if isinstance(p, Rectangle) and p.get_hatch()]
    assert len(hatched) == len(runs)
    bars = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2  # srg and mif, not the constant or flat metric
    assert "flat: 0.1 (range 5e-06)" in panels["noise"].get_title()
    assert len([p for p in panels["noise"].patches if p.get_hatch()]) == len(runs)
    assert [t.get_text() for t in srg.texts].count("NaN") == 1
    assert len([p for p in srg.patches if p.get_hatch()]) == 1
    finite = [v for r in runs if math.isfinite(v := r.metrics["srg"])]
    (image,) = srg.images
    assert image.norm.vmin == pytest.approx(min(finite)) and image.norm.vmax == pytest.approx(max(finite))


def test_interval_and_curve_figures_show_the_cis(tmp_path: Path) -> None:
    runs = layer_sweep(tmp_path, 2)[:3]
    x = [0.0, 0.5, 1.0]
    for k, r in enumerate(runs):
        y = [1.0, 0.5 - 0.1 * k, 0.1]
        r.curves["mif"] = (x, y)
        r.curve_bands["mif"] = ([v - 0.05 for v in y], [v + 0.05 for v in y])
    higher = {"srg": True, "mif": False}
    intervals = fig.interval_figure(runs, higher)
    assert intervals is not None
    for ax in intervals.axes:  # one whisker per run: the CI of its value
        whiskers = [c for c in ax.collections if c.get_segments()]
        assert len(whiskers) == len(runs)
        metric = ax.get_title().split(" ")[0]
        spans = sorted(float(seg[1][0] - seg[0][0]) for c in whiskers for seg in c.get_segments())
        assert spans == pytest.approx([0.02] * len(runs))
        assert metric in higher
    curves = fig.curve_figure(runs, higher)
    assert curves is not None
    (ax,) = [a for a in curves.axes if a.get_visible()]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == len(ax.get_lines()) == len(runs)  # a band under every mean curve
    for figure in (intervals, curves):
        assert min(t.get_fontsize() for t in visible_texts(figure)) >= MIN_FONT_PT
        assert render(figure, "").width_px <= PAGE_WIDTH_PX


def gallery_run(folder: Path, maps: dict[tuple[int, int], torch.Tensor], label: str) -> RunRecord:
    """A run folder with maps, two 56 px images and their cell masks, as `caap.run` writes them."""
    folder.mkdir(parents=True)
    keys = sorted(maps)
    write_maps(
        folder / "maps" / "r0_b000000.safetensors",
        torch.tensor([k[0] for k in keys]),
        torch.tensor([k[1] for k in keys]),
        torch.stack([maps[k] for k in keys]),
    )
    images = {str(i): torch.full((3, 56, 56), 60 * (i + 1), dtype=torch.uint8) for i in (0, 1)}
    save_file(images, str(folder / "images.safetensors"))
    masks = {}
    for i, c in keys:
        mask = torch.zeros(56, 56, dtype=torch.uint8)
        mask[:28, 28 * (c % 2) : 28 * (c % 2) + 28] = 1
        masks[f"{i}_{c}"] = mask
    save_file(masks, str(folder / "masks.safetensors"))
    return RunRecord(folder, "m", [], {}, {"srg": 0.1}, {"srg": True}, label=label)


def test_gallery_tiles_outline_and_degenerate_maps(tmp_path: Path) -> None:
    keys = [(0, 1), (1, 2)]
    signed = {k: torch.randn(8, 8, generator=torch.Generator().manual_seed(k[0])) for k in keys}
    zero = {k: torch.zeros(8, 8) for k in keys}
    undefined = {keys[0]: torch.full((8, 8), math.nan), keys[1]: torch.ones(8, 8)}
    runs = [
        gallery_run(tmp_path / "a", signed, "signed"),
        gallery_run(tmp_path / "b", zero, "zero"),
        gallery_run(tmp_path / "c", undefined, "nan"),
    ]
    ((figure, tiles),) = gallery_figures(runs, None, num_maps=2)
    rendered = render(figure, "gallery", tiles)
    assert rendered.min_tile_px is not None and rendered.min_tile_px >= MIN_TILE_PX
    assert rendered.width_px <= PAGE_WIDTH_PX and rendered.min_font_px >= MIN_FONT_PT * DPI / 72 - 1e-6
    grid = np.array(tiles).reshape(2, 4)  # rows: pairs; columns: image, signed, zero, nan
    for ax in grid.ravel():  # every tile outlines its pair's ground truth
        assert any(hasattr(c, "allsegs") or "Contour" in type(c).__name__ for c in ax.collections), ax
    labels = [[t.get_text() for t in ax.texts] for ax in grid.ravel()]
    assert labels == [[], [], ["constant"], ["NaN"], [], [], ["constant"], ["constant"]]
    assert any(ax.get_label() == "<colorbar>" for ax in figure.axes)


def test_gallery_wraps_runs_to_the_page_width(tmp_path: Path) -> None:
    keys = [(0, 1)]
    runs = [gallery_run(tmp_path / str(k), {keys[0]: torch.randn(8, 8)}, f"run {k}") for k in range(9)]
    pages = gallery_figures(runs, None, num_maps=1)
    assert len(pages) >= 2
    shown = [render(f, "", t) for f, t in pages]
    assert sum(len(t) - 1 for _, t in pages) == len(runs)  # each page: the image, then its runs
    assert all(r.width_px <= PAGE_WIDTH_PX and (r.min_tile_px or 0) >= MIN_TILE_PX for r in shown)


def test_run_labels_wrap_between_words() -> None:
    """Gallery column titles broke inside words ('libragrad_fullgrad_plu' / 's'); they break after '_' and ','."""
    from caap.report.figures import wrap_label

    assert wrap_label("libragrad_fullgrad_plus", 22) == "libragrad_fullgrad_\nplus"
    assert wrap_label("layers.start=0,layers.stop=2", 22) == "layers.start=0,\nlayers.stop=2"
    assert wrap_label("caap", 22) == "caap"
    assert all(len(line) <= 22 for line in wrap_label("libragrad_input_x_gradient_and_more", 22).splitlines())
