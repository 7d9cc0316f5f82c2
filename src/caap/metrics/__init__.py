"""Attribution metrics: pure tensor functions in `functional/` and torchmetrics wrappers."""

from caap.metrics.base import AttributionMetric

__all__ = ["AttributionMetric"]
