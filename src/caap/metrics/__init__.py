"""Attribution metrics: pure tensor functions in `functional/` and torchmetrics wrappers."""

from caap.metrics.base import AttributionMetric
from caap.metrics.completeness import CompletenessError
from caap.metrics.deletion_insertion import (
    GridPointingGame,
    PointingGame,
    TokenDeletionAUC,
    TokenInsertionAUC,
)

__all__ = [
    "AttributionMetric",
    "CompletenessError",
    "GridPointingGame",
    "PointingGame",
    "TokenDeletionAUC",
    "TokenInsertionAUC",
]
