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

from caap.metrics.functional.localisation import (
    bounding_boxes,
    class_discrimination,
    energy_pointing_game,
    positive_energy_share,
    tolerant_pointing_game,
)
from caap.metrics.functional.sanity import (
    cascade_stages,
    cascading_randomisation,
    spearman_per_map,
    ssim_per_map,
)
from caap.metrics.functional.segmentation import (
    gur_average_precision,
    mean_iou,
    mean_threshold,
    minmax_normalise,
    pixel_accuracy,
    segmentation_average_precision,
    segmentation_counts,
    upsample_maps,
)

__all__ += [
    "bounding_boxes",
    "cascade_stages",
    "cascading_randomisation",
    "class_discrimination",
    "energy_pointing_game",
    "gur_average_precision",
    "mean_iou",
    "mean_threshold",
    "minmax_normalise",
    "pixel_accuracy",
    "positive_energy_share",
    "segmentation_average_precision",
    "segmentation_counts",
    "spearman_per_map",
    "ssim_per_map",
    "tolerant_pointing_game",
    "upsample_maps",
]
