"""The token-removal engine: drop, mask and replace against one sequence at a time, ranking ties, the empty set,
known answers, and the model surface (EVA's rotary table, models that cannot lose tokens)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from caap.metrics.functional.faithfulness import faithfulness_curves, keep_masks
from caap.models.build import build_model
from caap.models.vit import ViTClassifier
from caap.token_removal import check_removal, patch_ranking, patch_ranks, removal_logits

FG = "vit_fashiongrid_patch7_56"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(kwargs: dict | None = None, name: str = FG, multilabel: bool = True) -> ViTClassifier:
    torch.manual_seed(1)
    return build_model(name, multilabel=multilabel, kwargs=kwargs).eval()


@pytest.fixture(scope="module")
def cls_model() -> ViTClassifier:
    return _model()


def _physical_reference(model: ViTClassifier, images: Tensor, keep: Tensor, rows: Tensor) -> Tensor:
    """One sequence at a time: gather the prefix and kept tokens, run the blocks without a mask, then the head;
    an empty pool (no pooled token left) is the documented all-zero feature."""
    npre = model.num_prefix_tokens
    m = model.model
    out = []
    with torch.no_grad():
        r0 = model.embed(images)
        for i in range(keep.shape[0]):
            idx = torch.cat([torch.arange(npre), npre + keep[i].nonzero().flatten()])
            empty_pool = m.global_pool != "token" and not (npre and m.pool_include_prefix)
            if empty_pool and not keep[i].any():
                out.append(m.head(m.fc_norm(torch.zeros(1, r0.shape[-1])))[0])
            else:
                out.append(model.head(model.forward_blocks(r0[rows[i] : rows[i] + 1, idx]))[0])
    return torch.stack(out)


# -- ranking ----------------------------------------------------------------------------------------------
def test_ranking_order_and_ties() -> None:
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.3]], [[1.0, 1.0], [1.0, 1.0]]])
    assert patch_ranking(maps).tolist() == [[1, 2, 3, 0], [0, 1, 2, 3]]  # a constant map: reading order
    rank = patch_ranks(maps)
    assert rank.tolist() == [[3, 0, 1, 2], [0, 1, 2, 3]]
    # MIF removes the c highest-ranked, LIF the c lowest-ranked (= keeps the n - c highest-ranked)
    dele = keep_masks(rank, [("mif", c) for c in (0, 1, 2, 4)]).reshape(4, 2, 4).transpose(0, 1)
    ins = keep_masks(rank, [("lif", 4 - c) for c in (0, 1, 2, 4)]).reshape(4, 2, 4).transpose(0, 1)
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


# -- drop and mask equal one sequence at a time -----------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        (FG, None),
        (FG, dict(global_pool="avg", class_token=False)),
        (FG, dict(global_pool="avg", pool_include_prefix=True)),
        (FG, dict(global_pool="avgmax", class_token=False)),
        ("test_vit2", None),  # a register token and avg pooling (DINOv2-like), 4x4 grid
    ],
    ids=["cls", "avg-noprefix", "avg-with-prefix", "avgmax-noprefix", "registers-avg"],
)
def test_drop_and_mask_equal_physical_removal(name: str, kwargs: dict | None) -> None:
    model = _model(kwargs, name, multilabel=name == FG)
    size = 56 if name == FG else 64
    n = model.grid_size(torch.zeros(1, 3, size, size))
    n = n[0] * n[1]
    g = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, size, size, generator=g)
    keep = torch.rand(9, n, generator=g) < 0.5
    keep[0], keep[1], keep[2] = False, True, False  # the empty set (pooled to zero) and the full set
    keep[2, 3] = True  # a single kept token
    rows = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    ref = _physical_reference(model, images, keep, rows)
    r0 = model.embed(images).detach()
    for removal in ("drop", "mask"):
        got = removal_logits(model, r0, keep, rows, removal, max_batch=4)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        full = model(images)
    torch.testing.assert_close(ref[1], full[1], atol=1e-5, rtol=0)  # every token kept: the plain forward


def test_replace_equals_plain_loop_and_full_replacement_is_the_baseline(cls_model: ViTClassifier) -> None:
    g = torch.Generator().manual_seed(5)
    images, other = torch.rand(2, 3, 56, 56, generator=g), torch.rand(2, 3, 56, 56, generator=g)
    r0, base = cls_model.embed(images).detach(), cls_model.embed(other).detach()
    keep = torch.rand(4, 64, generator=g) < 0.5
    keep[3] = False
    rows = torch.tensor([0, 1, 0, 1])
    got = removal_logits(cls_model, r0, keep, rows, "replace", base, max_batch=3)
    with torch.no_grad():
        for i in range(4):
            seq = r0[rows[i]].clone()
            seq[1:][~keep[i]] = base[rows[i], 1:][~keep[i]]
            torch.testing.assert_close(got[i], cls_model.head(cls_model.forward_blocks(seq[None]))[0])
        # every patch replaced: the other image (the CLS token's embedding does not depend on the image)
        torch.testing.assert_close(got[3], cls_model(other)[1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="baseline"):
        removal_logits(cls_model, r0, keep, rows, "replace")


def test_eva_drop_gathers_the_rotary_table() -> None:
    """EVA applies rotary position embeddings in every block: a dropped sequence must keep each token's
    rotation (timm's patch dropout does the same); drop then equals the key-masked full sequence."""
    torch.manual_seed(0)
    eva = build_model("eva02_tiny_patch14_224", img_size=56, num_classes=5).eval()
    with torch.no_grad():  # timm initialises the head near zero: logits of 1e-4 would hide any difference
        eva.model.head.weight.normal_()
    g = torch.Generator().manual_seed(6)
    images = torch.rand(2, 3, 56, 56, generator=g)
    keep = torch.rand(5, 16, generator=g) < 0.5
    keep[0] = True
    keep[1] = False
    rows = torch.tensor([0, 1, 0, 1, 1])
    r0 = eva.embed(images).detach()
    drop = removal_logits(eva, r0, keep, rows, "drop", max_batch=2)
    mask = removal_logits(eva, r0, keep, rows, "mask")
    torch.testing.assert_close(drop, mask, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(drop[0], eva(images)[0], atol=1e-5, rtol=0)


def test_models_that_cannot_lose_tokens_are_refused(cls_model: ViTClassifier) -> None:
    with pytest.raises(ValueError, match="removal='cut'"):
        check_removal(cls_model, "cut")
    check_removal(cls_model, "drop")
    mixer = build_model("mixer_s16_224", img_size=64, num_classes=5)
    assert cls_model.can_drop_tokens and not mixer.can_drop_tokens
    with pytest.raises(ValueError, match=r"fixed sequence length.*; try replace"):
        check_removal(mixer, "mask", "token sampling", "; try replace")
    check_removal(mixer, "replace")


# -- known answers ----------------------------------------------------------------------------------------
def _additive_model() -> ViTClassifier:
    """Blocks are the identity, no norms, avg pool: logit_c = b_c + mean over kept patches of s_c[i]."""
    model = _model(dict(global_pool="avg", class_token=False))
    m = model.model
    with torch.no_grad():
        for block in m.blocks:
            for lin in (block.attn.proj, block.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    m.norm, m.fc_norm = nn.Identity(), nn.Identity()
    return model


def test_known_answer_one_patch_model() -> None:
    """The logit depends on one patch only: removing it first drops the score to the no-patch value at once."""
    model = _additive_model()
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
    cls, ratios = torch.tensor([0]), [0.5, 1.0]
    mif = faithfulness_curves(model, images, maps, cls, "mif", "logit", ratios)
    lif = faithfulness_curves(model, images, maps, cls, "lif", "logit", ratios)
    # MIF: 64 / 64 = 1 with all patches, then 0; LIF keeps the top half (64 / 32 = 2), then none (the empty set)
    torch.testing.assert_close(mif[0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(lif[0], torch.tensor([1.0, 2.0, 0.0]), atol=1e-4, rtol=0)
