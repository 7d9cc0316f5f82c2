"""Figures sized for the report page: one style (fonts of at least 10 pt), PNGs at a fixed dpi whose pixel size
is the figure's size, and what a page needs to show them at that size (`RenderedFigure`).

A figure is drawn at `DPI` and saved without cropping, so its PNG is `figsize * DPI` pixels; the page shows it
at one CSS pixel per PNG pixel while it is at most `PAGE_WIDTH_PX` wide. `render` measures the smallest text
and the smallest map tile of the drawn figure, so that a browser test can check the rendered sizes
(`min_font_px * clientWidth / naturalWidth`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")  # no display: reports run on servers and in tests
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Text

DPI = 100
#: the widest figure the page shows unscaled (its content column is wider)
PAGE_WIDTH_PX = 1100
MIN_FONT_PT = 10.0
#: the smallest side of a gallery tile, in pixels of the page
MIN_TILE_PX = 160
STYLE: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 11,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
}


@contextmanager
def report_style() -> Iterator[None]:
    """matplotlib settings of every report figure (text sizes are fixed when an artist is created)."""
    with plt.rc_context(cast(Any, STYLE)):
        yield


@dataclass(frozen=True)
class RenderedFigure:
    """A figure of the report: `png` of `width_px` x `height_px`, the smallest text in it (`min_font_px`, in PNG
    pixels) and the smallest side of its map tiles (`min_tile_px`, None without tiles)."""

    caption: str
    png: bytes
    width_px: int
    height_px: int
    min_font_px: float
    min_tile_px: float | None = None


def visible_texts(fig: Figure) -> list[Text]:
    """Every drawn, non-empty text artist of the figure (titles, labels, ticks, legends, annotations)."""
    return [
        t
        for t in fig.findobj(Text)
        if isinstance(t, Text) and t.get_visible() and t.get_text().strip() and t.figure is not None
    ]


def render(fig: Figure, caption: str, tiles: Sequence[Axes] = ()) -> RenderedFigure:
    """Draw `fig` at `DPI`, measure it and encode it as PNG (then close it); `tiles` are its map tiles."""
    fig.set_dpi(DPI)
    fig.canvas.draw()
    fonts = [float(t.get_fontsize()) for t in visible_texts(fig)]
    min_font_px = min(fonts, default=MIN_FONT_PT) * DPI / 72
    sides = [min(a.get_window_extent().width, a.get_window_extent().height) for a in tiles]
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    width, height = fig.canvas.get_width_height()
    plt.close(fig)
    return RenderedFigure(
        caption, buffer.getvalue(), int(width), int(height), float(min_font_px), min(sides) if sides else None
    )
