"""Faithfulness metrics: LibraGrad MIF / LIF / SRG (drop and replace), RISE pixel deletion / insertion.

Known answers for the pure functions, plain per-(pair, step) reference loops for every metric, a cross-check of
the pixel deletion curve against Quantus' PixelFlipping, shared forward passes, DDP merges, degenerate maps.
"""

from __future__ import annotations

import itertools
import logging
import math
from decimal import Decimal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.utilities.data import dim_zero_cat

from caap.batch import AttributionBatch
from caap.metrics import LIF, MIF, SRG, PixelDeletion, PixelInsertion
from caap.metrics.base import AttributionMetric
from caap.metrics.functional.faithfulness import (
    DEFAULT_RATIOS,
    check_ratios,
    faithfulness_curves,
    higher_is_better,
    removal_axis,
    removal_counts,
    token_removal_outcomes,
)
from caap.metrics.functional.pixel_perturbation import (
    baseline_images,
    pixel_perturbation_outcomes,
    pixel_ranks,
    step_counts,
)
from caap.models.build import build_model
from caap.models.vit import ViTClassifier
from caap.references import build_token_reference, reference_tokens
from caap.scores import Outcomes, score_curves

FG = "vit_fashiongrid_patch7_56"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(kwargs: dict | None = None, name: str = FG, multilabel: bool = True) -> ViTClassifier:
    torch.manual_seed(1)
    return build_model(name, multilabel=multilabel, kwargs=kwargs).eval()


@pytest.fixture(scope="module")
def cls_model() -> ViTClassifier:
    return _model()


def _inputs(p: int = 3, seed: int = 0, grid: int = 8, size: int = 56) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(p, grid, grid, generator=g)
    return torch.rand(p, 3, size, size, generator=g), maps, torch.arange(p) * 3 % 10


def _batch(images: Tensor, maps: Tensor, classes: Tensor, index: list[int] | None = None) -> AttributionBatch:
    idx = torch.tensor(index) if index is not None else torch.arange(maps.shape[0])
    return AttributionBatch(images=images, maps=maps, classes=classes, index=idx)


# -- pure functions: known answers ------------------------------------------------------------------------
def test_ratios_axis_and_counts() -> None:
    assert DEFAULT_RATIOS[0] == 0.1 and DEFAULT_RATIOS[-1] == 0.9 and len(DEFAULT_RATIOS) == 9
    assert removal_axis(None).tolist() == pytest.approx([0.0, *DEFAULT_RATIOS])
    assert check_ratios([0.0, 0.5, 1.0]).tolist() == [0.5, 1.0]  # a leading 0 is the unmasked end anyway
    assert removal_counts(64, [0.1, 0.5, 0.9, 1.0], "mif") == [6, 32, 57, 64]
    assert removal_counts(64, [0.1, 0.5, 0.9, 1.0], "lif") == [7, 32, 58, 64]
    assert removal_counts(90, [0.7], "mif") == [63]  # exact floor; float int(0.7 * 90) is 62
    assert removal_counts(10, [0.3], "lif") == [3]  # keeps floor(0.7 * 10) = 7, not float 1 - 0.3 noise
    with pytest.raises(ValueError, match="order"):
        removal_counts(64, None, "srg")
    for bad in ([], [0.5, 0.5], [0.2, 0.1], [1.5], [-0.1]):
        with pytest.raises(ValueError, match="ratios"):
            check_ratios(bad)


# LibraGrad's official counts, written out from the official code (decompv `transform_mask_by_attributions`,
# timm-fork `threshold_filter`: the mask of the top `int(q * N)` patches for q = 0.1, ..., 0.9). MIF at r is
# `nratio r` (drops the top int(r N)); LIF at r is `topratio (1 - r)` (keeps the top int((1 - r) N)).
# Columns: r = 0.1, ..., 0.9. Patches removed.
OFFICIAL_REMOVED = {
    (64, "mif"): [6, 12, 19, 25, 32, 38, 44, 51, 57],
    (64, "lif"): [64 - k for k in (57, 51, 44, 38, 32, 25, 19, 12, 6)],
    (196, "mif"): [19, 39, 58, 78, 98, 117, 137, 156, 176],
    (196, "lif"): [196 - k for k in (176, 156, 137, 117, 98, 78, 58, 39, 19)],
}


