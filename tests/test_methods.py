"""The two baselines of the foundation: random (seeded) and Input x Gradient (cross-checked against Captum)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient as CaptumInputXGradient

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
