"""The attribution-method interface: `attribute(model, images, target) -> [B, gh, gw]` patch-grid maps.

Besides `attribute`, a method may offer optional capabilities, declared here with defaults that mean "not
offered", so that the run and the metrics call them without probing: `setup` (validate against the model),
`prepare` (statistics of the evaluated data), `completeness_terms` (LibraGrad's Completeness Error), the
range it maps at (`layer_range`) and the layer-range trio `layer_ranges` / `range_maps` / `use_layer_range`
(`layers=auto`), with `estimated_range_maps` for screening ranges.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from caap.models.vit import ViTClassifier


class AttributionMethod(ABC):
    """One attribution method. Subclasses live one per file in `caap.methods` and are built by Hydra.

    `requires_grad`: forward-only methods run under `torch.no_grad()`; gradient methods under
    `torch.enable_grad()`. Hooks and gradient rules must be installed by context managers that restore the
    model even when the method raises.
    """

    requires_grad: bool = False
    uses_index: bool = False
    """Whether `attribute` takes `index=` (`[B]` long, each map's dataset index): for maps that are a function
    of the sample's identity (the random baseline), so that batching, DDP and resume do not change them."""
    name: str = "method"

    def setup(self, model: ViTClassifier) -> None:  # noqa: B027  (optional capability)
        """Validate the configuration against the model (layer ranges, supported pooling), before any data."""

    def prepare(self, data: Any) -> None:  # noqa: B027  (optional capability)
        """Compute statistics of the evaluated dataset `data` (map-style, dict samples) before the first map,
        e.g. CAAP's dataset-mean neutral context. Default: nothing to compute."""

    def completeness_terms(
        self, model: ViTClassifier, images: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """`(total [B], reference [B])` for LibraGrad's Completeness Error: the sum of every attribution the
        method hands out (prefix tokens and bias terms included, which a map drops) and the score they should
        add up to. None (default) when the method defines no such terms; the metric then uses the map sum."""
        return None

    # -- layer-range selection (layers=auto) ------------------------------------------------------------------
    def layer_range(self, model: ViTClassifier) -> tuple[int, int] | None:
        """The resolved range `(start, stop)` of residual positions the method maps at on `model`; None
        (default) for a method without a layer range."""
        return None

    def layer_ranges(self, model: ViTClassifier) -> list[tuple[int, int]]:
        """The layer ranges `(start, stop)` the method can map at on `model`; empty (default) when the method
        has no layer range, which `layers=auto` refuses."""
        return []

    def range_maps(
        self, model: ViTClassifier, images: Tensor, target: Tensor, ranges: Sequence[tuple[int, int]]
    ) -> Iterator[tuple[tuple[int, int], Tensor]]:
        """`((start, stop), maps [B, gh, gw])` for each range of `ranges` (from `layer_ranges`): the maps
        `attribute` would give at that range."""
        raise NotImplementedError(f"{self.name} has no layer range")

    def use_layer_range(self, start: int, stop: int | None) -> None:
        """Map at the range `(start, stop)` from now on (the range `layers=auto` chose)."""
        raise NotImplementedError(f"{self.name} has no layer range")

    def estimated_range_maps(
        self, model: ViTClassifier, images: Tensor, target: Tensor, ranges: Sequence[tuple[int, int]]
    ) -> Iterator[tuple[tuple[int, int], Tensor]]:
        """Cheap estimates of `range_maps` (`layers.screen_top_k` screens ranges with them); not offered by
        default."""
        raise NotImplementedError(f"{self.name} has no cheap estimate of its range maps")

    @abstractmethod
    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        """Maps `[B, gh, gw]` for pixel-space images `[B, 3, H, W]` in [0, 1] and target classes `[B]` (long)."""

    def __call__(
        self, model: ViTClassifier, images: Tensor, target: Tensor, index: Tensor | None = None
    ) -> Tensor:
        """Checked maps `[B, gh, gw]`; `index` `[B]` (optional): each map's dataset index, handed to methods
        that declare `uses_index`, ignored by the others."""
        if images.ndim != 4 or target.shape != (images.shape[0],):
            raise ValueError(
                f"{self.name}: expected images [B,3,H,W] and target [B]; "
                f"got {tuple(images.shape)}, {tuple(target.shape)}"
            )
        if index is not None and index.shape != target.shape:
            raise ValueError(
                f"{self.name}: index has shape {tuple(index.shape)}, expected {tuple(target.shape)}"
            )
        grad_mode = torch.enable_grad() if self.requires_grad else torch.no_grad()
        with grad_mode:
            if self.uses_index:
                maps = self.attribute(model, images, target.long(), index=index)  # type: ignore[call-arg]
            else:
                maps = self.attribute(model, images, target.long())
        gh, gw = model.grid_size(images)
        if maps.shape != (images.shape[0], gh, gw):
            raise RuntimeError(
                f"{self.name} returned maps {tuple(maps.shape)}, expected {(images.shape[0], gh, gw)}"
            )
        return maps.detach()
