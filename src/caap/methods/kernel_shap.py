"""KernelSHAP (Lundberg and Lee 2017) on patches, through Captum's `KernelShap`.

Players are the patches (a patch `feature_mask`); a coalition keeps its patches and sets the others to the
baseline colour (`baseline`, a pixel value in [0, 1]; 0 = black). Captum samples `n_samples` coalitions from
the Shapley kernel (the empty and full coalitions always included, weight 1e6) and fits a weighted linear
regression of the target score (probability or logit) on the coalition indicators; the coefficients are the
patch attributions. The regression is our closed-form `WeightedRidge(alpha=0)` (Captum's default needs
scikit-learn, which is not installed); same estimator.

Cost: one image at a time (Captum's Lime family takes a single example), `n_samples` forwards per image in
batches of `perturbations_per_eval`, plus a least-squares fit with `gh * gw + 1` unknowns. KernelSHAP needs
`n_samples` well above the number of patches (64 on FashionGrid, 196 for a 224 px ViT-B/16) to be stable:
with the default 1000 samples it is about 15x the cost of occlusion at patch level.

Seeded: each image's coalitions are drawn with torch's RNG seeded by `seed` (the global RNG state is
restored afterwards), so maps do not depend on batching or call order.
"""

from __future__ import annotations

from captum.attr import KernelShap as CaptumKernelShap
from torch import Tensor

from caap.methods.base import AttributionMethod
from caap.methods.option_checks import check_positive_int
from caap.methods.patches import patch_feature_mask
from caap.methods.score_model import ScoreModel
from caap.methods.surrogate import WeightedRidge, attribute_per_image
from caap.models.vit import ViTClassifier
from caap.references import check_pixel_value
from caap.scores import PROB_OR_LOGIT, check_score


class KernelShap(AttributionMethod):
    """KernelSHAP patch values `[B, gh, gw]` (one image at a time)."""

    requires_grad = False
    name = "kernel_shap"

    def __init__(
        self,
        n_samples: int = 1000,
        baseline: float = 0.0,
        score: str = "prob",
        perturbations_per_eval: int = 250,
        seed: int = 0,
    ) -> None:
        self.n_samples = check_positive_int("n_samples", n_samples)
        self.baseline = check_pixel_value(baseline)
        self.score = check_score(score, PROB_OR_LOGIT, key="method.score")
        self.perturbations_per_eval = check_positive_int("perturbations_per_eval", perturbations_per_eval)
        self.seed = int(seed)

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        gh, gw = model.grid_size(images)
        mask = patch_feature_mask(model, images)
        explainer = CaptumKernelShap(ScoreModel(model, self.score))
        explainer.interpretable_model = WeightedRidge(alpha=0.0)
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
