"""Attribution metrics: pure tensor functions in `functional/` and torchmetrics wrappers."""

from caap.metrics.base import AttributionMetric
from caap.metrics.completeness import CompletenessError
from caap.metrics.curves import CurveMetric
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
from caap.metrics.pixel_perturbation import PixelDeletion, PixelInsertion
from caap.metrics.pointing import GridPointingGame, PointingGame
from caap.metrics.sanity import CascadingRandomisation

__all__ = [
    "LIF",
    "MIF",
    "SRG",
    "AttributionMetric",
    "CascadingRandomisation",
    "ClassDiscrimination",
    "CompletenessError",
    "CurveMetric",
    "EnergyPointingGame",
    "GridPointingGame",
    "PixelDeletion",
    "PixelInsertion",
    "PointingGame",
    "SegmentationAP",
    "SegmentationMAP",
    "SegmentationMIoU",
    "SegmentationPixelAccuracy",
    "TolerantPointingGame",
]
