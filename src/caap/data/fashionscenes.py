"""FashionScenes: tinted Fashion-MNIST items at free positions and scales, overlapping, on textured backgrounds.

A harder embedded benchmark than FashionGrid: items are not aligned to any patch grid, vary in scale and
colour, occlude each other, and the background is a procedural texture (never a flat colour), so replacing
evidence by "the background" is not a free shortcut for an attribution method. Ground truth stays exact: items
are pasted as opaque silhouettes (the Fashion-MNIST intensity above a threshold), so every visible pixel of a
class is known. Scenes are a pure function of (seed, split, index).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from caap.data.idx import FASHION_MNIST_CLASSES, SPLITS, fashion_mnist_split
from caap.data.textures import procedural_texture, resize_matrix

TINT_CANDIDATES = 16
SHADE_FLOOR = 0.35  # an item pixel's colour is tint * (SHADE_FLOOR + (1 - SHADE_FLOOR) * relative intensity)


@dataclass(frozen=True)
class Placement:
    """One item of a scene: its class, row in the split's item pool, side in pixels, top-left corner, RGB tint."""

    cls: int
    item: int
    size: int
    top: int
    left: int
    tint: tuple[float, float, float]


@dataclass
class Scene:
    """A rendered scene with its layers, items in drawing order (bottom first); K items, an `H x W` canvas.

    image `[3, H, W]`, background `[3, H, W]`, patches (each item's colours `[3, s, s]` over its box, 0 off its
    silhouette; `paint(k)` puts one on the canvas), silhouettes `[K, H, W]` bool (each item's full shape), visible `[K, H, W]` bool (pixels where a kept item
    is on top; all False for dropped items), kept `[K]` bool, visible_fraction `[K]` (share of the silhouette
    on top among the items kept when it was decided), texture (the background's kind).
    """

    image: np.ndarray
    background: np.ndarray
    placements: list[Placement]
    patches: list[np.ndarray]
    silhouettes: np.ndarray
    visible: np.ndarray
    kept: np.ndarray
    visible_fraction: np.ndarray
    texture: str

    def box(self, slot: int) -> tuple[slice, slice]:
        """Rows and columns of item `slot`'s square on the canvas."""
        place = self.placements[slot]
        return slice(place.top, place.top + place.size), slice(place.left, place.left + place.size)

    def paint(self, slot: int) -> np.ndarray:
        """Item `slot`'s colours on the whole canvas `[3, H, W]` (0 off its silhouette)."""
        canvas = np.zeros_like(self.background)
        rows, cols = self.box(slot)
        canvas[:, rows, cols] = self.patches[slot]
        return canvas


