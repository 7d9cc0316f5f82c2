"""Localisation metrics: hand-computed answers, Quantus cross-checks, DDP merges and bad inputs."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from caap.batch import BACKGROUND, FOREGROUND, IGNORE, AttributionBatch
from caap.metrics import (
    AttributionMetric,
    ClassDiscrimination,
    EnergyPointingGame,
    SegmentationAP,
    SegmentationMAP,
    SegmentationMIoU,
    SegmentationPixelAccuracy,
    TolerantPointingGame,
)
from caap.metrics.functional import (
    bounding_boxes,
    class_discrimination,
    energy_pointing_game,
    grid_pointing_game,
    gur_average_precision,
    mean_iou,
    pixel_accuracy,
    pointing_game,
    segmentation_average_precision,
    segmentation_counts,
    tolerant_pointing_game,
)

nan = float("nan")


def _f64(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


# -- pointing game with a tolerance -----------------------------------------------------------------------
def test_tolerant_pointing_game_known_answers() -> None:
    # 8x8 grid on 56x56 pixels (7 px patches); the mask is the single pixel (30, 30), in patch (4, 4)
    mask = torch.zeros(2, 56, 56, dtype=torch.bool)
    mask[:, 30, 30] = True
    maps = torch.zeros(2, 8, 8)
    maps[0, 0, 0] = 1.0  # pixels 0..6: nearest (6, 6), distance sqrt(24^2 + 24^2) = 33.9
    maps[1, 2, 4] = 1.0  # rows 14..20, cols 28..34: nearest (20, 30), distance 10
    assert tolerant_pointing_game(maps, mask, 0).tolist() == [0.0, 0.0]
    assert tolerant_pointing_game(maps, mask, 9).tolist() == [0.0, 0.0]
    assert tolerant_pointing_game(maps, mask, 10).tolist() == [0.0, 1.0]
    assert tolerant_pointing_game(maps, mask, 33).tolist() == [0.0, 1.0]
    assert tolerant_pointing_game(maps, mask, 34).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        tolerant_pointing_game(maps, mask, -1)


def test_tolerant_pointing_game_equals_dilated_mask_reference() -> None:
    """Plain reference: grow the mask by a Euclidean disk (every pixel within `t` of a mask pixel), then the
    plain pointing game on the grown mask; uneven grid (7 x 5 patches on 30 x 23 pixels) included."""
    g = torch.Generator().manual_seed(8)
    for grid, size in [((8, 8), (56, 56)), ((7, 5), (30, 23))]:
        maps = torch.randn(12, *grid, generator=g)
        masks = torch.rand(12, *size, generator=g) > 0.995
        masks[0] = False
        masks[0, 3, 4] = True
        for t in (0, 1, 2.5, 6, 15):
            r = int(t)
            off = torch.arange(-r, r + 1, dtype=torch.float32)
            disk = ((off[:, None] ** 2 + off[None, :] ** 2) <= t**2).float()[None, None]
            grown = F.conv2d(masks[:, None].float(), disk, padding=r)[:, 0] > 0.5
            want = pointing_game(maps, grown)
            want[~masks.flatten(1).any(1)] = float("nan")
            torch.testing.assert_close(tolerant_pointing_game(maps, masks, t), want, equal_nan=True)


def test_tolerance_zero_is_the_plain_pointing_game() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(16, 8, 8, generator=g)
    masks = torch.rand(16, 56, 56, generator=g) > 0.97
    torch.testing.assert_close(tolerant_pointing_game(maps, masks, 0), pointing_game(maps, masks))
    # more tolerance never loses a hit
    assert (tolerant_pointing_game(maps, masks, 5) >= tolerant_pointing_game(maps, masks, 0)).all()


# -- energy pointing game, boxes ------------------------------------------------------------------------------
def test_bounding_boxes() -> None:
    m = torch.zeros(2, 6, 6, dtype=torch.bool)
    m[0, 2, 3] = m[0, 5, 1] = True
    box = bounding_boxes(m)
    want = torch.zeros(6, 6, dtype=torch.bool)
    want[2:6, 1:4] = True
    assert torch.equal(box[0], want) and not box[1].any()


def test_energy_pointing_game_known_answers() -> None:
    # 2x2 grid on 4x4 pixels: patch (i, j) covers pixels 2i..2i+1, 2j..2j+1
    maps = torch.tensor([[[3.0, 1.0], [-2.0, 0.0]]])
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 1, 2] = True  # box: rows 0..1, cols 0..2
    # positive energy: 3 x 4 px + 1 x 4 px = 16; in the box 3 x 4 + 1 x 2 = 14; on the mask 3 + 1 = 4
    torch.testing.assert_close(energy_pointing_game(maps, mask, "box"), _f64(14 / 16))
    torch.testing.assert_close(energy_pointing_game(maps, mask, "mask"), _f64(4 / 16))
    assert energy_pointing_game(-maps.abs(), mask).isnan().all()  # no positive energy: undefined
    assert energy_pointing_game(maps, torch.zeros_like(mask)).isnan().all()  # empty mask: undefined
    with pytest.raises(ValueError, match="region must be"):
        energy_pointing_game(maps, mask, "circle")


# -- class discrimination -------------------------------------------------------------------------------------
def _cells(classes_at: dict[int, tuple[int, int]], num_classes: int = 4) -> Tensor:
    """Per-class cell masks `[C, 4, 4]` of a 2x2 grid of 2x2-pixel cells."""
    m = torch.zeros(num_classes, 4, 4, dtype=torch.bool)
    for c, (i, j) in classes_at.items():
        m[c, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = True
    return m


def test_class_discrimination_known_answers() -> None:
    three = _cells({0: (0, 0), 1: (1, 1), 2: (0, 1)})
    single = _cells({3: (1, 0)})
    masks = torch.stack([three, three, single, three])
    maps = torch.tensor(
        [
            [[2.0, 1.0], [0.0, 1.0]],  # class 0: others (cells 0,1 and 1,1) hold 2 of 4
            [
                [2.0, 1.0],
                [5.0, 0.0],
            ],  # class 1: others (0,0 and 0,1) hold 3 of 8; the empty cell counts nowhere
            [[1.0, 1.0], [1.0, 1.0]],  # single-class image: undefined
            [[-1.0, -1.0], [0.0, 0.0]],  # no positive attribution: undefined
        ]
    )
    got = class_discrimination(maps, masks, torch.tensor([0, 1, 3, 2]))
    torch.testing.assert_close(got, _f64(0.5, 3 / 8, nan, nan), equal_nan=True)


# -- segmentation (Gur et al. / Chefer et al.) and LibraGrad AP -----------------------------------------------
def _seg_case() -> tuple[Tensor, Tensor]:
    maps = torch.tensor([[[4.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    gt = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt[:, :2, :2] = True
    gt[:, 2, 2] = True  # 5 foreground pixels
    return maps, gt


def test_segmentation_counts_known_answers() -> None:
    maps, gt = _seg_case()
    correct, labelled, inter, union = segmentation_counts(maps, gt, interpolation="nearest")
    # map 0: normalised [[1, 0], [0, 0]], mean 0.25 -> foreground = the top-left patch (4 px, all in the truth)
    # map 1: constant -> normalised to zeros -> nothing above the mean: all background
    torch.testing.assert_close(correct, _f64(15, 11))
    torch.testing.assert_close(labelled, _f64(16, 16))
    torch.testing.assert_close(inter, torch.tensor([[11.0, 4.0], [11.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(union, torch.tensor([[12.0, 5.0], [16.0, 5.0]], dtype=torch.float64))
    torch.testing.assert_close(pixel_accuracy(correct, labelled), _f64(15 / 16, 11 / 16))
    torch.testing.assert_close(mean_iou(inter, union), _f64((11 / 12 + 4 / 5) / 2, (11 / 16 + 0) / 2))


def test_segmentation_metrics_dataset_level() -> None:
    maps, gt = _seg_case()
    batch = _seg_batch(maps, gt)
    acc, miou = SegmentationPixelAccuracy(interpolation="nearest"), SegmentationMIoU(interpolation="nearest")
    acc.update(batch)
    miou.update(batch)
    # summed counts over the two images, then the ratio (Chefer et al.'s accumulation)
    torch.testing.assert_close(acc.compute(), torch.tensor(26 / 32, dtype=torch.float64))
    torch.testing.assert_close(miou.compute(), torch.tensor((22 / 28 + 4 / 10) / 2, dtype=torch.float64))
    torch.testing.assert_close(acc.per_sample()[2], _f64(15 / 16, 11 / 16))


def test_libragrad_ap_known_answer_and_sklearn() -> None:
    maps, gt = _seg_case()
    # map 0: 4 px tied at 4 (all foreground), 12 px tied at 0 (1 foreground):
    # AP = 4/5 * 1 + 1/5 * 5/16; map 1: all tied -> AP = share of foreground 5/16
    got = segmentation_average_precision(maps, gt, interpolation="nearest")
    torch.testing.assert_close(got, _f64(0.8 + 0.2 * 5 / 16, 5 / 16))
    g = torch.Generator().manual_seed(3)
    maps = torch.randn(5, 8, 8, generator=g)
    gt = torch.rand(5, 56, 56, generator=g) > 0.7
    up = F.interpolate(maps[:, None], size=(56, 56), mode="bilinear", align_corners=False)[:, 0]
    want = [
        average_precision_score(t.flatten().numpy(), s.flatten().numpy()) for t, s in zip(gt, up, strict=True)
    ]
    torch.testing.assert_close(segmentation_average_precision(maps, gt), _f64(*want))
    # a single pair (a batch of one map) and no pair at all
    torch.testing.assert_close(segmentation_average_precision(maps[:1], gt[:1]), _f64(want[0]))
    torch.testing.assert_close(gur_average_precision(maps[:1], gt[:1]), gur_average_precision(maps, gt)[:1])
    assert segmentation_average_precision(maps[:0], gt[:0]).shape == (0,)


def test_gur_average_precision_equals_chefer_reference() -> None:
    """Plain re-implementation of Chefer et al.'s `get_ap_scores` on `[1 - m, m]` with scikit-learn."""
    g = torch.Generator().manual_seed(4)
    maps = torch.randn(4, 8, 8, generator=g)
    gt = torch.rand(4, 56, 56, generator=g) > 0.6
    want = []
    for m, t in zip(maps, gt, strict=True):
        res = F.interpolate(m[None, None], scale_factor=7, mode="bilinear")[0, 0]
        res = (res - res.min()) / (res.max() - res.min())
        pred = torch.cat([1 - res, res]).flatten().numpy()
        onehot = torch.cat([~t, t]).flatten().numpy().astype(int)
        want.append(average_precision_score(onehot, pred))
    torch.testing.assert_close(gur_average_precision(maps, gt), _f64(*want))


