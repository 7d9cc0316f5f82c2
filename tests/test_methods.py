"""The two baselines of the foundation: random (seeded) and Input x Gradient (cross-checked against Captum)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient as CaptumInputXGradient

from caap.lit.module import AttributionModule
from caap.methods import InputXGradient, RandomAttribution
from caap.models import FASHIONGRID_MODEL, build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(FASHIONGRID_MODEL, multilabel=True)


def test_random_is_seeded_and_shaped(model) -> None:
    images, target = torch.rand(4, 3, 56, 56), torch.zeros(4, dtype=torch.long)
    a = RandomAttribution(seed=3)(model, images, target)
    b = RandomAttribution(seed=3)(model, images, target)
    c = RandomAttribution(seed=4)(model, images, target)
    assert a.shape == (4, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_maps_are_a_function_of_seed_index_and_class(model) -> None:
    """Batching, order (DDP shards, resume) and the image content do not move a map; index and class do."""
    torch.manual_seed(0)
    images = torch.rand(6, 3, 56, 56)
    index, target = torch.tensor([4, 9, 2, 7, 0, 5]), torch.tensor([1, 1, 3, 0, 2, 1])
    whole = RandomAttribution(seed=3)(model, images, target, index)
    method = RandomAttribution(seed=3)
    order = [5, 2, 0, 4, 1, 3]  # reversed-ish order, batches of 1, 2 and 3
    parts = {}
    for rows in ([5], [2, 0], [4, 1, 3]):
        for row, m in zip(rows, method(model, images[rows], target[rows], index[rows]), strict=True):
            parts[row] = m
    assert sorted(parts) == sorted(order)
    assert torch.equal(torch.stack([parts[r] for r in range(6)]), whole)
    # identical images at different indices, or the same index with another class: independent draws
    same = RandomAttribution(seed=3)(model, images[:1].expand(2, -1, -1, -1), target[:2], index[:2])
    assert not torch.equal(same[0], same[1])
    other_class = RandomAttribution(seed=3)(model, images[:1], target[:1] + 1, index[:1])
    assert not torch.equal(other_class[0], whole[0])
    # the image content is not read: other pixels at the same (index, class) give the same map
    assert torch.equal(RandomAttribution(seed=3)(model, torch.zeros_like(images), target, index), whole)
    # without indices, a running count stands for them: the batch sizes of a call sequence do not matter
    running = RandomAttribution(seed=3)
    split = torch.cat([running(model, images[:2], target[:2]), running(model, images[2:], target[2:])])
    assert torch.equal(split, RandomAttribution(seed=3)(model, images, target, torch.arange(6)))
    # the run's loop hands each map's dataset index over
    module = AttributionModule(model, RandomAttribution(seed=3), {})
    assert torch.equal(module.compute_maps(images[3:], target[3:], index[3:])[0], whole[3:])


class _FromEmbeddings(torch.nn.Module):
    """r_0 -> logits, so Captum can attribute to the token embeddings."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, r0: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.forward_blocks(r0))


@pytest.mark.parametrize("kwargs", [{}, {"class_token": False, "global_pool": "avg"}, {"reg_tokens": 4}])
def test_input_x_gradient_matches_captum(kwargs) -> None:
    torch.manual_seed(0)
    model = build_model(FASHIONGRID_MODEL, kwargs=kwargs)
    images, target = torch.rand(3, 3, 56, 56), torch.tensor([1, 4, 7])
    ours = InputXGradient()(model, images, target)
    r0 = model.embed(images).detach()
    theirs = CaptumInputXGradient(_FromEmbeddings(model)).attribute(r0, target=target)
    expected = theirs.sum(-1)[:, model.num_prefix_tokens :].reshape(3, 8, 8)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_input_x_gradient_is_per_sample(model) -> None:
    images, target = torch.rand(3, 3, 56, 56), torch.tensor([1, 4, 7])
    batched = InputXGradient()(model, images, target)
    single = torch.cat([InputXGradient()(model, images[i : i + 1], target[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_bad_score_fails_clearly() -> None:
    with pytest.raises(ValueError, match=r"method.score='bad'.*allowed"):
        InputXGradient(score="bad")
