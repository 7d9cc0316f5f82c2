"""Metrics: known answers for the pointing games and AUC, token removal vs physical removal, DDP de-dup."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.utilities.data import dim_zero_cat

from caap.batch import AttributionBatch
from caap.metrics import (
    AttributionMetric,
    GridPointingGame,
    PointingGame,
    TokenDeletionAUC,
    TokenInsertionAUC,
)
from caap.metrics.functional import (
    DEFAULT_FRACTIONS,
    curve_auc,
    deletion_curves,
    grid_pointing_game,
    insertion_curves,
    keep_masks,
    pointing_game,
    token_perturbation_curves,
)
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


# -- AUC, orders ------------------------------------------------------------------------------------------
def test_trapezoid_auc_known_answers() -> None:
    curves = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        curve_auc(curves[:1], [0.0, 0.5, 1.0]), torch.tensor([0.5], dtype=torch.float64)
    )
    torch.testing.assert_close(
        curve_auc(curves[1:], [0.0, 0.25, 1.0]), torch.tensor([0.875], dtype=torch.float64)
    )
    flat = torch.full((1, 11), 0.3, dtype=torch.float64)
    torch.testing.assert_close(curve_auc(flat), torch.tensor([0.3], dtype=torch.float64))
    with pytest.raises(ValueError, match="increasing"):
        curve_auc(curves, [0.0, 1.0, 0.5])


def test_keep_masks_order_and_ties() -> None:
    assert DEFAULT_FRACTIONS[0] == 0.0 and DEFAULT_FRACTIONS[-1] == 1.0 and len(DEFAULT_FRACTIONS) == 11
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.3]], [[1.0, 1.0], [1.0, 1.0]]])
    f = [0.0, 0.25, 0.5, 1.0]
    dele = keep_masks(maps, f, "deletion")
    ins = keep_masks(maps, f, "insertion")
    assert dele.shape == (2, 4, 4)
    # ranking of map 0: patch 1 (0.9), 2 (0.5), 3 (0.3), 0 (0.1); constant map 1: reading order 0, 1, 2, 3
    assert dele[0].tolist() == [
        [True] * 4,
        [True, False, True, True],
        [True, False, False, True],
        [False] * 4,
    ]
    assert ins[0].tolist() == [
        [False] * 4,
        [False, True, False, False],
        [False, True, True, False],
        [True] * 4,
    ]
    assert dele[1].tolist() == [
        [True] * 4,
        [False, True, True, True],
        [False, False, True, True],
        [False] * 4,
    ]
    assert torch.equal(ins[1], ~dele[1])


# -- token removal ---------------------------------------------------------------------------------------
def _physical_reference(
    model: ViTClassifier, images: Tensor, keep: Tensor, classes: Tensor, score: str
) -> Tensor:
    """One (image, fraction) at a time: gather the kept tokens, run the blocks without a mask, then the head."""
    p, k, _ = keep.shape
    npre = model.num_prefix_tokens
    m = model.model
    out = torch.empty(p, k)
    with torch.no_grad():
        r0 = model.embed(images)
        for i in range(p):
            for j in range(k):
                idx = torch.cat([torch.arange(npre), npre + keep[i, j].nonzero().flatten()])
                empty_pool = m.global_pool != "token" and not (npre and m.pool_include_prefix)
                if empty_pool and not keep[i, j].any():  # nothing to pool: the documented all-zero feature
                    logits = m.head(m.fc_norm(torch.zeros(1, r0.shape[-1])))
                else:
                    logits = model.head(model.forward_blocks(r0[i : i + 1, idx]))
                values = model.probabilities(logits) if score == "prob" else logits
                out[i, j] = values[0, classes[i]]
    return out


@pytest.mark.parametrize(
    "kwargs",
    [None, dict(global_pool="avg", class_token=False), dict(global_pool="avg", pool_include_prefix=True)],
    ids=["cls", "avg-noprefix", "avg-with-prefix"],
)
@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_masked_batch_equals_physical_removal(kwargs: dict | None, mode: str) -> None:
    model = _model(kwargs)
    g = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 56, 56, generator=g)
    maps = torch.randn(2, 8, 8, generator=g)
    maps[1, :4] = 0.0  # ties
    classes = torch.tensor([2, 7])
    f = [0.0, 0.1, 0.37, 0.5, 0.9, 1.0]
    score = "prob" if mode == "deletion" else "logit"
    curves = token_perturbation_curves(model, images, maps, classes, f, mode, score, max_batch=5)
    ref = _physical_reference(model, images, keep_masks(maps, f, mode), classes, score)
    torch.testing.assert_close(curves, ref, atol=1e-5, rtol=0)


def test_registers_avg_pool_model() -> None:
    """A timm test ViT with a register token and avg pooling (DINOv2-like layout), 4x4 patch grid."""
    model = _model(name="test_vit2", multilabel=False)
    g = torch.Generator().manual_seed(5)
    images, maps, classes = (
        torch.rand(2, 3, 64, 64, generator=g),
        torch.randn(2, 4, 4, generator=g),
        torch.tensor([1, 3]),
    )
    for mode in ("deletion", "insertion"):
        curves = token_perturbation_curves(model, images, maps, classes, None, mode, "prob")
        ref = _physical_reference(model, images, keep_masks(maps, None, mode), classes, "prob")
        torch.testing.assert_close(curves, ref, atol=1e-5, rtol=0)


def test_curve_endpoints(cls_model: ViTClassifier) -> None:
    g = torch.Generator().manual_seed(6)
    images, maps, classes = (
        torch.rand(3, 3, 56, 56, generator=g),
        torch.randn(3, 8, 8, generator=g),
        torch.tensor([0, 4, 9]),
    )
    with torch.no_grad():
        logits = cls_model(images)
    prob = cls_model.probabilities(logits)[range(3), classes]
    dele = deletion_curves(cls_model, images, maps, classes)
    ins = insertion_curves(cls_model, images, maps, classes)
    assert dele.shape == ins.shape == (3, 11)
    torch.testing.assert_close(dele[:, 0], prob, atol=1e-5, rtol=0)
    torch.testing.assert_close(ins[:, -1], prob, atol=1e-5, rtol=0)
    torch.testing.assert_close(dele[:, -1], ins[:, 0])  # both: prefix tokens only
    ins_logit = insertion_curves(cls_model, images, maps, classes, score="logit")
    torch.testing.assert_close(ins_logit[:, -1], logits[range(3), classes], atol=1e-5, rtol=0)


def _additive_model() -> tuple[ViTClassifier, Tensor]:
    """Blocks are the identity, no norms, avg pool: logit_c = b_c + mean over kept patches of s_c[i]."""
    model = _model(dict(global_pool="avg", class_token=False))
    m = model.model
    with torch.no_grad():
        for block in m.blocks:
            for lin in (block.attn.proj, block.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    m.norm, m.fc_norm = nn.Identity(), nn.Identity()
    return model, m.head.weight.detach()


def test_known_answer_additive_model() -> None:
    model, w = _additive_model()
    g = torch.Generator().manual_seed(7)
    images = torch.rand(1, 3, 56, 56, generator=g)
    c = 3
    with torch.no_grad():
        s = (model.embed(images)[0] @ w[c]).double()  # [64] per-patch contributions, the true ranking
    b = float(model.model.head.bias[c].detach())
    n = s.numel()
    f = [0.0, 0.25, 0.5, 0.75, 1.0]
    ranked = s.sort(descending=True).values
    counts = [round(x * n) for x in f]
    want_del = [float(ranked[k:].mean()) + b if k < n else b for k in counts]
    want_ins = [float(ranked[:k].mean()) + b if k > 0 else b for k in counts]
    maps = s.float().reshape(1, 8, 8)
    classes = torch.tensor([c])
    dele = deletion_curves(model, images, maps, classes, f, score="logit")
    ins = insertion_curves(model, images, maps, classes, f, score="logit")
    torch.testing.assert_close(
        dele[0].double(), torch.tensor(want_del, dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        ins[0].double(), torch.tensor(want_ins, dtype=torch.float64), atol=1e-4, rtol=0
    )
    # the true ranking beats its reverse on both metrics
    rev = deletion_curves(model, images, -maps, classes, f, score="logit")
    assert curve_auc(dele, f) < curve_auc(rev, f)
    rev_ins = insertion_curves(model, images, -maps, classes, f, score="logit")
    assert curve_auc(ins, f) > curve_auc(rev_ins, f)


def test_known_answer_one_patch_model() -> None:
    """The logit depends on one patch only: deleting it first drops the score to the no-patch value at once."""
    model, _ = _additive_model()
    images = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        r0 = model.embed(images)[0]
        model.model.head.weight.zero_()
        model.model.head.bias.zero_()
        d = torch.zeros(r0.shape[-1])
        d[0] = 1.0
        model.model.head.weight[0] = d
        model.model.pos_embed[0, :, 0] -= r0[:, 0]  # every patch's coordinate 0 cancelled ...
        model.model.pos_embed[0, 37, 0] += 64.0  # ... except patch 37, whose contribution is 64
    maps = torch.zeros(1, 8, 8)
    maps.view(-1)[37] = 1.0
    f = [0.0, 0.5, 1.0]
    dele = deletion_curves(model, images, maps, torch.tensor([0]), f, score="logit")
    ins = insertion_curves(model, images, maps, torch.tensor([0]), f, score="logit")
    # deletion: 64 / 64 = 1 with all patches, then 0; insertion: 0 with none, 64 / 32 = 2 with the top half
    torch.testing.assert_close(dele[0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(ins[0], torch.tensor([0.0, 2.0, 1.0]), atol=1e-4, rtol=0)


def test_nan_map_gives_nan_curve(cls_model: ViTClassifier) -> None:
    maps = torch.randn(2, 8, 8)
    maps[1, 0, 0] = float("nan")
    curves = deletion_curves(cls_model, torch.rand(2, 3, 56, 56), maps, torch.tensor([0, 1]), [0.0, 0.5, 1.0])
    assert torch.isfinite(curves[0]).all() and curves[1].isnan().all()


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
    f = [0.0, 0.5, 1.0]
    dele, ins = TokenDeletionAUC(fractions=f), TokenInsertionAUC(fractions=f, score="logit")
    assert dele.requires_model and ins.requires_model
    assert not dele.higher_is_better and ins.higher_is_better
    with pytest.raises(ValueError, match="ViTClassifier"):
        dele.update(_batch([0], maps[:1], [0], images[:1]))
    single = TokenDeletionAUC(fractions=f)
    single.update(_batch([0, 1, 2], maps, [0, 5, 9], images), cls_model)
    r0, r1 = TokenDeletionAUC(fractions=f), TokenDeletionAUC(fractions=f)
    r0.update(_batch([0, 1], maps[:2], [0, 5], images[:2]), cls_model)
    r1.update(_batch([2, 0], maps[[2, 0]], [9, 0], images[[2, 0]]), cls_model)  # 0 padded again
    _fake_ddp(r0, r1)
    torch.testing.assert_close(r0.compute(), single.compute())
    frac, mean = r0.curve()
    _, mean1 = single.curve()
    torch.testing.assert_close(mean, mean1)
    assert frac.tolist() == f and mean.shape == (3,)
    _, _, curves = single.per_sample_curves()
    torch.testing.assert_close(single.compute(), curve_auc(curves, f).mean())
    torch.testing.assert_close(mean1, curves.mean(0))

    ins.update(_batch([0, 1, 2], maps, [0, 5, 9], images), cls_model)
    with torch.no_grad():
        logits = cls_model(images)[range(3), [0, 5, 9]]
    torch.testing.assert_close(ins.curve()[1][-1], logits.double().mean(), atol=1e-5, rtol=0)


def test_token_metric_nan_map_skipped(cls_model: ViTClassifier, caplog: pytest.LogCaptureFixture) -> None:
    maps = torch.randn(2, 8, 8)
    maps[0] = float("nan")
    metric = TokenDeletionAUC(fractions=[0.0, 1.0])
    with caplog.at_level(logging.WARNING):
        metric.update(_batch([0, 1], maps, [0, 1], torch.rand(2, 3, 56, 56)), cls_model)
        value = metric.compute()
    assert math.isfinite(float(value)) and "1 of 2 values undefined" in caplog.text
    assert torch.isfinite(metric.curve()[1]).all()


def test_sub_results_take_their_metric_direction() -> None:
    from caap.metrics import MIF, CascadingRandomisation, GridPointingGame
    from caap.metrics.base import higher_is_better

    metrics = {"sanity": CascadingRandomisation(), "mif": MIF(), "grid": GridPointingGame()}
    assert not higher_is_better("sanity/block3", metrics) and not higher_is_better("sanity", metrics)
    assert not higher_is_better("mif", metrics) and higher_is_better("grid", metrics)
    assert higher_is_better("unknown", metrics)