@pytest.mark.parametrize(("n", "order"), list(OFFICIAL_REMOVED))
def test_removal_counts_are_libragrad_official(n: int, order: str) -> None:
    assert removal_counts(n, DEFAULT_RATIOS, order) == OFFICIAL_REMOVED[n, order]
    assert removal_counts(n, None, order) == OFFICIAL_REMOVED[n, order]


def test_curves_use_the_official_counts(cls_model: ViTClassifier) -> None:
    """The MIF / LIF outcomes at each default ratio equal those of removing exactly the official number of
    top / bottom patches by hand (r = 0.1: MIF drops 6, LIF drops 7 of 64)."""
    images, maps, classes = _inputs(1, seed=5)
    got = token_removal_outcomes(cls_model, images, maps, classes, None, ("mif", "lif"), "drop")
    ranking = maps[0].flatten().sort(descending=True, stable=True).indices
    npre = cls_model.num_prefix_tokens
    with torch.no_grad():
        r0 = cls_model.embed(images)
        for order in ("mif", "lif"):
            for s, c in enumerate(OFFICIAL_REMOVED[64, order]):
                kept = ranking[c:] if order == "mif" else ranking[: 64 - c]
                idx = list(range(npre)) + sorted(npre + int(j) for j in kept)
                want = cls_model.head(cls_model.forward_blocks(r0[:, idx]))[0, classes[0]]
                torch.testing.assert_close(got[order].logit[0, s], want, atol=2e-5, rtol=0)


def test_score_curves_known_answers() -> None:
    p0, p1, p2 = 0.8, 0.5, 0.2
    full = Outcomes(torch.tensor([2.0]), torch.tensor([math.log(p0)]), torch.tensor([1.0]))
    pert = Outcomes(
        torch.tensor([[1.0, -1.0]]), torch.tensor([[math.log(p1), math.log(p2)]]), torch.tensor([[1.0, 0.0]])
    )
    want = {
        "prob": [p0, p1, p2],
        "logit": [2.0, 1.0, -1.0],
        "top1": [1.0, 1.0, 0.0],
        "aopc": [0.0, p0 - p1, p0 - p2],
        "log_odds": [0.0, math.log(p0 / p1), math.log(p0 / p2)],
    }
    for score, values in want.items():
        torch.testing.assert_close(
            score_curves(full, pert, score)[0], torch.tensor(values), atol=1e-6, rtol=0
        )
    nan = Outcomes(*(torch.full((1, 2), float("nan")) for _ in range(3)))
    assert (
        score_curves(full, nan, "aopc").isnan().all()
    )  # an undefined map: the whole curve, unmasked end too
    with pytest.raises(ValueError, match="allowed"):
        score_curves(full, pert, "auc")


def test_higher_is_better_table() -> None:
    for score in ("prob", "logit", "top1"):
        assert not higher_is_better("mif", score) and higher_is_better("lif", score)
        assert higher_is_better("srg", score)
    for score in ("aopc", "log_odds"):  # drops from the unperturbed value: flipped
        assert higher_is_better("mif", score) and not higher_is_better("lif", score)
        assert not higher_is_better("srg", score)
    assert MIF().higher_is_better is False and MIF(score="aopc").higher_is_better is True
    assert SRG(score="log_odds").higher_is_better is False and LIF(score="top1").higher_is_better is True
    assert PixelInsertion().higher_is_better and not PixelDeletion().higher_is_better


