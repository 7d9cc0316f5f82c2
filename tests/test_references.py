"""`caap.references`: one vocabulary of reference kinds for CAAP's neutral contexts and the metrics' baselines."""

from __future__ import annotations

import pytest
import torch

from caap.models.build import build_model
from caap.models.vit import ViTClassifier
from caap.references import (
    IMAGE_KINDS,
    ZERO_TOKENS,
    BlurredImage,
    build_reference,
    build_token_reference,
    check_pixel_value,
    gaussian_blur,
    reference_tokens,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> ViTClassifier:
    torch.manual_seed(0)
    return build_model("vit_fashiongrid_patch7_56", multilabel=True).eval()


def test_retired_zero_names_point_to_their_two_meanings() -> None:
    for kind in ("zero", "mean"):
        with pytest.raises(ValueError, match=r"baseline.kind='.*'.*allowed kinds.*use 'mean_color'"):
            build_reference(kind, key="baseline")
    with pytest.raises(ValueError, match="zero_tokens"):
        build_token_reference("zero")


def test_kinds_outside_a_users_subset_fail_with_its_key() -> None:
    with pytest.raises(ValueError, match=r"baseline.kind='noise'.*allowed kinds.*\['black', 'blur'\]"):
        build_reference("noise", key="baseline", allowed=("black", "blur"))
    with pytest.raises(ValueError, match=r"baseline.sigma=-1"):
        build_reference({"kind": "blur", "sigma": -1}, key="baseline")
    with pytest.raises(ValueError, match=r"neutral.sigma=0"):
        build_reference({"kind": "blur", "sigma": 0})  # CAAP's key by default
    with pytest.raises(ValueError, match=r"needs baseline\.path"):
        build_token_reference("dataset_mean")
    with pytest.raises(ValueError, match="takes no options"):
        build_token_reference({"kind": ZERO_TOKENS, "sigma": 1})
    assert set(IMAGE_KINDS) == {"black", "mean_color", "blur", "noise", "image", "dataset_mean"}
    # (key, value) pairs, as the metrics store a hashable config, build the same reference as the mapping
    pairs = build_reference((("kind", "blur"), ("sigma", 2.0)))
    assert isinstance(pairs, BlurredImage) and pairs.sigma == 2.0


def test_reference_tokens(model: ViTClassifier) -> None:
    images = torch.rand(3, 3, 56, 56)
    with torch.no_grad():
        zero = reference_tokens(model, images, build_token_reference(ZERO_TOKENS))
        black = reference_tokens(model, images, build_token_reference("black"))
        mean = reference_tokens(model, images, build_token_reference("mean_color"))
        blur = reference_tokens(model, images, build_token_reference({"kind": "blur", "sigma": 2.0}))
        assert zero.shape == model.embed(images).shape and not zero.any()
        assert torch.equal(black, model.embed(torch.zeros_like(images)))
        # mean_color is a zero input after normalisation: its tokens are the embedding of a zero normalised input
        torch.testing.assert_close(mean, model.embed(model.mean.expand_as(images).contiguous()))
        torch.testing.assert_close(blur, model.embed(gaussian_blur(images, 2.0)))
    assert not torch.allclose(blur[0], blur[1])  # blur depends on the source image


def test_check_pixel_value() -> None:
    assert check_pixel_value(0) == 0.0 and check_pixel_value(0.5) == 0.5
    for bad in (-0.1, 1.5, True, "black"):
        with pytest.raises(ValueError, match=r"method.baseline=.*pixel value in \[0, 1\]"):
            check_pixel_value(bad)
