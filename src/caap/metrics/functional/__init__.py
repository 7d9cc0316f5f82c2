"""Pure tensor functions behind the metrics: pointing games, localisation, segmentation, sanity checks.

The faithfulness curves (`faithfulness`, `pixel_perturbation`) run the model; import them from their modules.
"""

from caap.metrics.functional.localisation import (
    bounding_boxes,
    class_discrimination,
    energy_pointing_game,
    positive_energy_share,
    tolerant_pointing_game,
)
from caap.metrics.functional.pointing import grid_pointing_game, mask_patch_counts, pointing_game
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

__all__ = [
    "bounding_boxes",
    "cascade_stages",
    "cascading_randomisation",
    "class_discrimination",
    "energy_pointing_game",
    "grid_pointing_game",
    "gur_average_precision",
    "mask_patch_counts",
    "mean_iou",
    "mean_threshold",
    "minmax_normalise",
    "pixel_accuracy",
    "pointing_game",
    "positive_energy_share",
    "segmentation_average_precision",
    "segmentation_counts",
    "spearman_per_map",
    "ssim_per_map",
    "tolerant_pointing_game",
    "upsample_maps",
]