def test_pixel_ranks_and_steps_known_answers() -> None:
    maps = torch.tensor([[[0.0, 2.0], [1.0, 2.0]]])
    rank = pixel_ranks(maps, (2, 4), "nearest")  # patch (0, 1) and (1, 1) tie at 2: the earlier first
    assert rank.reshape(2, 4).tolist() == [[6, 7, 0, 1], [4, 5, 2, 3]]
    assert step_counts(8, 4) == [0, 2, 4, 6, 8] and step_counts(10, 3) == [0, 3, 7, 10]
    with pytest.raises(ValueError, match="upsample"):
        pixel_ranks(maps, (2, 4), "bicubic")


# -- token removal: plain per-(pair, step) reference loops -----------------------------------------------
def _official_removed(n: int, r: float, order: str) -> int:
    """LibraGrad's count, written independently with decimals: MIF drops int(r n), LIF keeps int((1 - r) n)."""
    q = Decimal(repr(r))
    return int(q * n) if order == "mif" else n - int((1 - q) * n)


def _plain_token_curve(
    model: ViTClassifier, images: Tensor, maps: Tensor, classes: Tensor, ratios: list[float], order: str
) -> Tensor:
    """One sequence per (pair, ratio): gather the kept tokens by hand and run the whole model."""
    m, npre = model.model, model.num_prefix_tokens
    p, n = maps.shape[0], maps[0].numel()
    out = torch.empty(p, len(ratios) + 1)
    with torch.no_grad():
        for i in range(p):
            out[i, 0] = model(images[i : i + 1])[0, classes[i]]
            r0 = model.embed(images[i : i + 1])
            ranking = sorted(range(n), key=lambda j: (-float(maps[i].flatten()[j]), j))
            for s, r in enumerate(ratios):
                c = _official_removed(n, r, order)
                kept = ranking[c:] if order == "mif" else ranking[: n - c]
                idx = list(range(npre)) + sorted(npre + j for j in kept)
                if not kept and m.global_pool != "token" and not (npre and m.pool_include_prefix):
                    logits = m.head(m.fc_norm(torch.zeros(1, r0.shape[-1])))  # the documented empty pool
                else:
                    logits = model.head(model.forward_blocks(r0[:, idx]))
                out[i, s + 1] = logits[0, classes[i]]
    return out


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        (FG, None),
        (FG, dict(global_pool="avg", class_token=False)),
        (FG, dict(global_pool="avg", pool_include_prefix=True)),
        ("test_vit2", None),  # a register token and avg pooling (DINOv2-like), 4x4 grid
    ],
    ids=["cls", "avg-noprefix", "avg-with-prefix", "registers-avg"],
)
def test_token_drop_equals_plain_loop(name: str, kwargs: dict | None) -> None:
    model = _model(kwargs, name, multilabel=name == FG)
    grid, size = (8, 56) if name == FG else (4, 64)
    images, maps, classes = _inputs(3, seed=2, grid=grid, size=size)
    maps[1, :2] = 0.0  # ties
    ratios = [0.1, 0.37, 0.5, 0.9, 1.0]
    for order in ("mif", "lif"):
        got = faithfulness_curves(model, images, maps, classes, order, "logit", ratios, max_batch=4)
        ref = _plain_token_curve(model, images, maps, classes, ratios, order)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    srg = faithfulness_curves(model, images, maps, classes, "srg", "logit", ratios)
    torch.testing.assert_close(
        srg,
        _plain_token_curve(model, images, maps, classes, ratios, "lif")
        - _plain_token_curve(model, images, maps, classes, ratios, "mif"),
        atol=4e-5,
        rtol=0,
    )


