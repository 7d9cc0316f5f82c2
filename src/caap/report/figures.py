"""The report's figures (matplotlib, Agg backend): layer-range heatmaps, mean deletion / insertion curves and
the gallery of maps over the images. Each function returns a `Figure`; `png_bytes` encodes one."""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: reports run on servers and in tests
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from safetensors.torch import load_file

from caap.maps_io import load_maps
from caap.report.runs import RunRecord


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (and closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _value(record: RunRecord, metric: str) -> float:
    return record.metrics.get(metric, math.nan)


def rank(records: Sequence[RunRecord], metric: str, higher: bool) -> list[RunRecord]:
    """Runs sorted best first by `metric` (NaN last)."""
    sign = -1.0 if higher else 1.0
    return sorted(records, key=lambda r: (not math.isfinite(_value(r, metric)), sign * _value(r, metric)))


def representatives(
    records: Sequence[RunRecord], metric: str, higher: bool, top_if_one_method: int = 6
) -> list[RunRecord]:
    """The best run of each method by `metric` (best method first); the `top_if_one_method` best runs when
    all runs share one method (a layer or neutral sweep)."""
    ranked = rank(records, metric, higher)
    methods = {r.method for r in records}
    if len(methods) == 1:
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
            grid[start, stop - 1] = _value(record, metric)
    return grid


def layer_heatmaps(
    records: Sequence[RunRecord],
    higher: dict[str, bool],
    title: str = "",
    marks: dict[str, dict[Path, str]] | None = None,
) -> Figure:
    """One heatmap per metric of CAAP runs that differ in their layer range: start x stop -> value; cells of
    runs `marks` calls 'best' (significantly, see `caap.report.comparison`) boxed solid, 'tied' leaders dashed;
    brighter is better (the colormap is reversed for lower-is-better metrics)."""
    depth = max(r.depth for r in records if r.depth is not None)
    metrics = list(dict.fromkeys(m for r in records for m in r.metrics))
    size = 0.45 * (depth + 1) + 1.6
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(1.3 * size * len(metrics), size), squeeze=False, layout="constrained"
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        up = higher.get(metric, True)
        grid = layer_grid(records, metric, depth)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis" if up else "viridis_r", origin="upper")
        fig.colorbar(image, ax=ax, shrink=0.8)
        for record in records:
            mark = (marks or {}).get(metric, {}).get(record.path)
            if mark and record.layer_range is not None:
                r, c = record.layer_range[0], record.layer_range[1] - 1
                style = "solid" if mark == "best" else "dashed"
                box = plt.Rectangle(
                    (c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2, linestyle=style
                )
                ax.add_patch(box)
        if depth <= 12:
            for (r, c), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(depth + 1), [str(s) for s in range(1, depth + 2)], fontsize=7)
        ax.set_yticks(range(depth + 1), [str(s) for s in range(depth + 1)], fontsize=7)
        ax.set_xlabel("layers.stop")
        ax.set_ylabel("layers.start")
        ax.set_title(f"{metric} ({'higher' if up else 'lower'} is better)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9, y=1.04)
    return fig


def curve_figure(records: Sequence[RunRecord], higher: dict[str, bool], max_lines: int = 12) -> Figure | None:
    """The mean curve of each curve metric (deletion, insertion), one line per method's best run (at most
    `max_lines`, best first); None when no run has curves."""
    metrics = list(dict.fromkeys(m for r in records for m in r.curves))
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        up = higher.get(metric, True)
        lines = [r for r in representatives(records, metric, up, max_lines) if metric in r.curves]
        for record in lines[:max_lines]:
            x, y = record.curves[metric]
            ax.plot(x, y, label=f"{record.label} ({_value(record, metric):.3f})", linewidth=1.2)
        ax.set_xlabel("fraction of patch tokens removed" if "del" in metric else "fraction of patch tokens")
        ax.set_ylabel("target score")
        ax.set_title(f"{metric} (AUC {'higher' if up else 'lower'} is better)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    return fig


def _images(records: Sequence[RunRecord]) -> dict[int, np.ndarray]:
    """`{dataset index: [H, W, 3] float in [0, 1]}` from the runs' images.safetensors."""
    images: dict[int, np.ndarray] = {}
    for record in records:
        file = record.path / "images.safetensors"
        if file.is_file():
            for key, tensor in load_file(str(file)).items():
                images.setdefault(int(key), tensor.permute(1, 2, 0).float().numpy() / 255.0)
    return images


def overlay_rgba(amap: np.ndarray, max_alpha: float = 0.85) -> np.ndarray:
    """`[gh, gw, 4]` RGBA of a signed map `[gh, gw]`: red positive, blue negative ('bwr', symmetric around 0),
    opacity proportional to |value| so that patches with no attribution leave the image visible."""
    bound = float(np.abs(amap).max()) or 1.0
    rgba = plt.get_cmap("bwr")(amap / bound * 0.5 + 0.5)
    rgba[..., 3] = np.abs(amap) / bound * max_alpha
    return rgba


def gallery_figure(
    records: Sequence[RunRecord], class_names: Sequence[str] | None = None, num_maps: int = 6
) -> Figure | None:
    """Rows: the first `num_maps` (image, class) pairs that every run mapped and whose image was kept;
    columns: the image, then each run's map over it (signed, 'bwr', symmetric around 0 per map).
    None when the runs share no map."""
    images = _images(records)
    maps = [load_maps(r.path / "maps") for r in records]
    common = set.intersection(*(set(m) for m in maps)) if maps else set()
    keys = sorted(k for k in common if k[0] in images or not images)[:num_maps]
    if not keys:
        return None
    cols = len(records) + (1 if images else 0)
    fig, axes = plt.subplots(len(keys), cols, figsize=(1.6 * cols, 1.7 * len(keys)), squeeze=False)
    for row, (index, cls) in enumerate(keys):
        name = class_names[cls] if class_names and 0 <= cls < len(class_names) else str(cls)
        panels = axes[row]
        if images:
            panels[0].imshow(images[index])
            panels[0].set_ylabel(f"#{index}\n{name}", fontsize=7)
            panels = panels[1:]
        for ax, record, run_maps in zip(panels, records, maps, strict=True):
            amap = run_maps[(index, cls)].float().numpy()
            if images:
                h, w = images[index].shape[:2]
                ax.imshow(images[index])
                ax.imshow(overlay_rgba(amap), extent=(0, w, h, 0), interpolation="nearest")
            else:
                bound = float(np.abs(amap).max()) or 1.0
                ax.imshow(amap, cmap="bwr", vmin=-bound, vmax=bound)
            if row == 0:
                ax.set_title(textwrap.fill(record.label, 24), fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if images:
        axes[0, 0].set_title("image", fontsize=6)
    return fig