def test_segmentation_map_ignores_void_pixels() -> None:
    maps, gt = _seg_case()
    valid = torch.ones_like(gt)
    valid[:, 3, :] = False  # the last row is void: 12 labelled pixels, none of them foreground-missed
    correct, labelled, _, _ = segmentation_counts(maps, gt, valid, interpolation="nearest")
    torch.testing.assert_close(labelled, _f64(12, 12))
    torch.testing.assert_close(correct, _f64(11, 7))


def test_segmentation_from_compact_map_equals_masks() -> None:
    """A compact class-id map (BACKGROUND / FOREGROUND / IGNORE) scores like the equivalent masks."""
    g = torch.Generator().manual_seed(5)
    maps = torch.randn(3, 8, 8, generator=g)
    seg = torch.full((3, 56, 56), BACKGROUND, dtype=torch.long)
    seg[:, 5:30, 10:40] = 2
    seg[1, 40:50, 40:50] = FOREGROUND  # an unnamed object counts as the target's foreground (Gur et al.)
    seg[:, :3, :] = IGNORE
    batch = AttributionBatch(
        images=torch.zeros(3, 3, 56, 56),
        maps=maps,
        classes=torch.tensor([2, 2, 2]),
        index=torch.arange(3),
        segmentation=seg,
    )
    gt = (seg == 2) | (seg == FOREGROUND)
    valid = seg != IGNORE
    for metric, want in [
        (SegmentationAP(), segmentation_average_precision(maps, gt, valid)),
        (SegmentationMAP(), gur_average_precision(maps, gt, valid)),
        (SegmentationPixelAccuracy(), pixel_accuracy(*segmentation_counts(maps, gt, valid)[:2])),
    ]:
        metric.update(batch)
        torch.testing.assert_close(metric.per_sample()[2], want)
    # the ignored rows changed the answer: they are really left out
    assert not torch.allclose(
        segmentation_average_precision(maps, gt), segmentation_average_precision(maps, gt, valid)
    )


