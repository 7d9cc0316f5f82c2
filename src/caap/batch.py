"""`AttributionBatch`: the maps of one step with everything a metric needs to score them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Values of a segmentation map (`AttributionBatch.segmentation`, a dataset sample's "segmentation"):
# c >= 0 is class c of the model's label space; the negative values below are reserved.
BACKGROUND = -1
FOREGROUND = -2  # an object whose class the dataset does not name in the model's label space (Gur et al.)
IGNORE = -100  # void / unlabelled pixels (VOC's 255, ImageNet-S's 1000): excluded from scoring


@dataclass
class AttributionBatch:
    """P (image, target class) pairs and their maps; an image with several targets appears once per target.

    images `[P, 3, H, W]` pixel space in [0, 1]; maps `[P, gh, gw]` (patch grid); classes `[P]` long target
    class; index `[P]` long dataset index of the image; labels `[P, C]` the image's multi-hot labels (or None);
    cell_masks / item_masks `[P, C, H, W]` bool per-class ground truth of the image (or None when the dataset
    has none); segmentation `[P, H, W]` long class-id map of the image (see BACKGROUND, FOREGROUND, IGNORE),
    the compact form real segmentation datasets use instead of per-class masks.
    """

    images: Tensor
    maps: Tensor
    classes: Tensor
    index: Tensor
    labels: Tensor | None = None
    cell_masks: Tensor | None = None
    item_masks: Tensor | None = None
    segmentation: Tensor | None = None

    def __len__(self) -> int:
        return self.maps.shape[0]

    def target_masks(self, kind: str = "cell") -> Tensor | None:
        """The target class's own mask `[P, H, W]` (bool), or None when the dataset has no masks."""
        if kind not in ("cell", "item"):
            raise ValueError(f"mask kind must be 'cell' or 'item', got '{kind}'")
        masks = self.cell_masks if kind == "cell" else self.item_masks
        if masks is not None:
            return masks[range(len(self)), self.classes]
        if kind == "item" and self.segmentation is not None:
            seg = self.segmentation
            return (seg == self.classes[:, None, None]) | (seg == FOREGROUND)
        return None

    def valid_pixels(self) -> Tensor | None:
        """`[P, H, W]` bool: pixels that count in scoring (not IGNORE), or None when all do."""
        if self.segmentation is None:
            return None
        return self.segmentation != IGNORE

    def has_masks(self, kind: str = "cell") -> bool:
        """Whether `target_masks(kind)` has ground truth for this batch."""
        if kind == "cell":
            return self.cell_masks is not None
        return self.item_masks is not None or self.segmentation is not None


def segmentation_from_masks(masks: Tensor) -> Tensor:
    """`[C, H, W]` bool per-class masks -> `[H, W]` long class-id map (BACKGROUND where no class; the highest
    class id wins on overlap)."""
    classes = torch.arange(masks.shape[0], device=masks.device)[:, None, None]
    return torch.where(masks, classes, BACKGROUND).amax(0).clamp_min(BACKGROUND)