def test_token_replace_equals_plain_loop(cls_model: ViTClassifier) -> None:
    images, maps, classes = _inputs(2, seed=3)
    ratios = [0.25, 0.5, 1.0]
    for baseline in ("black", "zero_tokens", "mean_color", {"kind": "blur", "sigma": 2.0}):
        got = token_removal_outcomes(
            cls_model, images, maps, classes, ratios, ("mif", "lif"), "replace", baseline, max_batch=5
        )
        base = reference_tokens(cls_model, images, build_token_reference(baseline))
        with torch.no_grad():
            r0 = cls_model.embed(images)
            for i, (s, r), order in itertools.product(range(2), enumerate(ratios), ("mif", "lif")):
                ranking = maps[i].flatten().sort(descending=True, stable=True).indices
                c = _official_removed(64, r, order)
                removed = ranking[:c] if order == "mif" else ranking[64 - c :]
                seq = r0[i : i + 1].clone()
                seq[0, 1 + removed] = base[i, 1 + removed]
                want = cls_model.head(cls_model.forward_blocks(seq))[0, classes[i]]
                torch.testing.assert_close(got[order].logit[i, s], want, atol=2e-5, rtol=0)
    # the black baseline's tokens are the embedding of a black image; every patch replaced = the black image
    full = token_removal_outcomes(cls_model, images, maps, classes, [1.0], ("mif",), "replace", "black")
    with torch.no_grad():
        black = cls_model(torch.zeros_like(images))[range(2), classes]
    torch.testing.assert_close(full["mif"].logit[:, 0], black, atol=2e-5, rtol=0)


