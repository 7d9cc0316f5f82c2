"""`CascadingRandomisation`: Adebayo et al.'s model-randomisation sanity check as a metric.

For each batch, a deep copy of the model is randomised stage by stage from the top (head, then blocks L-1..0;
see `functional.sanity.cascading_randomisation`), the run's method recomputes its maps on every stage, and
each pair gets the Spearman rank correlation (and SSIM) of each stage's map with the original map. A faithful
method's correlation must fall along the cascade. The metric's value is the mean Spearman over the stages (the
area under the cascade curve, lower is better); `extra_results()` gives the mean per stage under the stage's
name, and `extra_per_sample()` the per-pair values per stage, for `<name>/<stage>` keys in the run's results
and per-image table.

The method comes from the run (`requires_method`: `AttributionModule` hands its method to the metric), so the
maps are those of the method being evaluated. Costs one method run per stage and batch (L + 1 for all stages).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from caap.batch import AttributionBatch
from caap.metrics.base import AttributionMetric, _cat, _nonempty
from caap.metrics.functional.sanity import (
    cascade_stages,
    cascading_randomisation,
    spearman_per_map,
    ssim_per_map,
)
from caap.models.vit import ViTClassifier

log = logging.getLogger(__name__)


class CascadingRandomisation(AttributionMetric):
    """Cascading model randomisation (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

    Args:
        stages: how many stages of the cascade (head, block L-1, ..., block 0) to run; None: all L + 1.
        absolute: compare |maps| instead of signed maps (Adebayo et al. report both).
        ssim: also compute SSIM per stage (`extra_results` keys `ssim/<stage>`).
        seed: seed of the re-initialisation (stage s uses seed + s).
        cumulative: True (cascading, Adebayo et al.'s main test) or False (independent: each stage randomises
            only its own layer(s) of the trained model).
        control: also re-run the method on the unrandomised copy (stage 'original', not in the mean): 1 for a
            deterministic method, the reference the cascade falls from.
        method: the attribution method; None until the run's module hands over its own.
    """

    higher_is_better = False
    requires_model = True
    requires_method = True

    def __init__(
        self,
        stages: int | None = None,
        absolute: bool = False,
        ssim: bool = True,
        seed: int = 0,
        control: bool = True,
        cumulative: bool = True,
        method: Any = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if stages is not None and int(stages) < 1:
            raise ValueError(f"{self.name}: stages must be >= 1 (or null for all), got {stages}")
        self.stages = None if stages is None else int(stages)
        self.absolute = bool(absolute)
        self.with_ssim = bool(ssim)
        self.seed = int(seed)
        self.control = bool(control)
        self.cumulative = bool(cumulative)
        self.method = method
        self.stage_names: list[str] = []
        self.add_state("spearman", default=[], dist_reduce_fx="cat")  # [P, S] per update
        self.add_state("ssim", default=[], dist_reduce_fx="cat")  # [P, S] per update (NaN when off)

    def _stage_values(self, batch: AttributionBatch, model: torch.nn.Module | None) -> tuple[Tensor, Tensor]:
        if not isinstance(model, ViTClassifier):
            raise ValueError(f"{self.name} runs the model: pass the ViTClassifier to update(batch, model)")
        if self.method is None:
            raise ValueError(
                f"{self.name} re-runs the attribution method: AttributionModule hands it over "
                f"(requires_method), or pass method=... when using the metric on its own"
            )
        original = batch.maps.abs() if self.absolute else batch.maps
        images, classes = batch.images, batch.classes.long()
        size = tuple(images.shape[-2:])
        rhos, ssims, names = [], [], []
        for name, randomised in cascading_randomisation(
            model, self.stages, self.seed, self.control, self.cumulative
        ):
            maps = self.method(randomised, images, classes, batch.index).to(original.device).float()
            maps = maps.abs() if self.absolute else maps
            rhos.append(spearman_per_map(original, maps))
            ssims.append(
                ssim_per_map(original, maps, size)
                if self.with_ssim
                else torch.full_like(rhos[-1], float("nan"))
            )
            names.append(name)
        self.stage_names = names
        return torch.stack(rhos, 1), torch.stack(ssims, 1)

    def _warn_undefined(self, rho: Tensor) -> None:
        bad = ~torch.isfinite(rho)
        if bad.any():
            log.warning(
                "%s: %d of %d (map, stage) pairs have no rank correlation (constant or non-finite map): NaN, "
                "left out of the means",
                self.name,
                int(bad.sum()),
                bad.numel(),
            )

    def _summary(self, rho: Tensor) -> Tensor:
        """Mean Spearman `[P]` over the randomised stages (the control left out; NaN-skipping)."""
        return rho[:, int(self.control) :].nanmean(1)

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        """Mean Spearman over the randomised stages `[P]` (NaN-skipping; NaN when no stage has a value)."""
        rho, _ = self._stage_values(batch, model)
        return self._summary(rho)

    def update(self, batch: AttributionBatch, model: torch.nn.Module | None = None) -> Tensor:  # type: ignore[override]
        rho, ssim = self._stage_values(batch, model)
        self._warn_undefined(rho)
        values = self._append(self._summary(rho), batch)
        self.spearman.append(rho.to(values.device))
        self.ssim.append(ssim.to(values.device))
        return values

    def per_stage_samples(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """De-duplicated `(index [M], class [M], spearman [M, S], ssim [M, S])` of all ranks (collective)."""
        with self._gathered():
            s = len(self.stage_names)
            if not _nonempty(self.spearman) or s == 0:
                empty = torch.zeros(0, s, dtype=torch.float64)
                return torch.zeros(0).long(), torch.zeros(0).long(), empty, empty.clone()
            index, cls, order = self._dedup_order()
            return (
                index,
                cls,
                _cat(self.spearman).reshape(-1, s)[order],
                _cat(self.ssim).reshape(-1, s)[order],
            )

    def extra_results(self) -> dict[str, float]:
        """Mean Spearman per stage (`<stage>`) and, with `ssim`, mean SSIM per stage (`ssim/<stage>`)."""
        _, _, rho, ssim = self.per_stage_samples()
        out: dict[str, float] = {}
        for j, name in enumerate(self.stage_names):
            out[name] = float(rho[:, j].nanmean()) if rho.shape[0] else float("nan")
        if self.with_ssim:
            for j, name in enumerate(self.stage_names):
                out[f"ssim/{name}"] = float(ssim[:, j].nanmean()) if ssim.shape[0] else float("nan")
        return out

    def extra_per_sample(self) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Per-pair Spearman per stage: `{<stage>: (index [M], class [M], value [M])}`."""
        index, cls, rho, _ = self.per_stage_samples()
        return {name: (index, cls, rho[:, j]) for j, name in enumerate(self.stage_names)}


__all__ = ["CascadingRandomisation", "cascade_stages"]
