"""Attribution metrics: pure tensor functions in `functional/` and torchmetrics wrappers."""

from caap.metrics.base import AttributionMetric
from caap.metrics.completeness import CompletenessError
from caap.metrics.deletion_insertion import (
    GridPointingGame,
    PointingGame,
    TokenDeletionAUC,
    TokenInsertionAUC,
)
from caap.metrics.faithfulness import LIF, MIF, SRG
from caap.metrics.localisation import (
    ClassDiscrimination,
    EnergyPointingGame,
    SegmentationAP,
    SegmentationMAP,
    SegmentationMIoU,
    SegmentationPixelAccuracy,
    TolerantPointingGame,
)
from caap.metrics.rise import PixelDeletion, PixelInsertion
from caap.metrics.sanity import CascadingRandomisation

__all__ = [
    "LIF",
    "MIF",
    "SRG",
    "AttributionMetric",
    "CascadingRandomisation",
    "ClassDiscrimination",
    "CompletenessError",
    "EnergyPointingGame",
    "GridPointingGame",
    "PixelDeletion",
    "PixelInsertion",
    "PointingGame",
    "SegmentationAP",
    "SegmentationMAP",
    "SegmentationMIoU",
    "SegmentationPixelAccuracy",
    "TokenDeletionAUC",
    "TokenInsertionAUC",
    "TolerantPointingGame",
]
