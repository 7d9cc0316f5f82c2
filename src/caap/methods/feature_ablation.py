"""Feature ablation on patches, through Captum's `FeatureAblation` with a patch `feature_mask`.

Each patch (all its pixels and channels) is set to the baseline colour (`baseline`, a pixel value in [0, 1];
0 = black) in turn; its attribution is the drop of the target score (probability or logit). Captum batches
`perturbations_per_eval` ablated copies of every image of the batch per forward pass. With the same baseline
this equals `occlusion` with window = stride = 1 patch (a test holds them equal); it is kept as a separate
option because Captum's feature-mask path is what the field reports as "feature ablation".
Cost: `gh * gw` forwards per image.
"""

from __future__ import annotations

from captum.attr import FeatureAblation as CaptumFeatureAblation
from torch import Tensor

from caap.methods.base import AttributionMethod
from caap.methods.option_checks import check_positive_int
from caap.methods.patches import patch_feature_mask, pool_to_patches
from caap.methods.score_model import ScoreModel
from caap.models.vit import ViTClassifier
from caap.references import check_pixel_value
from caap.scores import PROB_OR_LOGIT, check_score


class FeatureAblation(AttributionMethod):
    """Patch ablation maps `[B, gh, gw]`; positive = the score drops when the patch is ablated."""

    requires_grad = False
    name = "feature_ablation"

    def __init__(self, baseline: float = 0.0, score: str = "prob", perturbations_per_eval: int = 16) -> None:
        self.baseline = check_pixel_value(baseline)
        self.score = check_score(score, PROB_OR_LOGIT, key="method.score")
        self.perturbations_per_eval = check_positive_int("perturbations_per_eval", perturbations_per_eval)

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        mask = patch_feature_mask(model, images).expand(images.shape[0], 1, -1, -1)
        attr = CaptumFeatureAblation(ScoreModel(model, self.score)).attribute(
            images.float(),
            baselines=self.baseline,
            target=target,
            feature_mask=mask,
            perturbations_per_eval=self.perturbations_per_eval,
        )
        return pool_to_patches(attr, model, images)
