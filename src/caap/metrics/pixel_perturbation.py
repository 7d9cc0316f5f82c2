"""RISE pixel deletion / insertion metrics (Petsiuk et al., BMVC 2018): `PixelDeletion`, `PixelInsertion`.

Per (image, class) the trapezoid area of the target's score along the path of `functional.pixel_perturbation`
over x = 0, 1/K, ..., 1; the curves are kept for `curve()`. Both metrics share the unperturbed forward of a
batch with every other curve metric (`CurveMetric.unperturbed`), and instances with equal settings share the
perturbed path (`CurveMetric.shared`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from caap.batch import AttributionBatch
from caap.metrics.curves import CurveMetric, setting_key
from caap.metrics.functional.pixel_perturbation import (
    RISE_BLUR,
    UPSAMPLING,
    pixel_perturbation_outcomes,
    pixel_reference,
)
from caap.scores import POINT_SCORES, check_score, curve_values


def default_max_batch(device: torch.device) -> int:
    """Images per forward of the pixel paths when `max_batch` is null: 32 on a CPU (activations of large
    batches fall out of the CPU caches), 256 on an accelerator (which needs large batches to be busy)."""
    return 32 if device.type == "cpu" else 256


class _PixelPerturbation(CurveMetric):
    mode: str = "deletion"
    default_baseline: Any = "mean_color"

    def __init__(
        self,
        score: str = "prob",
        steps: int | None = None,
        baseline: str | Mapping[str, Any] | None = None,
        upsample: str = "bilinear",
        max_batch: int | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        check_score(score, POINT_SCORES, key=f"{self.name}: score")
        if steps is not None and int(steps) < 1:
            raise ValueError(
                f"{self.name}: steps must be a positive integer or null (= image height), got {steps}"
            )
        if upsample not in UPSAMPLING:
            raise ValueError(
                f"{self.name}: upsample='{upsample}' is not supported; allowed: {list(UPSAMPLING)}"
            )
        baseline = self.default_baseline if baseline is None else setting_key(baseline)
        pixel_reference(
            baseline if isinstance(baseline, str) else dict(baseline)
        )  # a bad baseline fails here
        if max_batch is not None and int(max_batch) < 1:
            raise ValueError(
                f"{self.name}: max_batch must be positive or null (= by device), got {max_batch}"
            )
        self.score_kind = score
        self.steps = None if steps is None else int(steps)
        self.baseline = baseline if isinstance(baseline, str) else dict(baseline)
        self._baseline_key = setting_key(self.baseline)
        self.upsample = upsample
        if upsample != "nearest":  # a constant c upsampled bilinearly is c only up to float rounding
            self.constant_order = (
                "their pixels are ranked by the float rounding of the bilinear upsampling (by position only "
                "when all zero), not by attribution"
            )
        else:
            self.constant_order = "their pixels are ranked by position, not by attribution"
        self.max_batch = None if max_batch is None else int(max_batch)
        self._k: int | None = self.steps

    def axis(self) -> Tensor:
        if self._k is None:
            raise RuntimeError(f"{self.name}: steps=null takes K from the image height; update once first")
        return torch.linspace(0.0, 1.0, self._k + 1, dtype=torch.float64)

    def curves_of(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        vit = self.classifier(model)
        self._k = batch.images.shape[-2] if self.steps is None else self.steps
        max_batch = self.max_batch or default_max_batch(batch.images.device)
        key = ("pixels", id(vit), self.mode, self._baseline_key, self._k, self.upsample, max_batch)
        outcomes = self.shared(
            batch,
            key,
            lambda: pixel_perturbation_outcomes(
                vit,
                batch.images,
                batch.maps,
                batch.classes,
                self.mode,
                self.baseline,
                self._k,
                self.upsample,
                max_batch,
                full=self.unperturbed(batch, vit),
            ),
        )
        return curve_values(outcomes, self.score_kind)


class PixelDeletion(_PixelPerturbation):
    """RISE deletion: area of the target's score while the top-ranked pixels are set to the baseline.

    Args:
        score: 'prob' (default), 'logit' or 'top1'.
        steps: K steps of H*W/K pixels; null = the image height (RISE: W pixels a step).
        baseline: 'mean_color' (default: the model's mean colour, a zero input after normalisation), 'black',
            'blur' or `{kind: blur, sigma, kernel_size}` (`caap.references`).
        upsample: 'bilinear' (default) or 'nearest' (whole patches in map order).
        max_batch: most images per forward pass; null = `default_max_batch` of the device.

    Lower is better.
    """

    mode = "deletion"
    default_baseline = "mean_color"
    higher_is_better = False


class PixelInsertion(_PixelPerturbation):
    """RISE insertion: area of the target's score while the top-ranked pixels are put back into the baseline.

    Same arguments as `PixelDeletion`; the default baseline is RISE's blur (kernel 11, sigma 5). Higher is better.
    """

    mode = "insertion"
    default_baseline = RISE_BLUR
    higher_is_better = True