# -- Quantus cross-checks -------------------------------------------------------------------------------------
# Quantus (pip package quantus, in the dev extras) is the reference here; where it cannot be imported these two
# tests skip, and the plain references above (dilated-mask pointing game, scikit-learn AP) still run.
def _upsampled(maps: Tensor) -> np.ndarray:
    """Nearest-upsampled maps `[P, 1, H, W]` as Quantus takes them (the pixel reading of a patch map)."""
    return F.interpolate(maps[:, None], scale_factor=7, mode="nearest").numpy()


def test_pointing_game_equals_quantus() -> None:
    """Quantus' PointingGame (`hit = any(mask at max(a))`) on the nearest-upsampled map: all pixels of the arg-max
    patch tie at the maximum, so it equals our pointing game whenever the map has a unique maximum patch."""
    quantus = pytest.importorskip("quantus", reason="quantus is in the dev extras")
    g = torch.Generator().manual_seed(6)
    maps = torch.randn(24, 8, 8, generator=g)  # continuous: a unique maximum patch
    masks = torch.rand(24, 56, 56, generator=g) > 0.99  # sparse: hits and misses
    ours = tolerant_pointing_game(maps, masks, 0)
    theirs = quantus.PointingGame(normalise=False, abs=False, disable_warnings=True).evaluate_batch(
        a_batch=_upsampled(maps), s_batch=masks[:, None].numpy()
    )
    assert 0 < float(ours.mean()) < 1  # both outcomes occur
    np.testing.assert_array_equal(ours.numpy(), np.asarray(theirs, dtype=np.float64))


