"""`SyntheticGrid`: a tiny, file-free stand-in for FashionGrid with the same sample contract, for tests.

Each image is a `grid x grid` canvas; a random number of cells hold one item each, of distinct classes. Class c
is drawn as an ellipse filled with an oriented sine grating whose angle, frequency and colour are fixed by c,
so classes are distinct textures; position, size, phase and brightness jitter per sample. Everything is a pure
function of (seed, index).
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from torch.utils.data import Dataset


class SyntheticGrid(Dataset):
    """Deterministic synthetic grids of textured class patterns with exact ground truth.

    Args:
      size: number of samples N.
      image_size: H = W; must be divisible by `grid` (cell side = image_size // grid).
      grid: cells per side.
      num_classes: C.
      seed: the dataset seed; sample i depends on (seed, i) only.
      min_items, max_items: how many cells are filled (default max: every cell, at most C).

    Each sample is a dict (the FashionGrid contract):
      image  `[3, H, W]` float in [0, 1] (empty cells and the background of a cell are 0),
      target `[C]` float multi-hot,
      index  int,
      masks  {"cell": `[C, H, W]` bool, "item": `[C, H, W]` bool}: per present class its cell and the pixels of
             its pattern (all False for absent classes); every item pixel is non-zero in the image.
    """

    def __init__(
        self,
        size: int = 64,
        image_size: int = 56,
        grid: int = 2,
        num_classes: int = 10,
        seed: int = 0,
        min_items: int = 1,
        max_items: int | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"SyntheticGrid size must be positive; got {size}")
        if grid < 1 or image_size < grid or image_size % grid:
            raise ValueError(
                f"SyntheticGrid image_size ({image_size}) must be a positive multiple of grid ({grid})"
            )
        if num_classes < 1:
            raise ValueError(f"SyntheticGrid num_classes must be positive; got {num_classes}")
        cells = grid * grid
        max_items = min(cells, num_classes) if max_items is None else max_items
        if not 1 <= min_items <= max_items <= min(cells, num_classes):
            raise ValueError(
                f"SyntheticGrid needs 1 <= min_items <= max_items <= {min(cells, num_classes)}; "
                f"got min_items={min_items}, max_items={max_items}"
            )
        self.size, self.image_size, self.grid, self.seed = size, image_size, grid, seed
        self.num_classes, self.min_items, self.max_items = num_classes, min_items, max_items
        self.cell = image_size // grid
        self.classes = tuple(f"pattern_{c}" for c in range(num_classes))

    def __len__(self) -> int:
        return self.size

    def layout(self, index: int) -> list[tuple[int, int]]:
        """The grid's content as (class, cell) pairs, a pure function of (seed, index)."""
        rng = np.random.default_rng((self.seed, index))
        k = int(rng.integers(self.min_items, self.max_items + 1))
        classes = rng.choice(self.num_classes, size=k, replace=False)
        cells = rng.choice(self.grid * self.grid, size=k, replace=False)
        return [(int(c), int(cell)) for c, cell in zip(classes, cells, strict=True)]

    def pattern(self, cls: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One item of class `cls` in a cell: pixels `[3, s, s]` float in [0, 1] and its mask `[s, s]` bool."""
        s = self.cell
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) + 0.5
        cy, cx = s / 2 + rng.uniform(-0.1, 0.1, size=2) * s
        ry, rx = rng.uniform(0.3, 0.45, size=2) * s
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        angle = math.pi * cls / self.num_classes
        freq = (2 + cls % 3) * 2 * math.pi / s
        phase = rng.uniform(0, 2 * math.pi)
        wave = 0.5 + 0.5 * np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
        rgb = np.array(colorsys.hsv_to_rgb((cls * 0.618034) % 1.0, 0.7, 1.0))
        brightness = rng.uniform(0.8, 1.0)
        pixels = brightness * rgb[:, None, None] * (0.35 + 0.65 * wave)[None]
        return (pixels * mask[None]).astype(np.float32), mask

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"SyntheticGrid index {index} out of range [0, {self.size})")
        side, s = self.image_size, self.cell
        image = np.zeros((3, side, side), dtype=np.float32)
        cell_masks = np.zeros((self.num_classes, side, side), dtype=bool)
        item_masks = np.zeros((self.num_classes, side, side), dtype=bool)
        target = np.zeros(self.num_classes, dtype=np.float32)
        rng = np.random.default_rng((self.seed, index, 1))
        for cls, cell in self.layout(index):
            r, c = divmod(cell, self.grid)
            ys, xs = slice(r * s, (r + 1) * s), slice(c * s, (c + 1) * s)
            pixels, mask = self.pattern(cls, rng)
            image[:, ys, xs] = pixels
            cell_masks[cls, ys, xs] = True
            item_masks[cls, ys, xs] = mask
            target[cls] = 1.0
        return {
            "image": torch.from_numpy(image),
            "target": torch.from_numpy(target),
            "index": index,
            "masks": {"cell": torch.from_numpy(cell_masks), "item": torch.from_numpy(item_masks)},
        }
