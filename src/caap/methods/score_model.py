"""`ScoreModel`: a classifier as the forward function Captum's perturbation explainers call."""

from __future__ import annotations

from torch import Tensor, nn

from caap.models.vit import ViTClassifier
from caap.scores import PROB_OR_LOGIT, check_score, class_scores


class ScoreModel(nn.Module):
    """Pixel images `[B, 3, H, W]` -> every class's score `[B, C]` (`prob` or `logit`, float32), for Captum."""

    def __init__(self, model: ViTClassifier, score: str) -> None:
        super().__init__()
        self.model = model
        self.score = check_score(score, PROB_OR_LOGIT, key="method.score")

    def forward(self, images: Tensor) -> Tensor:
        return class_scores(self.model(images).float(), self.score, self.model.multilabel)
