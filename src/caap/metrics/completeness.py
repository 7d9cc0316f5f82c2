"""Completeness Error (LibraGrad): |sum of attributions - target score| per (image, class) pair.

A map drops the prefix tokens (CLS, registers) and FullGrad+'s token-less bias terms, so its sum is not the
method's total. The metric therefore asks the method: it takes a `method` that implements
`completeness_terms(model, images, target) -> (total [P], reference [P])` (Input x Gradient, FullGrad+,
Integrated Gradients) and scores `|total - reference|`. The reference is the score the method differentiates:
the target logit when it differentiates the logit (`score: logit`, or the LibraGrad presets `wo_head` /
`attnlrp`), as in the paper's completeness runs; for Integrated Gradients it is score(x) - score(baseline).
Without a method (or with one that has no completeness terms) it falls back to the map sum against the target
logit, which ignores prefix tokens and bias terms (named `map_sum` in the log so the two are not confused).

In a config: `completeness: {_target_: caap.metrics.CompletenessError, method: ${method}}` (Hydra builds a
second instance of the run's method). Lower is better. Runs the method once more per batch (with gradients).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from caap.batch import AttributionBatch
from caap.metrics.base import AttributionMetric

log = logging.getLogger(__name__)


class CompletenessError(AttributionMetric):
    higher_is_better = False
    requires_model = True

    def __init__(self, method: Any = None, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.method = method
        self._warned = False

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        if model is None:
            raise ValueError(f"{self.name} runs the model: pass the ViTClassifier to update(batch, model)")
        terms = None
        if self.method is not None:  # an AttributionMethod: None when it defines no completeness terms
            with torch.enable_grad():
                terms = self.method.completeness_terms(model, batch.images, batch.classes.long())
        if terms is not None:
            total, reference = terms
            return (total.detach().double() - reference.detach().double()).abs()
        if not self._warned:
            log.warning(
                "%s: method %s has no completeness_terms; using the map sum (patch tokens only) vs the logit",
                self.name,
                type(self.method).__name__,
            )
            self._warned = True
        with torch.no_grad():
            logits = model(batch.images)
        reference = logits.gather(1, batch.classes.long()[:, None]).squeeze(1)
        return (batch.maps.double().flatten(1).sum(1) - reference.double()).abs()