class FashionScenes(Dataset):
    """FashionScenes scenes from Fashion-MNIST (Xiao et al., 2017) items.

    Each scene: a procedural texture (`caap.data.textures`), then 1 to 4 items of distinct classes, each
    resized to a random side in [min_scale, max_scale] px, placed at a random integer position inside the canvas
    (no alignment to any patch grid), painted with a random tint that contrasts with the background under it and
    shaded by the item's own intensity. An item's pixels are its silhouette: the resized intensity above
    `item_threshold` / 255 (opaque, so the visible mask is exact). Later items cover earlier ones; an item
    whose visible share of its silhouette falls below `min_visible` is removed from the scene (not drawn, not
    labelled; the most covered item goes first, then visibility is re-checked), so every drawn item is labelled
    and every labelled item shows at least `min_visible` of itself.

    Splits: `train` and `val` draw their items from disjoint parts of Fashion-MNIST train (the last `val_items`
    items form the val pool), `test` from Fashion-MNIST test; `source_ids` gives each pool item's row in its file.

    Each sample is a dict (the FashionGrid contract):
      image  `[3, H, W]` float in [0, 1] (H = W = image_size),
      target `[C]` float multi-hot (C = 10): the classes of the kept items,
      index  int,
      masks  {"cell": `[C, H, W]` bool, "item": `[C, H, W]` bool}: per present class, "item" is its visible
             pixels and "cell" their bounding box (the scene analogue of a FashionGrid cell, so grid and energy
             pointing games run unchanged; boxes of different classes may overlap); all False for absent
             classes. `masks=False` leaves the key out (training needs no masks).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        split: str = "test",
        size: int = 10_000,
        seed: int = 0,
        root: str | Path | None = None,
        image_size: int = 112,
        min_items: int = 1,
        max_items: int = 4,
        min_scale: int = 24,
        max_scale: int = 56,
        min_visible: float = 0.5,
        min_contrast: float = 0.35,
        item_threshold: int = 16,
        val_items: int = 5_000,
        masks: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"FashionScenes split '{split}' is unknown; allowed: {sorted(SPLITS)}")
        if size < 1:
            raise ValueError(f"FashionScenes size must be positive; got {size}")
        if not 1 <= min_items <= max_items <= len(self.classes):
            raise ValueError(
                f"FashionScenes needs 1 <= min_items <= max_items <= {len(self.classes)}; "
                f"got min_items={min_items}, max_items={max_items}"
            )
        if not 8 <= min_scale <= max_scale <= image_size:
            raise ValueError(
                f"FashionScenes needs 8 <= min_scale <= max_scale <= image_size ({image_size}); "
                f"got min_scale={min_scale}, max_scale={max_scale}"
            )
        if not 0.0 < min_visible <= 1.0:
            raise ValueError(f"FashionScenes min_visible must lie in (0, 1]; got {min_visible}")
        try:
            images, labels, self.source_ids = fashion_mnist_split(split, root, val_items)
        except ValueError as err:
            raise ValueError(f"FashionScenes {err}") from err
        self.items = images
        self.by_class = [np.flatnonzero(labels == c) for c in range(len(self.classes))]
        self.split, self.size, self.seed, self.image_size = split, size, seed, image_size
        self.min_items, self.max_items = min_items, max_items
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_visible, self.min_contrast, self.item_threshold = min_visible, min_contrast, item_threshold
        self.return_masks = masks
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return self.size

    def item_shape(self, item: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Pool item `item` resized to `size x size` (bilinear, antialiased): its silhouette `[s, s]` bool and
        relative shading `[s, s]` in [SHADE_FLOOR, 1] (1 at the item's brightest pixel)."""
        resize = resize_matrix(self.items.shape[-1], size, mode="bilinear", antialias=True)
        resized = resize @ (self.items[item].astype(np.float32) / np.float32(255.0)) @ resize.T
        shade = SHADE_FLOOR + (1.0 - SHADE_FLOOR) * resized / max(float(resized.max()), 1e-6)
        return resized > self.item_threshold / 255.0, shade.astype(np.float32)

    def pick_tint(
        self, rng: np.random.Generator, under: np.ndarray, shade: float
    ) -> tuple[float, float, float]:
        """A random RGB tint whose mean colour (tint * `shade`) lies at mean distance >= min_contrast from the
        background pixels `under` `[3, N]` (the first of TINT_CANDIDATES qualifying, else the farthest)."""
        candidates = rng.random((TINT_CANDIDATES, 3), dtype=np.float32)
        gaps = np.linalg.norm(candidates[:, :, None] * shade - under[None], axis=1).mean(1)
        ok = np.flatnonzero(gaps >= self.min_contrast)
        r, g, b = (float(x) for x in candidates[ok[0] if len(ok) else int(gaps.argmax())])
        return r, g, b

    def scene(self, index: int) -> Scene:
        """Render scene `index`: a pure function of (seed, split, index)."""
        split_code = SPLITS.index(self.split)
        rng = np.random.default_rng((self.seed, split_code, index))
        side = self.image_size
        background, texture = procedural_texture(rng, side)
        k = int(rng.integers(self.min_items, self.max_items + 1))
        classes = rng.choice(self.num_classes, size=k, replace=False)
        placements: list[Placement] = []
        patches: list[np.ndarray] = []
        silhouettes = np.zeros((k, side, side), dtype=bool)
        for slot, cls in enumerate(classes.tolist()):
            pool = self.by_class[cls]
            item = int(pool[rng.integers(len(pool))])
            size = int(rng.integers(self.min_scale, self.max_scale + 1))
            top, left = (int(x) for x in rng.integers(0, side - size + 1, size=2))
            shape, shade = self.item_shape(item, size)
            box = (slice(top, top + size), slice(left, left + size))
            under = background[:, box[0], box[1]][:, shape]
            under = under[:, :: max(1, under.shape[1] // 64)]
            tint = self.pick_tint(rng, under, float(shade[shape].mean()) if shape.any() else 1.0)
            patches.append(np.asarray(tint, dtype=np.float32)[:, None, None] * shade * shape)
            silhouettes[slot][box] = shape
            placements.append(Placement(cls, item, size, top, left, tint))
        visible, kept, fraction = resolve_occlusion(silhouettes, self.min_visible)
        image = background.copy()
        scene = Scene(image, background, placements, patches, silhouettes, visible, kept, fraction, texture)
        for slot in np.flatnonzero(kept).tolist():
            rows, cols = scene.box(slot)
            np.copyto(image[:, rows, cols], patches[slot], where=silhouettes[slot, rows, cols])
        return scene

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"FashionScenes index {index} out of range [0, {self.size})")
        scene = self.scene(index)
        target = np.zeros(self.num_classes, dtype=np.float32)
        kept = np.flatnonzero(scene.kept)
        target[[scene.placements[slot].cls for slot in kept]] = 1.0
        sample = {"image": torch.from_numpy(scene.image), "target": torch.from_numpy(target), "index": index}
        if self.return_masks:
            side = self.image_size
            items = np.zeros((self.num_classes, side, side), dtype=bool)
            cells = np.zeros((self.num_classes, side, side), dtype=bool)
            for slot in kept:
                cls = scene.placements[slot].cls
                items[cls] = scene.visible[slot]
                rows, cols = np.flatnonzero(items[cls].any(1)), np.flatnonzero(items[cls].any(0))
                cells[cls, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
            sample["masks"] = {"cell": torch.from_numpy(cells), "item": torch.from_numpy(items)}
        return sample


def resolve_occlusion(
    silhouettes: np.ndarray, min_visible: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visible pixels of stacked opaque layers (later on top) after removing under-visible ones.

    Args:
        silhouettes: `[K, H, W]` bool, bottom layer first.
        min_visible: a layer is kept only if at least this share of its silhouette is on top.

    Returns:
        visible `[K, H, W]` bool (False for removed layers), kept `[K]` bool and visible_fraction `[K]` (for a
        removed layer, its share when it was removed). The most covered layer is removed first and the rest
        re-checked (removing a layer only uncovers others); the top layer is always kept unless empty.
    """
    k = len(silhouettes)
    area = np.maximum(silhouettes.reshape(k, -1).sum(1), 1)
    kept: np.ndarray = np.asarray(silhouettes.reshape(k, -1).any(1))  # [K] bool (asarray: for the type)
    fraction = np.zeros(k)
    while True:
        visible = np.zeros_like(silhouettes)
        covered = np.zeros(silhouettes.shape[1:], dtype=bool)
        for slot in np.flatnonzero(kept)[::-1]:
            visible[slot] = silhouettes[slot] & ~covered
            covered |= silhouettes[slot]
        live = np.flatnonzero(kept)
        if len(live) == 0:
            return visible, kept, fraction
        fraction[live] = visible[live].reshape(len(live), -1).sum(1) / area[live]
        worst = live[int(fraction[live].argmin())]
        if fraction[worst] >= min_visible:
            return visible, kept, fraction
        kept[worst] = False