def test_energy_share_equals_quantus_relevance_mass_accuracy() -> None:
    """Quantus' RelevanceMassAccuracy (attribution on the mask / total) equals the mask energy share for
    non-negative maps (where the positive part is the map itself)."""
    quantus = pytest.importorskip("quantus", reason="quantus is in the dev extras")
    g = torch.Generator().manual_seed(7)
    maps = torch.rand(12, 8, 8, generator=g)
    masks = torch.rand(12, 56, 56, generator=g) > 0.8
    ours = energy_pointing_game(maps, masks, region="mask")
    theirs = quantus.RelevanceMassAccuracy(normalise=False, abs=False, disable_warnings=True).evaluate_batch(
        a_batch=_upsampled(maps), s_batch=masks[:, None].numpy()
    )
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs, dtype=np.float64), rtol=1e-5)


# -- wrappers: DDP merges ---------------------------------------------------------------------------------------
def _seg_batch(maps: Tensor, gt: Tensor, index: list[int] | None = None) -> AttributionBatch:
    p = maps.shape[0]
    masks = gt[:, None].expand(p, 2, *gt.shape[1:]).clone()
    masks[:, 0] = False  # class 1 is the target's class
    return AttributionBatch(
        images=torch.zeros(p, 3, *gt.shape[1:]),
        maps=maps,
        classes=torch.ones(p, dtype=torch.long),
        index=torch.tensor(index if index is not None else list(range(p))),
        cell_masks=masks,
        item_masks=masks,
    )


def _fake_ddp(rank0: AttributionMetric, rank1: AttributionMetric) -> None:
    """Rank 0 runs torchmetrics' own sync path with an all-gather that returns the states of both ranks."""
    other = itertools.cycle([dim_zero_cat(getattr(rank1, attr)) for attr in rank0._reductions])
    rank0.dist_sync_fn = lambda t, group=None: [t, next(other)]
    rank0.distributed_available_fn = lambda: True


