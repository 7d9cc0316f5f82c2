"""LIME (Ribeiro, Singh and Guestrin 2016) on patches, through Captum's `Lime`.

Interpretable features are the patches (a patch `feature_mask`); each of `n_samples` perturbations keeps
every patch with probability 1/2 (Captum's default sampler) and sets the others to the baseline colour
(`baseline`, a pixel value in [0, 1]; 0 = black). Samples are weighted by an exponential kernel
`exp(-d^2 / (2 kernel_width^2))` of a cosine distance d, and a weighted linear surrogate of the target score
(probability or logit) is fitted; its coefficients are the attributions. `distance=patches` (default, original
LIME: `lime_image` in marcotcr/lime, kernel width 0.25) is the cosine distance between the sample's binary
patch on/off vector z and the image's all-ones vector, `d = 1 - sqrt(|z| / F)` for F patches (1 when every
patch is off), so weights span (0, 1]; `distance=pixels` is Captum's default, the cosine distance between the
perturbed and original pixel tensors, with which a width of 1.0 keeps every weight above ~0.6.
Surrogate: our closed-form weighted ridge with penalty `alpha` (`caap.methods.surrogate.WeightedRidge`),
because Captum's default, scikit-learn's Lasso(alpha=0.01), is not installed; the ridge keeps every patch's
coefficient (no sparsity), which suits a full attribution map.

Cost: one image at a time (Captum's Lime takes a single example), `n_samples` forwards per image in batches
of `perturbations_per_eval`, plus a least-squares fit with `gh * gw + 1` unknowns; with the default 1000
samples about 15x the forwards of patch occlusion.

Seeded: each image's samples are drawn with torch's RNG seeded by `seed` (the global RNG state is restored
afterwards), so maps do not depend on batching or call order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from captum.attr import Lime as CaptumLime
from captum.attr._core.lime import get_exp_kernel_similarity_function
from torch import Tensor

from caap.methods.base import AttributionMethod
from caap.methods.option_checks import check_positive_int
from caap.methods.patches import patch_feature_mask
from caap.methods.score_model import ScoreModel
from caap.methods.surrogate import WeightedRidge, attribute_per_image
from caap.models.vit import ViTClassifier
from caap.references import check_pixel_value
from caap.scores import PROB_OR_LOGIT, check_score

DISTANCES: tuple[str, ...] = ("patches", "pixels")
"""LIME's sample distance: cosine on binary patch vectors (original LIME) or on pixels (Captum's default)."""


def patch_kernel_similarity(kernel_width: float) -> Callable[..., Tensor]:
    """Original LIME's sample weight for Captum's `similarity_func`: `exp(-d^2 / (2 w^2))` with d the cosine
    distance between the interpretable sample z `[1, F]` (patch on = 1) and the all-ones vector of the image.

    As `lime_image` (`pairwise_distances(data, data[0], metric="cosine")`, `sqrt(exp(-d^2 / w^2))`); an
    all-off z has cosine similarity 0 (scikit-learn's convention), so d = 1.
    """

    def similarity(_original: Any, _perturbed: Any, interpretable: Tensor, **_kwargs: Any) -> Tensor:
        z = interpretable.double().flatten()
        norm = z.norm()
        cos = z.sum() / (norm * math.sqrt(z.numel())) if bool(norm > 0) else z.new_zeros(())
        return torch.exp(-((1 - cos) ** 2) / (2 * kernel_width**2)).float()

    return similarity


class Lime(AttributionMethod):
    """LIME patch coefficients `[B, gh, gw]` (one image at a time)."""

    requires_grad = False
    name = "lime"

    def __init__(
        self,
        n_samples: int = 1000,
        baseline: float = 0.0,
        score: str = "prob",
        alpha: float = 0.01,
        kernel_width: float = 0.25,
        distance: str = "patches",
        perturbations_per_eval: int = 250,
        seed: int = 0,
    ) -> None:
        self.n_samples = check_positive_int("n_samples", n_samples)
        self.baseline = check_pixel_value(baseline)
        self.score = check_score(score, PROB_OR_LOGIT, key="method.score")
        for key, value in (("alpha", alpha), ("kernel_width", kernel_width)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or value < 0
                or (key == "kernel_width" and value == 0)
            ):
                bound = "> 0" if key == "kernel_width" else ">= 0"
                raise ValueError(f"method.{key}={value!r} must be a number {bound}")
        self.alpha = float(alpha)
        self.kernel_width = float(kernel_width)
        if distance not in DISTANCES:
            raise ValueError(f"method.distance={distance!r} is not supported; allowed: {list(DISTANCES)}")
        self.distance = distance
        self.perturbations_per_eval = check_positive_int("perturbations_per_eval", perturbations_per_eval)
        self.seed = int(seed)

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        gh, gw = model.grid_size(images)
        mask = patch_feature_mask(model, images)
        if self.distance == "patches":
            similarity = patch_kernel_similarity(self.kernel_width)
        else:
            similarity = get_exp_kernel_similarity_function("cosine", self.kernel_width)
        explainer = CaptumLime(
            ScoreModel(model, self.score),
            interpretable_model=WeightedRidge(alpha=self.alpha),
            similarity_func=similarity,
        )
        return attribute_per_image(
            explainer,
            images,
            target,
            mask,
            (gh, gw),
            self.seed,
            self.baseline,
            self.n_samples,
            self.perturbations_per_eval,
        )