def test_additive_model_known_answer() -> None:
    """Identity blocks, no norms, avg pool: logit = bias + mean of the kept patches' contributions s_i."""
    model = _model(dict(global_pool="avg", class_token=False))
    m = model.model
    with torch.no_grad():
        for block in m.blocks:
            for lin in (block.attn.proj, block.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    m.norm, m.fc_norm = nn.Identity(), nn.Identity()
    images = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    c = 3
    with torch.no_grad():
        s = (model.embed(images)[0] @ m.head.weight[c]).double()
    b = float(m.head.bias[c].detach())
    ranked = s.sort(descending=True).values
    ratios = [0.25, 0.5, 0.75, 1.0]
    # every patch removed: the empty set pools to the all-zero feature, so the logit is the bias
    mif = [float(ranked.mean()) + b] + [float(ranked[int(r * 64) :].mean()) + b for r in ratios[:-1]] + [b]
    lif = [float(ranked.mean()) + b] + [float(ranked[: int((1 - r) * 64)].mean()) + b for r in ratios[:-1]]
    lif.append(b)
    maps = s.float().reshape(1, 8, 8)
    cls = torch.tensor([c])
    got_mif = faithfulness_curves(model, images, maps, cls, "mif", "logit", ratios)[0].double()
    got_lif = faithfulness_curves(model, images, maps, cls, "lif", "logit", ratios)[0].double()
    torch.testing.assert_close(got_mif, torch.tensor(mif, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(got_lif, torch.tensor(lif, dtype=torch.float64), atol=1e-4, rtol=0)
    # the true ranking beats its reverse: lower MIF area, higher SRG
    metric, rev = SRG(score="logit", ratios=ratios), SRG(score="logit", ratios=ratios)
    metric.update(_batch(images, maps, cls), model)
    rev.update(_batch(images, -maps, cls), model)
    assert float(metric.compute()) > 0 > float(rev.compute())


class _GridHeadViT(ViTClassifier):
    """A head over the fixed patch grid (flattened patch tokens -> linear), like an MLP-Mixer's: it cannot take
    a shorter sequence."""

    can_drop_tokens = False

    def __init__(self, inner: ViTClassifier) -> None:
        super().__init__(
            inner.model, inner.mean.flatten().tolist(), inner.std.flatten().tolist(), True, "grid_head"
        )
        torch.manual_seed(0)
        self.grid_fc = nn.Linear(64 * inner.model.embed_dim, inner.num_classes)

    def head(self, x: Tensor) -> Tensor:
        return self.grid_fc(self.model.norm(x)[:, self.num_prefix_tokens :].flatten(1))


def test_drop_refused_for_fixed_grid_head_replace_works(cls_model: ViTClassifier) -> None:
    model = _GridHeadViT(cls_model).eval()
    images, maps, classes = _inputs(2, seed=5)
    with pytest.raises(ValueError, match="removal=replace"):
        MIF().update(_batch(images, maps, classes), model)
    metric = MIF(removal="replace", baseline="mean_color", score="logit", ratios=[0.5])
    metric.update(_batch(images, maps, classes), model)
    assert math.isfinite(float(metric.compute()))
    with pytest.raises(ValueError, match=r"pooling '' is not supported"):  # timm's "no pooling": refused
        _model(dict(global_pool=""))  # by the model wrapper at build time


# -- RISE pixel deletion / insertion ----------------------------------------------------------------------
def test_pixel_paths_equal_plain_loop(cls_model: ViTClassifier) -> None:
    images, maps, classes = _inputs(2, seed=6)
    k = 4
    for mode, baseline in (("deletion", "mean_color"), ("insertion", "blur"), ("deletion", "black")):
        got = pixel_perturbation_outcomes(cls_model, images, maps, classes, mode, baseline, k, "bilinear", 3)
        base = baseline_images(cls_model, images, baseline)
        up = F.interpolate(maps[:, None], size=(56, 56), mode="bilinear", align_corners=False)[:, 0]
        with torch.no_grad():
            for i in range(2):
                order = up[i].flatten().sort(descending=True, stable=True).indices
                for s in range(k + 1):
                    top = torch.zeros(56 * 56, dtype=torch.bool)
                    top[order[: round(s * 56 * 56 / k)]] = True
                    top = top.reshape(1, 1, 56, 56)
                    if mode == "deletion":
                        x = torch.where(top, base[i : i + 1], images[i : i + 1])
                    else:
                        x = torch.where(top, images[i : i + 1], base[i : i + 1])
                    want = cls_model(x)[0, classes[i]]
                    torch.testing.assert_close(got.logit[i, s], want, atol=2e-5, rtol=0)
    # mean_color = the model's mean colour = a zero input after normalisation
    torch.testing.assert_close(
        cls_model.normalize(baseline_images(cls_model, images, "mean_color")), torch.zeros_like(images)
    )


def test_pixel_deletion_equals_quantus_pixel_flipping(cls_model: ViTClassifier) -> None:
    """Cross-check with Quantus 0.6 PixelFlipping (pip package quantus, one forward per step): same pixel
    order (pixel-resolution maps without ties; Quantus' argsort is not stable), black (0.0) baseline, logits.
    Quantus counts features per channel, so 3 of its steps make one of ours."""
    quantus = pytest.importorskip("quantus")
    g = torch.Generator().manual_seed(7)
    images, maps, classes = (
        torch.rand(2, 3, 56, 56, generator=g),
        torch.randn(2, 56, 56, generator=g),
        torch.tensor([1, 4]),
    )
    k = 8
    ours = pixel_perturbation_outcomes(
        cls_model, images, maps, classes, "deletion", "black", k, "bilinear", 64
    )
    metric = quantus.PixelFlipping(
        features_in_step=56 * 56 // k, normalise=False, abs=False, perturb_baseline=0.0, disable_warnings=True
    )
    theirs = metric(
        model=cls_model,
        x_batch=images.numpy(),
        y_batch=classes.numpy(),
        a_batch=maps[:, None].numpy(),
        device="cpu",
        softmax=False,
        channel_first=True,
    )
    theirs = np.asarray(theirs)[:, 2::3]  # after 3, 6, ... channel-steps = after 1, 2, ... pixel steps
    np.testing.assert_allclose(theirs, ours.logit[:, 1:].numpy(), atol=2e-5, rtol=0)


# -- metric wrappers: shared forwards, DDP, degenerate maps ----------------------------------------------
def _count_rows(model: ViTClassifier) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    seen: list[int] = []
    handle = model.model.blocks[0].register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].shape[0]))
    return seen, handle


