"""Metrics: known answers for the pointing games and the curve area, curve metrics' wrappers, DDP de-dup."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from caap.batch import AttributionBatch
from caap.metrics import LIF, MIF, AttributionMetric, CurveMetric, GridPointingGame, PointingGame
from caap.metrics.functional import grid_pointing_game, pointing_game
from caap.metrics.functional.faithfulness import faithfulness_curves
from caap.models.build import build_model
from caap.models.vit import ViTClassifier

FG = "vit_fashiongrid_patch7_56"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is fastest, and far faster than two when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _model(kwargs: dict | None = None, name: str = FG, multilabel: bool = True) -> ViTClassifier:
    torch.manual_seed(1)
    return build_model(name, multilabel=multilabel, kwargs=kwargs)


@pytest.fixture(scope="module")
def cls_model() -> ViTClassifier:
    return _model()


@pytest.fixture(scope="module")
def avg_model() -> ViTClassifier:
    return _model(dict(global_pool="avg", class_token=False))


# -- pointing games ---------------------------------------------------------------------------------------
def test_grid_pointing_game_known_answers() -> None:
    maps = torch.tensor([[[2.0, -1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]])
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # the top-left cell = patch (0, 0): 2 of the positive mass 4
    masks[1, 0, 0] = True  # one pixel of the 4 of patch (0, 0): 1 * 1 / (1 * 4)
    masks[2, :2, :2] = True  # all positive mass outside the cell
    torch.testing.assert_close(
        grid_pointing_game(maps, masks), torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64)
    )


def test_grid_pointing_game_undefined_and_uneven_grid() -> None:
    maps = torch.tensor([[[0.0, -1.0], [-2.0, 0.0]], [[float("nan"), 1.0], [1.0, 1.0]]])
    out = grid_pointing_game(maps, torch.ones(2, 4, 4, dtype=torch.bool))
    assert out.isnan().all()
    # 5x5 pixels on a 2x2 grid: the result equals the pixel-level ratio on the nearest-upsampled map
    g = torch.Generator().manual_seed(3)
    maps = torch.randn(4, 2, 2, generator=g)
    maps[:, 0, 0] = 1.0  # at least one positive value
    masks = torch.rand(4, 5, 5, generator=g) > 0.5
    up = F.interpolate(maps[:, None], size=(5, 5), mode="nearest")[:, 0].double().clamp_min(0)
    ref = (up * masks).flatten(1).sum(1) / up.flatten(1).sum(1)
    torch.testing.assert_close(grid_pointing_game(maps, masks), ref)


def test_pointing_game_known_answers() -> None:
    maps = torch.tensor([[[0.0, 3.0], [3.0, 1.0]]]).repeat(3, 1, 1)  # tie: the first max is patch (0, 1)
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, 0, 3] = True  # inside patch (0, 1)
    masks[1, 2:, :2] = True  # patch (1, 0), the tied second max
    masks[2, 0, 1] = True  # patch (0, 0)
    out = pointing_game(maps, masks)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert pointing_game(torch.full((1, 2, 2), float("nan")), masks[:1]).isnan().all()


# -- curve area -------------------------------------------------------------------------------------------
class _Axis(CurveMetric):
    """A curve metric with a given axis, to check the area."""

    def __init__(self, x: list[float]) -> None:
        super().__init__()
        self.x = torch.tensor(x, dtype=torch.float64)

    def axis(self) -> Tensor:
        return self.x


def test_trapezoid_auc_known_answers() -> None:
    curves = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        _Axis([0.0, 0.5, 1.0]).auc(curves[:1]), torch.tensor([0.5], dtype=torch.float64)
    )
    torch.testing.assert_close(
        _Axis([0.0, 0.25, 1.0]).auc(curves[1:]), torch.tensor([0.875], dtype=torch.float64)
    )
    flat = torch.full((1, 11), 0.3, dtype=torch.float64)
    torch.testing.assert_close(
        _Axis([i / 10 for i in range(11)]).auc(flat), torch.tensor([0.3], dtype=torch.float64)
    )
    torch.testing.assert_close(
        MIF(ratios=[0.5, 1.0]).auc(curves[:1]), torch.tensor([0.5], dtype=torch.float64)
    )
    nan = torch.tensor([[1.0, float("nan"), 0.0]], dtype=torch.float64)
    assert _Axis([0.0, 0.5, 1.0]).auc(nan).isnan().all()


# -- metric wrappers, de-dup, NaN handling ---------------------------------------------------------------
def _batch(
    index: list[int], maps: Tensor, classes: list[int], images: Tensor | None = None, masks: bool = True
):
    p = len(index)
    cell = None
    if masks:
        cell = torch.zeros(p, 10, 56, 56, dtype=torch.bool)
        cell[:, :, :28, :28] = True  # every class's cell: the top-left quadrant
    return AttributionBatch(
        images=images if images is not None else torch.zeros(p, 3, 56, 56),
        maps=maps,
        classes=torch.tensor(classes),
        index=torch.tensor(index),
        cell_masks=cell,
        item_masks=cell,
    )


def _quadrant_map(inside: float, outside: float) -> Tensor:
    m = torch.full((8, 8), outside)
    m[:4, :4] = inside
    return m


def test_grid_pointing_game_metric_and_nan(caplog: pytest.LogCaptureFixture) -> None:
    metric = GridPointingGame()
    assert metric.higher_is_better and not metric.requires_model
    maps = torch.stack(
        [_quadrant_map(1.0, 0.0), _quadrant_map(1.0, 1.0), torch.zeros(8, 8), -torch.ones(8, 8)]
    )
    with caplog.at_level(logging.WARNING):
        metric.update(_batch([0, 1, 2, 3], maps, [1, 1, 1, 1]))
        value = metric.compute()
    torch.testing.assert_close(value, torch.tensor((1.0 + 0.25) / 2, dtype=torch.float64))
    assert "2 of 4 values undefined" in caplog.text
    idx, _, vals = metric.per_sample()
    assert idx.tolist() == [0, 1, 2, 3] and vals[2:].isnan().all()


def test_pointing_metrics_need_masks() -> None:
    batch = _batch([0], torch.zeros(1, 8, 8), [0], masks=False)
    with pytest.raises(ValueError, match=r"GridPointingGame.*no masks"):
        GridPointingGame().update(batch)
    with pytest.raises(ValueError, match=r"PointingGame.*no masks"):
        PointingGame().update(batch)
    hit = PointingGame(mask="cell")
    hit.update(_batch([0, 1], torch.stack([_quadrant_map(2.0, 1.0), _quadrant_map(1.0, 2.0)]), [0, 0]))
    torch.testing.assert_close(hit.compute(), torch.tensor(0.5, dtype=torch.float64))


class _Fixed(AttributionMetric):
    """Value = the map's sum: an easy metric to watch de-duplication with."""

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        return batch.maps.flatten(1).sum(1)


