"""The report's map gallery: rows of (image, class) pairs, columns the image then each run's map over it, with
the target's ground truth outlined and one colour bar.

Tiles are `TILE_IN` inches (180 px, above `caap.report.render.MIN_TILE_PX`); runs beyond what one page width holds go to further
figures (each with the image column). A map whose values are undefined (NaN) or all equal (e.g. all zero) has
no sign or scale to show: its tile is hatched and labelled instead of being coloured.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from safetensors.torch import load_file

from caap.maps_io import load_maps
from caap.report.figures import shorten, wrap_label
from caap.report.render import PAGE_WIDTH_PX, report_style
from caap.report.runs import RunRecord

#: tile side in inches at the report's 100 dpi (180 px: above `MIN_TILE_PX` with room for the frame)
TILE_IN = 1.8
#: width left of and right of the tiles: row labels, colour bar
MARGIN_IN = 2.2
OUTLINE = "lime"


def run_images(records: Sequence[RunRecord]) -> dict[int, np.ndarray]:
    """`{dataset index: [H, W, 3] float in [0, 1]}` from the runs' images.safetensors."""
    images: dict[int, np.ndarray] = {}
    for record in records:
        file = record.path / "images.safetensors"
        if file.is_file():
            for key, tensor in load_file(str(file)).items():
                images.setdefault(int(key), tensor.permute(1, 2, 0).float().numpy() / 255.0)
    return images


def run_masks(records: Sequence[RunRecord]) -> dict[tuple[int, int], np.ndarray]:
    """`{(index, class): [H, W] bool}` ground truth of the kept images (masks.safetensors, `SampleImages`)."""
    masks: dict[tuple[int, int], np.ndarray] = {}
    for record in records:
        file = record.path / "masks.safetensors"
        if file.is_file():
            for key, tensor in load_file(str(file)).items():
                index, cls = (int(k) for k in key.split("_"))
                masks.setdefault((index, cls), tensor.bool().numpy())
    return masks


def degenerate(amap: np.ndarray) -> str | None:
    """'NaN' for a map with undefined values, 'constant' for one whose values are all equal (to 1e-6 of its
    largest |value|: no pattern to show), else None."""
    if not np.isfinite(amap).all():
        return "NaN"
    return "constant" if float(np.ptp(amap)) <= 1e-6 * float(np.abs(amap).max()) else None


def overlay_rgba(amap: np.ndarray, max_alpha: float = 0.85) -> np.ndarray:
    """`[gh, gw, 4]` RGBA of a signed map `[gh, gw]`: red positive, blue negative ('bwr', symmetric around 0,
    scaled by the map's max |value|), opacity proportional to |value| so that patches without attribution
    leave the image visible."""
    bound = float(np.abs(amap).max()) or 1.0
    rgba = plt.get_cmap("bwr")(amap / bound * 0.5 + 0.5)
    rgba[..., 3] = np.abs(amap) / bound * max_alpha
    return rgba


def mark_degenerate(ax: Axes, label: str, height: int, width: int) -> None:
    """Hatch a tile and say why it holds no colours."""
    ax.add_patch(
        Rectangle((-0.5, -0.5), width, height, facecolor="none", hatch="////", edgecolor="0.35", linewidth=0)
    )
    ax.text(
        (width - 1) / 2, (height - 1) / 2, label, ha="center", va="center", fontsize=11,
        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"},
    )  # fmt: skip


def draw_tile(
    ax: Axes, image: np.ndarray | None, amap: np.ndarray | None, mask: np.ndarray | None
) -> tuple[int, int]:
    """The image (if any), the map over it (if any; hatched when degenerate) and the ground-truth outline."""
    if image is not None:
        ax.imshow(image)
        height, width = image.shape[:2]
    else:
        height, width = amap.shape if amap is not None else (1, 1)
    if amap is not None:
        said = degenerate(amap)
        extent = (-0.5, width - 0.5, height - 0.5, -0.5)
        if said is not None:
            if image is None:
                ax.imshow(np.ones((height, width)), cmap="Greys", vmin=0, vmax=2)
            mark_degenerate(ax, said, height, width)
        elif image is not None:
            ax.imshow(overlay_rgba(amap), extent=extent, interpolation="nearest")
        else:
            bound = float(np.abs(amap).max()) or 1.0
            ax.imshow(amap, cmap="bwr", vmin=-bound, vmax=bound, interpolation="nearest")
    if mask is not None and mask.any() and image is not None and mask.shape == (height, width):
        ax.contour(mask.astype(float), levels=[0.5], colors=OUTLINE, linewidths=1.5)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    return height, width


def gallery_figures(
    records: Sequence[RunRecord], class_names: Sequence[str] | None = None, num_maps: int = 6
) -> list[tuple[Figure, list[Axes]]]:
    """Rows: the first `num_maps` (image, class) pairs that every run mapped and whose image was kept;
    columns: the image, then each run's map over it (signed, 'bwr', symmetric around 0 per map), the target's
    ground truth (cell or item mask) outlined. As many runs per figure as the page holds; each figure with
    its tiles (for their rendered size). Empty when the runs share no map."""
    images = run_images(records)
    masks = run_masks(records)
    maps = [load_maps(r.path / "maps") for r in records]
    common = set.intersection(*(set(m) for m in maps)) if maps else set()
    keys = sorted(k for k in common if k[0] in images or not images)[:num_maps]
    if not keys:
        return []
    per_figure = max(1, int((PAGE_WIDTH_PX / 100 - MARGIN_IN) // TILE_IN) - (1 if images else 0))
    out = []
    for first in range(0, len(records), per_figure):
        chunk = list(range(first, min(first + per_figure, len(records))))
        out.append(gallery_page(records, maps, chunk, keys, images, masks, class_names))
    return out


def gallery_page(
    records: Sequence[RunRecord],
    maps: list[dict],
    chunk: list[int],
    keys: list[tuple[int, int]],
    images: dict[int, np.ndarray],
    masks: dict[tuple[int, int], np.ndarray],
    class_names: Sequence[str] | None,
) -> tuple[Figure, list[Axes]]:
    """One gallery figure for the runs `chunk` (see `gallery_figures`)."""
    cols = len(chunk) + (1 if images else 0)
    size = (cols * TILE_IN + MARGIN_IN, len(keys) * TILE_IN + 1.0)
    with report_style():
        fig, axes = plt.subplots(len(keys), cols, figsize=size, squeeze=False, layout="constrained")
        for row, (index, cls) in enumerate(keys):
            name = class_names[cls] if class_names and 0 <= cls < len(class_names) else f"class {cls}"
            panels, image, mask = list(axes[row]), images.get(index), masks.get((index, cls))
            if images:
                draw_tile(panels[0], image, None, mask)
                panels = panels[1:]
            for ax, k in zip(panels, chunk, strict=True):
                draw_tile(ax, image, maps[k][(index, cls)].float().numpy(), mask)
                if row == 0:
                    ax.set_title(wrap_label(records[k].label, 22))
            axes[row, 0].set_ylabel(f"#{index}\n{shorten(name, 18)}")
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        if images:
            axes[0, 0].set_title("image")
        colours = ScalarMappable(Normalize(-1, 1), plt.get_cmap("bwr"))
        bar = fig.colorbar(colours, ax=axes, shrink=min(1.0, 3.0 / len(keys)), aspect=25)
        bar.set_label("value / max |value| of the map")  # longer labels overran a bar of two rows
        bar.set_ticks([-1, 0, 1])
    return fig, list(axes.ravel())
