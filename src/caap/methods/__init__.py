"""Attribution methods, one per file, behind `AttributionMethod`."""

from caap.methods.base import AttributionMethod

__all__ = ["AttributionMethod"]