def _fake_ddp(rank0: AttributionMetric, rank1: AttributionMetric) -> None:
    """Make rank 0 run torchmetrics' own sync path (in `compute`, `curve`) with an all-gather that returns the
    states of both ranks."""
    other = itertools.cycle([dim_zero_cat(getattr(rank1, attr)) for attr in rank0._reductions])

    def gather(t: Tensor, group: object = None) -> list[Tensor]:
        return [t, next(other)]

    rank0.dist_sync_fn = gather
    rank0.distributed_available_fn = lambda: True


def test_ddp_dedup_equals_single_process() -> None:
    g = torch.Generator().manual_seed(9)
    maps = torch.randn(6, 2, 2, generator=g)
    index = [0, 1, 2, 3, 4, 5]
    classes = [1, 0, 1, 2, 2, 0]
    single = _Fixed()
    single.update(_batch(index, maps, classes, masks=False))
    merged = _Fixed()
    merged.update(_batch([0], maps[:1], [1], masks=False))  # marks it updated; states replaced below
    want = single.compute()
    torch.testing.assert_close(want, maps.flatten(1).sum(1).double().mean())

    # two ranks: the DistributedSampler pads rank 1 by repeating samples 0 and 1
    def ranks() -> tuple[_Fixed, _Fixed]:
        r0, r1 = _Fixed(), _Fixed()
        r0.update(_batch([0, 2], maps[[0, 2]], [1, 1], masks=False))
        r0.update(_batch([4], maps[[4]], [2], masks=False))
        r1.update(_batch([1, 3, 5], maps[[1, 3, 5]], [0, 2, 0], masks=False))
        r1.update(_batch([0, 1], maps[[0, 1]], [1, 0], masks=False))
        return r0, r1

    r0, r1 = ranks()
    # manual merge, as after torchmetrics' "cat" reduction: concatenated tensors
    for attr in ("values", "sample_index", "sample_class"):
        setattr(merged, attr, torch.cat([dim_zero_cat(getattr(r, attr)) for r in (r0, r1)]))
    torch.testing.assert_close(merged.compute(), want)
    assert merged.per_sample()[0].tolist() == index

    r0, r1 = ranks()
    _fake_ddp(r0, r1)
    torch.testing.assert_close(r0.compute(), want)
    assert r0.per_sample()[0].tolist() == [0, 2, 4]  # local states are restored after compute

    r0, r1 = ranks()
    r0.merge_state(r1)
    torch.testing.assert_close(r0.compute(), want)


