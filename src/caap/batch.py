"""`AttributionBatch`: the maps of one step with everything a metric needs to score them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class AttributionBatch:
    """P (image, target class) pairs and their maps; an image with several targets appears once per target.

    images `[P, 3, H, W]` pixel space in [0, 1]; maps `[P, gh, gw]` (patch grid); classes `[P]` long target
    class; index `[P]` long dataset index of the image; labels `[P, C]` the image's multi-hot labels (or None);
    cell_masks / item_masks `[P, C, H, W]` bool per-class ground truth of the image (or None when the dataset
    has none).
    """

    images: Tensor
    maps: Tensor
    classes: Tensor
    index: Tensor
    labels: Tensor | None = None
    cell_masks: Tensor | None = None
    item_masks: Tensor | None = None

    def __len__(self) -> int:
        return self.maps.shape[0]

    def target_masks(self, kind: str = "cell") -> Tensor | None:
        """The target class's own mask `[P, H, W]` (bool), or None when the dataset has no masks."""
        masks = self.cell_masks if kind == "cell" else self.item_masks
        if masks is None:
            return None
        return masks[range(len(self)), self.classes]