def _fg_batch(index: list[int], seed: int) -> AttributionBatch:
    """FashionGrid-like pairs on 56x56: item masks inside their 2x2 cells; image i holds classes i % 3 and 3."""
    g = torch.Generator().manual_seed(seed)
    p = len(index)
    cells = torch.zeros(p, 4, 56, 56, dtype=torch.bool)
    for row, i in enumerate(index):
        cells[row, i % 3, :28, :28] = True
        if i % 2 == 0:
            cells[row, 3, 28:, 28:] = True
    items = cells & (torch.rand(p, 1, 56, 56, generator=torch.Generator().manual_seed(99)) > 0.5)
    return AttributionBatch(
        images=torch.zeros(p, 3, 56, 56),
        maps=torch.randn(p, 8, 8, generator=g) + 0.5,
        classes=torch.tensor([i % 3 for i in index]),
        index=torch.tensor(index),
        cell_masks=cells,
        item_masks=items,
    )


@pytest.mark.parametrize(
    "make",
    [
        TolerantPointingGame,
        EnergyPointingGame,
        ClassDiscrimination,
        SegmentationPixelAccuracy,
        SegmentationMIoU,
        SegmentationMAP,
        SegmentationAP,
    ],
)
def test_two_rank_merge_equals_single_process(make: type[AttributionMetric]) -> None:
    """Rank 1 is padded with repeats of samples 0 and 1 (as Lightning's DistributedSampler does)."""
    single = make()
    single.update(_fg_batch([0, 1, 2, 3, 4, 5], seed=1))
    want = single.compute()
    r0, r1 = make(), make()
    full = _fg_batch([0, 1, 2, 3, 4, 5], seed=1)

    def part(rows: list[int]) -> AttributionBatch:
        return AttributionBatch(
            images=full.images[rows],
            maps=full.maps[rows],
            classes=full.classes[rows],
            index=full.index[rows],
            cell_masks=full.cell_masks[rows],
            item_masks=full.item_masks[rows],
        )

    r0.update(part([0, 2, 4]))
    r1.update(part([1, 3, 5]))
    r1.update(part([0, 1]))
    _fake_ddp(r0, r1)
    torch.testing.assert_close(r0.compute(), want, equal_nan=True)
    r0, r1 = make(), make()
    r0.update(part([0, 2, 4]))
    r1.update(part([1, 3, 5, 0, 1]))
    r0.merge_state(r1)
    torch.testing.assert_close(r0.compute(), want, equal_nan=True)
    assert r0.per_sample()[0].tolist() == [0, 1, 2, 3, 4, 5]


def test_class_discrimination_skips_single_class_images(caplog: pytest.LogCaptureFixture) -> None:
    metric = ClassDiscrimination()
    assert not metric.higher_is_better
    with caplog.at_level(logging.WARNING):
        metric.update(_fg_batch([0, 1, 2, 3], seed=2))
        value = metric.compute()
    values = metric.per_sample()[2]
    assert values[[1, 3]].isnan().all() and torch.isfinite(values[[0, 2]]).all()  # odd images: one class
    assert (
        torch.isfinite(value) and "single class" in caplog.text and "2 of 4 values undefined" in caplog.text
    )


# -- bad inputs --------------------------------------------------------------------------------------------------
ALL = [
    TolerantPointingGame,
    EnergyPointingGame,
    ClassDiscrimination,
    SegmentationPixelAccuracy,
    SegmentationMIoU,
    SegmentationMAP,
    SegmentationAP,
]


