"""`AttributionBatch`: the maps of one step with everything a metric needs to score them, and the (image,
class) pairs a data batch asks maps of (`select_targets`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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

    @classmethod
    def from_data(
        cls, batch: Mapping[str, Any], rows: Tensor, classes: Tensor, maps: Tensor
    ) -> AttributionBatch:
        """The pairs `(batch image rows[p], classes[p])` `[P]` of a data batch (`collate_skip_none`'s dict:
        `image [B, 3, H, W]`, `index [B]`, optional `target [B, C]`, `masks {cell, item: [B, C, H, W]}`,
        `segmentation [B, H, W]`) with their `maps [P, gh, gw]` (stored as float32)."""
        images = batch["image"][rows]
        masks = batch.get("masks") or {}
        labels, segmentation = batch.get("target"), batch.get("segmentation")
        return cls(
            images=images,
            maps=maps.float(),
            classes=classes,
            index=torch.as_tensor(batch["index"], device=images.device)[rows],
            labels=None if labels is None else labels[rows],
            cell_masks=masks["cell"][rows] if "cell" in masks else None,
            item_masks=masks["item"][rows] if "item" in masks else None,
            segmentation=None if segmentation is None else segmentation[rows],
        )

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


TARGETS = ("label", "pred")


def select_targets(
    batch: Mapping[str, Any], target: str, model: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """`(rows [P], classes [P])`: which image of a data batch each map explains, and for which class.

    `target="label"` explains every class present in an image (from the multi-hot `target [B, C]`),
    `target="pred"` the model's top class (one forward of `model` on `image [B, 3, H, W]`).
    """
    if target not in TARGETS:
        raise ValueError(f"target='{target}' is not supported; allowed: {list(TARGETS)}")
    images = batch["image"]
    if target == "pred":
        with torch.no_grad():
            classes = model(images).argmax(-1)
        return torch.arange(images.shape[0], device=images.device), classes
    labels = batch.get("target")
    if labels is None or labels.ndim != 2 or labels.shape[1] == 0:
        raise ValueError("target=label needs labelled data, but this dataset has no labels; use target=pred")
    rows, classes = (labels > 0).nonzero(as_tuple=True)
    return rows, classes
