"""De-duplication by (index, class) in every metric family: repeats are dropped, other classes are kept.

`target=label` gives one map per (image, class), so one dataset index carries several pairs, while DDP's
padding repeats whole pairs. Every family (per-pair values, curves, segmentation counts, sanity stages) must
drop only the repeats: each case scores two images with two classes each, plus padded repeats, and must equal
the same pairs scored once under distinct indices (where no de-duplication can apply).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from caap.batch import AttributionBatch
from caap.methods import Gradient
from caap.metrics import (
    MIF,
    AttributionMetric,
    CascadingRandomisation,
    GridPointingGame,
    PixelDeletion,
    SegmentationMIoU,
    SegmentationPixelAccuracy,
)
from caap.models import ViTClassifier, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [(3, 1), (3, 4), (7, 4), (7, 6)]  # (index, class): two images, two classes each, sorted
IMAGE_OF_PAIR = [0, 0, 1, 1]


@functools.cache
def _model() -> ViTClassifier:
    return build_model("vit_fashiongrid_patch7_56").eval()


@functools.cache
def _data() -> tuple[Tensor, Tensor, Tensor]:
    """Images `[2, 3, 56, 56]`, one map per pair `[4, 8, 8]`, and per-class masks `[10, 56, 56]`: class c owns
    a quadrant (c % 4) plus its own 7-pixel column stripe, so each class of an image scores differently."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 56, 56, generator=g)
    maps = torch.randn(4, 8, 8, generator=g)
    masks = torch.zeros(10, 56, 56, dtype=torch.bool)
    for c in range(10):
        r, q = divmod(c % 4, 2)
        masks[c, 28 * r : 28 * (r + 1), 28 * q : 28 * (q + 1)] = True
        masks[c, :, 5 * c : 5 * c + 7] = True
    return images, maps, masks


def _batch(rows: list[int], distinct_index: bool = False) -> AttributionBatch:
    """The pairs `PAIRS[rows]` as one batch; `distinct_index` gives every pair its own index (0..3)."""
    images, maps, masks = _data()
    masks = masks.expand(len(rows), -1, -1, -1)
    return AttributionBatch(
        images=images[[IMAGE_OF_PAIR[r] for r in rows]],
        maps=maps[rows],
        classes=torch.tensor([PAIRS[r][1] for r in rows]),
        index=torch.tensor([r if distinct_index else PAIRS[r][0] for r in rows]),
        cell_masks=masks,
        item_masks=masks,
    )


def _same(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, equal_nan=True)


def _curves(metric: AttributionMetric) -> list[Tensor]:
    assert isinstance(metric, MIF | PixelDeletion)
    return [metric.per_sample_curves()[2], metric.curve()[1]]


def _stages(metric: AttributionMetric) -> list[Tensor]:
    assert isinstance(metric, CascadingRandomisation)
    _, _, rho, ssim = metric.per_stage_samples()
    extra = metric.extra_results()
    return [rho, ssim, torch.tensor([extra[k] for k in sorted(extra)])]


CASES: dict[str, tuple[Callable[[], AttributionMetric], Callable[[AttributionMetric], list[Tensor]]]] = {
    "values": (GridPointingGame, lambda m: []),
    "curves_tokens": (lambda: MIF(ratios=[0.25, 0.5, 0.75]), _curves),
    "curves_pixels": (lambda: PixelDeletion(steps=4), _curves),
    "counts_accuracy": (SegmentationPixelAccuracy, lambda m: []),
    "counts_miou": (SegmentationMIoU, lambda m: []),
    "stages": (lambda: CascadingRandomisation(stages=2, method=Gradient()), _stages),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_classes_per_image_are_kept_and_repeats_dropped(case: str) -> None:
    make, extras = CASES[case]
    model = _model()
    reference = make()
    reference.update(_batch([0, 1, 2, 3], distinct_index=True), model)
    metric = make()
    metric.update(_batch([2, 0, 3, 1]), model)
    metric.update(_batch([3, 0]), model)  # DDP padding repeats pairs
    index, cls, values = metric.per_sample()
    assert list(zip(index.tolist(), cls.tolist(), strict=True)) == PAIRS
    want = reference.per_sample()[2]
    assert want[0] != want[1] and want[2] != want[3]  # the two classes of an image score differently
    _same(values, want)
    _same(metric.compute(), reference.compute())
    for got, expected in zip(extras(metric), extras(reference), strict=True):
        _same(got, expected)