@pytest.mark.parametrize("make", ALL)
def test_bad_maps_and_masks_get_defined_values(make: type[AttributionMetric], caplog) -> None:
    """All-zero, constant and NaN maps and an empty target mask (class absent) next to one good pair: no crash,
    each bad pair a defined per-pair value (a number, or NaN that `compute` skips and counts), a warning, and a
    finite aggregate."""
    batch = _fg_batch([0, 2, 4, 6, 8], seed=3)
    batch.maps[1] = 0.0
    batch.maps[2] = 0.7
    batch.maps[3, 2, 2] = float("nan")
    batch.item_masks[4, batch.classes[4]] = False  # the target's object is absent
    batch.cell_masks[4, batch.classes[4]] = False
    metric = make()
    with caplog.at_level(logging.WARNING):
        metric.update(batch)
        value = metric.compute()
    values = metric.per_sample()[2]
    assert values.shape == (5,) and torch.isfinite(values[0])
    assert values[3].isnan()  # a NaN map never gives a number
    assert torch.isfinite(value)
    assert "constant map" in caplog.text and "NaN / inf" in caplog.text
    if make is not ClassDiscrimination:
        assert "empty target mask" in caplog.text


def test_metrics_need_masks() -> None:
    batch = AttributionBatch(
        images=torch.zeros(1, 3, 56, 56),
        maps=torch.rand(1, 8, 8),
        classes=torch.tensor([0]),
        index=torch.tensor([0]),
    )
    for make in ALL:
        with pytest.raises(ValueError, match="masks"):
            make().update(batch)
    with pytest.raises(ValueError, match="tolerance"):
        TolerantPointingGame(tolerance=-1)
    with pytest.raises(ValueError, match="interpolation"):
        SegmentationAP(interpolation="cubic")
    with pytest.raises(ValueError, match="mask must be"):
        EnergyPointingGame(mask="box")


def test_minus_inf_entry_gives_nan() -> None:
    """A `-inf` entry is non-finite: GridPG, energy PG and class discrimination are NaN (the positive part would
    clamp it to 0 and hide it)."""
    batch = _fg_batch([0, 2], seed=4)
    maps = batch.maps.clone()
    maps[0, 3, 3] = -float("inf")
    cells = batch.cell_masks[range(2), batch.classes]
    assert grid_pointing_game(maps, cells)[0].isnan() and grid_pointing_game(maps, cells)[1].isfinite()
    energy = energy_pointing_game(maps, batch.item_masks[range(2), batch.classes])
    assert energy[0].isnan() and energy[1].isfinite()
    discrimination = class_discrimination(maps, batch.cell_masks, batch.classes)
    assert discrimination[0].isnan() and discrimination[1].isfinite()


@pytest.mark.parametrize("make", [EnergyPointingGame, ClassDiscrimination])
def test_constant_positive_map_is_defined_and_said_so(make: type[AttributionMetric], caplog) -> None:
    """A positive constant spreads its energy evenly: the value is the region's pixel share, and the warning
    says so; only a zero / negative map is reported as having no positive attribution."""
    batch = _fg_batch([0, 2], seed=5)
    batch.maps[0] = 0.7
    batch.maps[1] = 0.0
    metric = make()
    with caplog.at_level(logging.WARNING):
        metric.update(batch)
        metric.compute()
    values = metric.per_sample()[2]
    if make is EnergyPointingGame:
        box = bounding_boxes(batch.item_masks[[0], batch.classes[[0]]])
        share = box.double().mean()
    else:
        share = torch.tensor(0.25, dtype=torch.float64)  # the other class's 28x28 cell of a 56x56 image
    torch.testing.assert_close(values[0], share)
    assert values[1].isnan()
    assert "1 of 2 maps in this batch: constant map (positive constant: value =" in caplog.text
    assert "1 of 2 values undefined (skipped in the mean): no positive attribution" in caplog.text
    assert caplog.text.count("no positive attribution") == 1


def test_undefined_reasons_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """Class discrimination on single-class images: one warning for the run (at compute, with the reason and
    the run's count), not one per batch plus one at compute."""
    metric = ClassDiscrimination()
    with caplog.at_level(logging.WARNING):
        metric.update(_fg_batch([0, 1], seed=2))
        metric.update(_fg_batch([2, 3], seed=3))
        metric.compute()
    records = [r for r in caplog.records if "single class" in r.getMessage()]
    assert len(records) == 1
    assert (
        "2 of 4 values undefined (skipped in the mean): image holds a single class" in records[0].getMessage()
    )
