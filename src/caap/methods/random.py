"""Random attribution: i.i.d. uniform maps, the floor every method must beat.

Each map is a pure function of `(seed, dataset index, class)`: its own generator is seeded from those three
numbers (numpy's `SeedSequence`, so nearby triples give independent streams), so batching, DDP sharding,
resumed runs and call order give the same maps, and two identical images at different indices still get
independent draws. The run hands each map's dataset index over (`AttributionMethod.__call__(..., index=)`);
a caller without indices gets a running count of the images this instance has mapped in its place, so a
sequence of calls gives the same maps whatever its batch sizes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from caap.methods.base import AttributionMethod
from caap.models.vit import ViTClassifier


def pair_seed(seed: int, index: int, cls: int) -> int:
    """A 63-bit generator seed for the map of `(seed, index, class)`; distinct triples give independent seeds."""
    words = np.random.SeedSequence([seed % 2**64, index, cls]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class RandomAttribution(AttributionMethod):
    """Uniform [0, 1) maps `[B, gh, gw]`, one generator per (seed, dataset index, class)."""

    requires_grad = False
    uses_index = True
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.images_seen = 0  # stands for the index when a caller gives none

    def attribute(
        self, model: ViTClassifier, images: Tensor, target: Tensor, index: Tensor | None = None
    ) -> Tensor:
        gh, gw = model.grid_size(images)
        b = images.shape[0]
        if index is None:
            index = torch.arange(self.images_seen, self.images_seen + b)
        self.images_seen += b
        if bool((index < 0).any()) or bool((target < 0).any()):
            raise ValueError("random: dataset indices and classes must be non-negative")
        maps = [
            torch.rand(gh, gw, generator=torch.Generator().manual_seed(pair_seed(self.seed, i, c)))
            for i, c in zip(index.tolist(), target.tolist(), strict=True)
        ]
        return torch.stack(maps).to(images.device) if maps else images.new_zeros(0, gh, gw)
