"""Localisation and class-discrimination metrics (torchmetrics wrappers of `functional.localisation` and
`functional.segmentation`).

All need ground-truth masks (`requires_masks`): per-class cell / item masks (FashionGrid) or a compact
`segmentation` map (real segmentation datasets; `AttributionBatch.target_masks('item')` derives the target's
mask from it, and IGNORE pixels are left out through `valid_pixels`). None runs the model.

Bad inputs get a defined value: a map with a NaN / inf entry (`-inf` included), a map with no positive value
(positive-mass metrics), an empty target mask (the target class is absent from the image) or an image with a
single class (class discrimination) give NaN, which `compute` skips, counts and reports in one warning with
the reasons; a constant map gets the value its protocol defines (e.g. an all-background segmentation, or the
region's pixel share for a positive constant under the energy pointing game) and a warning at its first batch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from caap.batch import AttributionBatch
from caap.metrics.base import AttributionMetric, _cat, _nonempty
from caap.metrics.functional.localisation import (
    DEFAULT_TOLERANCE,
    class_discrimination,
    energy_pointing_game,
    tolerant_pointing_game,
)
from caap.metrics.functional.segmentation import (
    INTERPOLATIONS,
    gur_average_precision,
    mean_iou,
    pixel_accuracy,
    segmentation_average_precision,
    segmentation_counts,
)

log = logging.getLogger(__name__)
MASK_KINDS = ("item", "cell")


class _MaskMetric(AttributionMetric):
    """A metric of maps against the target's mask (`mask`: 'item' pixels or 'cell'), with bad-input warnings."""

    requires_model = False
    requires_masks = True

    def __init__(self, mask: str = "item", name: str | None = None, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        if mask not in MASK_KINDS:
            raise ValueError(f"{self.name}: mask must be one of {list(MASK_KINDS)}, got '{mask}'")
        self.mask = mask
        self._warned: set[str] = set()
        self._undefined: dict[str, None] = {}  # reasons of NaN values, in order of first occurrence

    def _masks(self, batch: AttributionBatch, kind: str | None = None) -> Tensor:
        kind = kind or self.mask
        masks = batch.target_masks(kind)
        if masks is None:
            raise ValueError(
                f"{self.name} needs per-class {kind} masks, but the dataset has none (batch.{kind}_masks and "
                f"batch.segmentation are None); use a dataset with ground truth (e.g. FashionGrid) or drop it"
            )
        return masks.to(batch.maps.device)

    def _warn(self, reason: str, count: int, total: int) -> None:
        """Log (once per reason and metric, at the first batch it occurs in) that `count` maps hit `reason`."""
        if count and reason not in self._warned:
            self._warned.add(reason)
            log.warning("%s: %d of %d maps in this batch: %s", self.name, count, total, reason)

    def _note_undefined(self, reason: str, count: int) -> None:
        """Remember that `count` maps got NaN for `reason`; `compute` logs the reasons with its one warning."""
        if count:
            self._undefined.setdefault(reason)

    def undefined_reasons(self) -> list[str]:
        return list(self._undefined)

    def _check_inputs(self, batch: AttributionBatch, masks: Tensor) -> None:
        flat = batch.maps.flatten(1)
        p = flat.shape[0]
        finite = torch.isfinite(flat).all(1)
        self._note_undefined("map with a NaN / inf entry", int((~finite).sum()))
        constant = finite & (flat.amax(1) == flat.amin(1))
        if self.positive_mass:  # a zero / negative constant is reported as "no positive attribution"
            constant &= flat.amax(1) > 0
        self._warn(f"constant map ({self.constant_result})", int(constant.sum()), p)
        empty = ~masks.flatten(1).any(1)
        reason = f"empty target mask: the target class is absent ({self.empty_result})"
        if self.empty_undefined:
            self._note_undefined(reason, int(empty.sum()))
        else:
            self._warn(reason, int(empty.sum()), p)

    constant_result = "value NaN, skipped"
    empty_result = "value NaN"
    empty_undefined = True  # an empty mask gives NaN (reported by `compute`)
    positive_mass = False  # scores the positive part of the map (a constant map is defined when positive)

    def _warn_no_positive(self, batch: AttributionBatch) -> None:
        flat = batch.maps.flatten(1)
        none = torch.isfinite(flat).all(1) & (flat.amax(1) <= 0)
        self._note_undefined("no positive attribution", int(none.sum()))


class TolerantPointingGame(_MaskMetric):
    """Pointing game with a tolerance (Zhang et al., ECCV 2016): the map's arg-max patch within `tolerance`
    pixels of the target's mask counts as a hit.

    Args:
        tolerance: margin in pixels (15 in the original protocol, at ~224 px images).
        mask: 'item' (the object's pixels, default) or 'cell'.
    """

    higher_is_better = True
    constant_result = "arg-max is the first patch"

    def __init__(
        self, tolerance: float = DEFAULT_TOLERANCE, mask: str = "item", name: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(mask=mask, name=name, **kwargs)
        if tolerance < 0:
            raise ValueError(f"{self.name}: tolerance must be >= 0 pixels, got {tolerance}")
        self.tolerance = float(tolerance)

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        """Hits `[P]` (1.0 / 0.0; NaN for a non-finite map or an empty mask)."""
        masks = self._masks(batch)
        self._check_inputs(batch, masks)
        return tolerant_pointing_game(batch.maps, masks, self.tolerance)


class EnergyPointingGame(_MaskMetric):
    """Energy-based pointing game (Wang et al., Score-CAM, CVPRW 2020): share of the map's positive energy in
    the target's bounding box (`region='box'`) or mask (`region='mask'`).

    Args:
        region: 'box' (Score-CAM) or 'mask'.
        mask: which target mask the box is drawn around: 'item' (default) or 'cell'.
    """

    higher_is_better = True
    positive_mass = True
    constant_result = "positive constant: value = the region's share of the pixels"

    def __init__(
        self, region: str = "box", mask: str = "item", name: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(mask=mask, name=name, **kwargs)
        if region not in ("box", "mask"):
            raise ValueError(f"{self.name}: region must be 'box' or 'mask', got '{region}'")
        self.region = region

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        """Proportion `[P]` in [0, 1] (NaN: no positive attribution, non-finite map or empty mask)."""
        masks = self._masks(batch)
        self._check_inputs(batch, masks)
        self._warn_no_positive(batch)
        return energy_pointing_game(batch.maps, masks, self.region)


class ClassDiscrimination(_MaskMetric):
    """Class discrimination on multi-object images: the share of the positive attribution for the target class
    that lands on the cells of the other classes present (lower is better).

    Images holding a single class have no value (NaN: skipped in the mean, counted and logged).

    Args:
        mask: the other classes' regions: 'cell' (their grid cells, default) or 'item' (their pixels).
    """

    higher_is_better = False
    positive_mass = True
    constant_result = "positive constant: value = the other classes' share of the pixels"

    def __init__(self, mask: str = "cell", name: str | None = None, **kwargs: Any) -> None:
        super().__init__(mask=mask, name=name, **kwargs)

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        """Share `[P]` in [0, 1] (NaN: single-class image, no positive attribution or non-finite map)."""
        masks = batch.cell_masks if self.mask == "cell" else batch.item_masks
        if masks is None:
            raise ValueError(
                f"{self.name} needs per-class {self.mask} masks of every class in the image "
                f"(batch.{self.mask}_masks is None); use a dataset with per-class masks (e.g. FashionGrid)"
            )
        masks = masks.to(batch.maps.device)
        self._check_inputs(batch, masks[range(len(batch)), batch.classes])
        present = masks.flatten(2).any(2)
        single = present.sum(1) < 2
        self._note_undefined("image holds a single class", int(single.sum()))
        self._warn_no_positive(batch)
        return class_discrimination(batch.maps, masks, batch.classes)


class _Segmentation(_MaskMetric):
    """A segmentation score of the upsampled map against the target's item mask (IGNORE pixels left out)."""

    higher_is_better = True
    constant_result = "segmented as all background"
    empty_result = "scored against an all-background truth"
    empty_undefined = False

    def __init__(
        self, interpolation: str = "bilinear", mask: str = "item", name: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(mask=mask, name=name, **kwargs)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"{self.name}: interpolation must be one of {list(INTERPOLATIONS)}, got '{interpolation}'"
            )
        self.interpolation = interpolation

    def _inputs(self, batch: AttributionBatch) -> tuple[Tensor, Tensor | None]:
        masks = self._masks(batch)
        self._check_inputs(batch, masks)
        valid = batch.valid_pixels()
        return masks, None if valid is None else valid.to(masks.device)


class _GurCounts(_Segmentation):
    """Gur et al. pixel accuracy / mIoU: per-image values in the table, dataset-level ratio of summed counts in
    `compute` (as Chefer et al.'s evaluation), from per-pair counts gathered across ranks and de-duplicated."""

    counts: list[Tensor]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_state(
            "counts", default=[], dist_reduce_fx="cat"
        )  # [P, 6]: correct, labelled, inter2, union2

    def _per_image(self, counts: Tensor) -> Tensor:
        raise NotImplementedError

    def _dataset(self, counts: Tensor) -> Tensor:
        """The value `[...]` of summed counts `[..., 6]`."""
        raise NotImplementedError

    def _counts(self, batch: AttributionBatch) -> Tensor:
        masks, valid = self._inputs(batch)
        correct, labelled, inter, union = segmentation_counts(batch.maps, masks, valid, self.interpolation)
        return torch.cat([correct[:, None], labelled[:, None], inter, union], 1)

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        return self._per_image(self._counts(batch))

    def update(self, batch: AttributionBatch, model: torch.nn.Module | None = None) -> Tensor:  # type: ignore[override]
        counts = self._counts(batch)
        values = self._append(self._per_image(counts), batch)
        self.counts.append(counts.to(values.device))
        return values

    def compute(self) -> Tensor:
        """Dataset-level value from the summed counts of all de-duplicated pairs with a finite map."""
        if not _nonempty(self.values):
            return torch.tensor(float("nan"), dtype=torch.float64)
        _, _, order = self._dedup_order()
        counts = _cat(self.counts).reshape(-1, 6)[order]
        finite = torch.isfinite(counts).all(1)
        if int((~finite).sum()):
            log.warning(
                "%s: %d of %d maps with a NaN / inf entry (left out of the sums)",
                self.name,
                int((~finite).sum()),
                len(finite),
            )
        if not finite.any():
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self._dataset(counts[finite].sum(0)).reshape(()).cpu()

    def bootstrap_terms(self) -> tuple[Tensor, Tensor]:
        """`(index [M], counts [M, 6])` of the de-duplicated pairs, rows with a NaN / inf entry zeroed (left out
        of the sums, as in `compute`): the value is a ratio of summed counts, resampled as such."""
        if not _nonempty(self.values):
            return torch.zeros(0).long(), torch.zeros(0, 6, dtype=torch.float64)
        index, _, order = self._dedup_order()
        counts = _cat(self.counts).reshape(-1, 6)[order].double()
        finite = torch.isfinite(counts).all(1, keepdim=True)
        return index, torch.where(finite, counts, torch.zeros_like(counts))

    def statistic(self, sums: Tensor) -> Tensor:
        """The dataset-level value `[...]` of summed counts `[..., 6]`."""
        return self._dataset(sums)


class SegmentationPixelAccuracy(_GurCounts):
    """Pixel accuracy of the mean-thresholded map (Gur et al., AAAI 2021; Chefer et al., CVPR 2021).

    Per image: correct / labelled pixels; `compute`: summed correct / summed labelled over the dataset.
    Args: interpolation ('bilinear' as Chefer, or 'nearest'); mask ('item' default, or 'cell').
    """

    def _per_image(self, counts: Tensor) -> Tensor:
        return pixel_accuracy(counts[:, 0], counts[:, 1])

    def _dataset(self, counts: Tensor) -> Tensor:
        return pixel_accuracy(counts[..., 0], counts[..., 1])


class SegmentationMIoU(_GurCounts):
    """Mean IoU over (background, foreground) of the mean-thresholded map (Gur et al.; Chefer et al.).

    Per image: the mean of the two IoUs; `compute`: per class summed intersection / summed union over the
    dataset, then the mean of the two. Args as `SegmentationPixelAccuracy`.
    """

    def _per_image(self, counts: Tensor) -> Tensor:
        return mean_iou(counts[:, 2:4], counts[:, 4:6])

    def _dataset(self, counts: Tensor) -> Tensor:
        return mean_iou(counts[..., 2:4], counts[..., 4:6])


class SegmentationMAP(_Segmentation):
    """mAP of the Gur et al. / Chefer et al. protocol: mean over images of the AP of the two-channel prediction
    `[1 - m, m]` (m the min-max normalised upsampled map) against the one-hot `[background, foreground]`."""

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        masks, valid = self._inputs(batch)
        return gur_average_precision(batch.maps, masks, valid, self.interpolation)


class SegmentationAP(_Segmentation):
    """LibraGrad's Segmentation AP: per-image binary average precision of the upsampled signed map against the
    target's mask, averaged over images (NaN for an empty mask: skipped and counted)."""

    constant_result = "all pixels tied: AP = share of foreground pixels"
    empty_result = "no foreground pixel, AP undefined"
    empty_undefined = True

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        masks, valid = self._inputs(batch)
        return segmentation_average_precision(batch.maps, masks, valid, self.interpolation)
