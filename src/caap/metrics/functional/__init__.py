"""Pure tensor functions behind the metrics: token deletion / insertion curves, pointing games."""

from caap.metrics.functional.pointing import grid_pointing_game, mask_patch_counts, pointing_game
from caap.metrics.functional.token_perturbation import (
    DEFAULT_FRACTIONS,
    check_fractions,
    curve_auc,
    deletion_curves,
    insertion_curves,
    keep_masks,
    masked_head,
    patch_ranking,
    token_perturbation_curves,
)

__all__ = [
    "DEFAULT_FRACTIONS",
    "check_fractions",
    "curve_auc",
    "deletion_curves",
    "grid_pointing_game",
    "insertion_curves",
    "keep_masks",
    "mask_patch_counts",
    "masked_head",
    "patch_ranking",
    "pointing_game",
    "token_perturbation_curves",
]