def test_metrics_share_forward_passes(cls_model: ViTClassifier) -> None:
    images, maps, classes = _inputs(4, seed=8)
    ratios = [0.25, 0.5, 0.75]  # r * 64 whole: MIF and LIF keep the same number of patches, so share a length
    metrics = [cls(score=s, ratios=ratios) for cls in (MIF, LIF, SRG) for s in ("prob", "aopc", "top1")]
    batch = _batch(images, maps, classes)
    seen, handle = _count_rows(cls_model)
    try:
        for metric in metrics:
            metric.update(batch, cls_model)
        pixel = [PixelDeletion(steps=4), PixelDeletion(steps=4, score="logit"), PixelInsertion(steps=4)]
        before = len(seen)
        for metric in pixel:
            metric.update(batch, cls_model)
    finally:
        handle.remove()
    # one unperturbed forward (P rows) + one forward per distinct length, MIF and LIF packed together
    assert sum(seen[:before]) == 4 + 2 * 4 * len(ratios) and len(seen[:before]) == 1 + len(ratios)
    # the two deletions share one path; insertion has its own; the unperturbed end is not rerun
    assert sum(seen[before:]) == 2 * 4 * 4
    single = MIF(score="prob", ratios=ratios)
    single.update(_batch(images, maps, classes), cls_model)  # a fresh batch: computed again, same values
    torch.testing.assert_close(single.compute(), metrics[0].compute())
    # the metric's value is the trapezoid area of the plain loop's curve, including the unmasked end
    logit = MIF(score="logit", ratios=ratios)
    logit.update(_batch(images, maps, classes), cls_model)
    ref = _plain_token_curve(cls_model, images, maps, classes, ratios, "mif").double()
    want = torch.trapezoid(ref, x=torch.tensor([0.0, *ratios], dtype=torch.float64), dim=1).mean()
    torch.testing.assert_close(logit.compute(), want, atol=1e-5, rtol=0)


def _fake_ddp(rank0: AttributionMetric, rank1: AttributionMetric) -> None:
    other = itertools.cycle([dim_zero_cat(getattr(rank1, attr)) for attr in rank0._reductions])
    rank0.dist_sync_fn = lambda t, group=None: [t, next(other)]
    rank0.distributed_available_fn = lambda: True


@pytest.mark.parametrize(
    "make", [lambda: SRG(score="aopc", ratios=[0.5, 1.0]), lambda: PixelDeletion(steps=2)]
)
def test_two_rank_merge_equals_single_process(cls_model: ViTClassifier, make) -> None:
    images, maps, classes = _inputs(3, seed=9)
    single = make()
    single.update(_batch(images, maps, classes, [0, 1, 2]), cls_model)
    r0, r1 = make(), make()
    r0.update(_batch(images[:2], maps[:2], classes[:2], [0, 1]), cls_model)
    r1.update(_batch(images[[2, 0]], maps[[2, 0]], classes[[2, 0]], [2, 0]), cls_model)  # 0 padded again
    _fake_ddp(r0, r1)
    torch.testing.assert_close(r0.compute(), single.compute())
    torch.testing.assert_close(r0.curve()[1], single.curve()[1])
    r0, r1 = make(), make()
    r0.update(_batch(images[:2], maps[:2], classes[:2], [0, 1]), cls_model)
    r1.update(_batch(images[[2, 0]], maps[[2, 0]], classes[[2, 0]], [2, 0]), cls_model)
    r0.merge_state(r1)
    torch.testing.assert_close(r0.compute(), single.compute())
    idx, _, curves = r0.per_sample_curves()
    assert idx.tolist() == [0, 1, 2] and torch.isfinite(curves).all()


