"""Occlusion (Zeiler and Fergus 2014) on patches, through Captum's `Occlusion`.

A window of `window x window` patches, slid with a stride of `stride` patches, is replaced by the baseline
colour (`baseline`, a pixel value in [0, 1]; 0 = black, `caap.references.check_pixel_value`) and the drop of the target score (probability or
logit) is the attribution of the window's pixels (Captum averages over the windows covering a pixel). The
pixel map is averaged over each patch's pixels, so with the default window = stride = 1 patch the map is
exactly "score(image) - score(image with patch i set to the baseline)". Captum batches
`perturbations_per_eval` perturbed copies of every image of the batch per forward pass.
Cost: one forward per window position (`gh * gw` with the defaults) per image.
"""

from __future__ import annotations

from captum.attr import Occlusion as CaptumOcclusion
from torch import Tensor

from caap.methods.base import AttributionMethod
from caap.methods.option_checks import check_positive_int
from caap.methods.patches import pool_to_patches
from caap.methods.score_model import ScoreModel
from caap.models.vit import ViTClassifier
from caap.references import check_pixel_value
from caap.scores import PROB_OR_LOGIT, check_score


class Occlusion(AttributionMethod):
    """Patch occlusion maps `[B, gh, gw]`; positive = the score drops when the patch is occluded."""

    requires_grad = False
    name = "occlusion"

    def __init__(
        self,
        window: int = 1,
        stride: int = 1,
        baseline: float = 0.0,
        score: str = "prob",
        perturbations_per_eval: int = 16,
    ) -> None:
        self.window = check_positive_int("window", window)
        self.stride = check_positive_int("stride", stride)
        self.baseline = check_pixel_value(baseline)
        self.score = check_score(score, PROB_OR_LOGIT, key="method.score")
        self.perturbations_per_eval = check_positive_int("perturbations_per_eval", perturbations_per_eval)

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        ph, pw = model.patch_size
        occ = CaptumOcclusion(ScoreModel(model, self.score))
        attr = occ.attribute(
            images.float(),
            sliding_window_shapes=(images.shape[1], self.window * ph, self.window * pw),
            strides=(images.shape[1], self.stride * ph, self.stride * pw),
            baselines=self.baseline,
            target=target,
            perturbations_per_eval=self.perturbations_per_eval,
        )
        return pool_to_patches(attr, model, images)