def test_token_metrics_curves_and_dedup(cls_model: ViTClassifier) -> None:
    g = torch.Generator().manual_seed(10)
    images, maps = torch.rand(3, 3, 56, 56, generator=g), torch.randn(3, 8, 8, generator=g)
    ratios = [0.5, 1.0]
    dele, ins = MIF(ratios=ratios), LIF(ratios=ratios, score="logit")
    assert dele.requires_model and ins.requires_model
    assert not dele.higher_is_better and ins.higher_is_better
    with pytest.raises(ValueError, match="ViTClassifier"):
        dele.update(_batch([0], maps[:1], [0], images[:1]))
    single = MIF(ratios=ratios)
    single.update(_batch([0, 1, 2], maps, [0, 5, 9], images), cls_model)
    r0, r1 = MIF(ratios=ratios), MIF(ratios=ratios)
    r0.update(_batch([0, 1], maps[:2], [0, 5], images[:2]), cls_model)
    r1.update(_batch([2, 0], maps[[2, 0]], [9, 0], images[[2, 0]]), cls_model)  # 0 padded again
    _fake_ddp(r0, r1)
    torch.testing.assert_close(r0.compute(), single.compute())
    axis, mean = r0.curve()
    _, mean1 = single.curve()
    torch.testing.assert_close(mean, mean1)
    assert axis.tolist() == [0.0, *ratios] and mean.shape == (3,)
    _, _, curves = single.per_sample_curves()
    want = torch.trapezoid(curves, x=torch.tensor([0.0, *ratios], dtype=torch.float64), dim=1).mean()
    torch.testing.assert_close(single.compute(), want)
    torch.testing.assert_close(mean1, curves.mean(0))
    ref = faithfulness_curves(cls_model, images, maps, torch.tensor([0, 5, 9]), "mif", "prob", ratios)
    torch.testing.assert_close(curves, ref.double())

    ins.update(_batch([0, 1, 2], maps, [0, 5, 9], images), cls_model)
    with torch.no_grad():
        logits = cls_model(images)[range(3), [0, 5, 9]]
    torch.testing.assert_close(ins.curve()[1][0], logits.double().mean(), atol=1e-5, rtol=0)


def test_token_metric_nan_map_skipped(cls_model: ViTClassifier, caplog: pytest.LogCaptureFixture) -> None:
    maps = torch.randn(2, 8, 8)
    maps[0] = float("nan")
    metric = MIF(ratios=[1.0])
    with caplog.at_level(logging.WARNING):
        metric.update(_batch([0, 1], maps, [0, 1], torch.rand(2, 3, 56, 56)), cls_model)
        value = metric.compute()
    assert math.isfinite(float(value)) and "1 of 2 values undefined" in caplog.text
    assert torch.isfinite(metric.curve()[1]).all()
    _, _, curves = metric.per_sample_curves()
    assert curves[0].isnan().all() and torch.isfinite(curves[1]).all()


def test_sub_results_take_their_metric_direction() -> None:
    from caap.metrics import MIF, CascadingRandomisation, GridPointingGame
    from caap.metrics.base import higher_is_better

    metrics = {"sanity": CascadingRandomisation(), "mif": MIF(), "grid": GridPointingGame()}
    assert not higher_is_better("sanity/block3", metrics) and not higher_is_better("sanity", metrics)
    assert not higher_is_better("mif", metrics) and higher_is_better("grid", metrics)
    assert higher_is_better("unknown", metrics)