def test_degenerate_maps_defined_and_warned(
    cls_model: ViTClassifier, caplog: pytest.LogCaptureFixture
) -> None:
    images, maps, classes = _inputs(4, seed=10)
    maps[0] = 0.0
    maps[1] = 3.0
    maps[2, 1, 1] = float("nan")
    for make in (lambda: MIF(score="log_odds"), lambda: SRG(), lambda: PixelInsertion(steps=4)):
        metric = make()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            metric.update(_batch(images, maps, classes), cls_model)
            value = metric.compute()
        assert math.isfinite(float(value)), metric.name
        assert "2 of 4 maps are constant" in caplog.text and "1 of 4 maps have NaN" in caplog.text
        # the warning says how a constant map is ranked, truthfully for this metric
        pixel = isinstance(metric, PixelInsertion)
        assert ("rounding of the bilinear upsampling" in caplog.text) == pixel
        assert ("patches are ranked by position" in caplog.text) == (not pixel)
        assert "1 of 4 values undefined" in caplog.text
        _, _, vals = metric.per_sample()
        assert vals[:2].isfinite().all() and vals[2].isnan() and vals[3].isfinite()
        assert torch.isfinite(metric.curve()[1]).all()
    # why: a constant 3.0 upsampled bilinearly is 3.0 only up to rounding, so its pixel order is not positional
    up = F.interpolate(maps[1:2, None], size=(56, 56), mode="bilinear", align_corners=False)
    assert up.unique().numel() > 1
    assert "ranked by position" in PixelInsertion(upsample="nearest").constant_order
    # an all-zero map removes patches in reading order: the same curve as the map ranking by position
    by_position = -torch.arange(64.0).reshape(1, 8, 8)
    zero = faithfulness_curves(cls_model, images[:1], torch.zeros(1, 8, 8), classes[:1], "mif", "logit")
    torch.testing.assert_close(
        zero, faithfulness_curves(cls_model, images[:1], by_position, classes[:1], "mif", "logit")
    )
    all_nan = MIF()
    all_nan.update(_batch(images[:1], torch.full((1, 8, 8), float("nan")), classes[:1]), cls_model)
    assert math.isnan(float(all_nan.compute()))  # nothing defined: NaN, not a crash


def test_bad_arguments_fail_early() -> None:
    with pytest.raises(ValueError, match="score"):
        MIF(score="auc")
    with pytest.raises(ValueError, match="removal"):
        LIF(removal="mask")
    with pytest.raises(ValueError, match="ratios"):
        SRG(ratios=[0.5, 0.2])
    with pytest.raises(ValueError, match="baseline"):
        PixelDeletion(baseline="noise")
    with pytest.raises(ValueError, match="allowed kinds"):
        MIF(removal="replace", baseline={"kind": "noise"})
    with pytest.raises(ValueError, match="sigma"):
        SRG(removal="replace", baseline={"kind": "blur", "sigma": -1})
    with pytest.raises(ValueError, match="steps"):
        PixelInsertion(steps=0)
    with pytest.raises(ValueError, match="score"):
        PixelInsertion(score="aopc")


def test_patch_deletion_equals_quantus_region_perturbation(cls_model: ViTClassifier) -> None:
    """Cross-check with Quantus 0.6 RegionPerturbation (MoRF, 7x7 regions = the model's patches, black 0.0
    baseline, logits): our pixel deletion with nearest upsampling and K = 64 steps removes one whole patch a
    step in map order; Quantus reports the drop logit_0 - logit_k."""
    quantus = pytest.importorskip("quantus")
    images, maps, classes = _inputs(2, seed=11)  # random patch values: no ties between patches
    ours = pixel_perturbation_outcomes(
        cls_model, images, maps, classes, "deletion", "black", 64, "nearest", 256
    )
    metric = quantus.RegionPerturbation(
        patch_size=7,
        regions_evaluation=64,
        order="morf",
        normalise=False,
        abs=False,
        perturb_baseline=0.0,
        disable_warnings=True,
    )
    up = F.interpolate(maps[:, None], size=(56, 56), mode="nearest")
    theirs = metric(
        model=cls_model,
        x_batch=images.numpy(),
        y_batch=classes.numpy(),
        a_batch=up.numpy(),
        device="cpu",
        softmax=False,
        channel_first=True,
    )
    drop = (ours.logit[:, :1] - ours.logit[:, 1:]).numpy()
    np.testing.assert_allclose(np.asarray(theirs), drop, atol=3e-5, rtol=0)
