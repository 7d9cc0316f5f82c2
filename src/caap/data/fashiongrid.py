"""FashionGrid: 2x2 grids of Fashion-MNIST items of distinct classes, with exact localisation ground truth.

The embedded default benchmark of this project, small enough to run anywhere in minutes. Each image is a
`grid x grid` canvas of 28x28 cells; a random number of cells hold one Fashion-MNIST item each, of distinct
classes; the label is multi-hot. Because every item sits in a known cell, each present class has an exact cell
mask and item pixel mask, which the grid pointing game (Rao et al., CVPR 2022), segmentation metrics and the
class-discrimination score need. Grids are a pure function of (seed, split, index).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from caap.data.idx import FASHION_MNIST_CLASSES, fashion_mnist_split

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
CELL = 28


class FashionGrid(Dataset):
    """FashionGrid grids from Fashion-MNIST.

    Splits: `train` and `val` draw their items from disjoint parts of Fashion-MNIST train (the last
    `val_items` items form the val pool), `test` from Fashion-MNIST test.

    Each sample is a dict:
      image  `[3, H, W]` float in [0, 1] (grey replicated to RGB; H = W = 28 * grid; empty cells are 0),
      target `[C]` float multi-hot (C = 10),
      index  int (dataset index),
      masks  {"cell": `[C, H, W]` bool, "item": `[C, H, W]` bool}: per class, its cell and its item's pixels
             (all False for absent classes).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        split: str = "test",
        size: int = 10_000,
        seed: int = 0,
        root: str | Path | None = None,
        grid: int = 2,
        min_items: int = 1,
        max_items: int | None = None,
        val_items: int = 5_000,
        item_threshold: int = 16,
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"FashionGrid split '{split}' is unknown; allowed: {sorted(_SPLIT_CODES)}")
        cells = grid * grid
        max_items = cells if max_items is None else max_items
        if not 1 <= min_items <= max_items <= min(cells, len(self.classes)):
            raise ValueError(
                f"FashionGrid needs 1 <= min_items <= max_items <= {min(cells, len(self.classes))}; "
                f"got min_items={min_items}, max_items={max_items}"
            )
        if size < 1:
            raise ValueError(f"FashionGrid size must be positive; got {size}")
        try:
            images, labels, self.source_ids = fashion_mnist_split(split, root, val_items)
        except ValueError as err:
            raise ValueError(f"FashionGrid {err}") from err
        self.items = images
        self.by_class = [np.flatnonzero(labels == c) for c in range(len(self.classes))]
        self.split, self.size, self.seed, self.grid = split, size, seed, grid
        self.min_items, self.max_items, self.item_threshold = min_items, max_items, item_threshold
        self.num_classes = len(self.classes)
        self.image_size = grid * CELL

    def __len__(self) -> int:
        return self.size

    def layout(self, index: int) -> list[tuple[int, int, int]]:
        """The grid's content as (class, cell, item index into this split's pool), a pure function of the index."""
        rng = np.random.default_rng((self.seed, _SPLIT_CODES[self.split], index))
        k = int(rng.integers(self.min_items, self.max_items + 1))
        classes = rng.choice(self.num_classes, size=k, replace=False)
        cells = rng.choice(self.grid * self.grid, size=k, replace=False)
        return [
            (int(c), int(cell), int(rng.choice(self.by_class[c])))
            for c, cell in zip(classes, cells, strict=True)
        ]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"FashionGrid index {index} out of range [0, {self.size})")
        side = self.image_size
        canvas = np.zeros((side, side), dtype=np.uint8)
        cell_masks = np.zeros((self.num_classes, side, side), dtype=bool)
        item_masks = np.zeros((self.num_classes, side, side), dtype=bool)
        target = np.zeros(self.num_classes, dtype=np.float32)
        for cls, cell, item in self.layout(index):
            r, c = divmod(cell, self.grid)
            ys, xs = slice(r * CELL, (r + 1) * CELL), slice(c * CELL, (c + 1) * CELL)
            pixels = self.items[item]
            canvas[ys, xs] = pixels
            cell_masks[cls, ys, xs] = True
            item_masks[cls, ys, xs] = pixels > self.item_threshold
            target[cls] = 1.0
        image = torch.from_numpy(canvas).float().div_(255.0).expand(3, side, side).clone()
        return {
            "image": image,
            "target": torch.from_numpy(target),
            "index": index,
            "masks": {"cell": torch.from_numpy(cell_masks), "item": torch.from_numpy(item_masks)},
        }
