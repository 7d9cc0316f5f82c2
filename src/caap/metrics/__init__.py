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
from caap.metrics.rise import PixelDeletion, PixelInsertion

__all__ = [
    "LIF",
    "MIF",
    "SRG",
    "AttributionMetric",
    "CompletenessError",
    "GridPointingGame",
    "PixelDeletion",
    "PixelInsertion",
    "PointingGame",
    "TokenDeletionAUC",
    "TokenInsertionAUC",
]
