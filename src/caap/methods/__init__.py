"""Attribution methods, one per file, behind `AttributionMethod`."""

from caap.methods.base import AttributionMethod
from caap.methods.input_x_gradient import InputXGradient
from caap.methods.random import RandomAttribution

__all__ = ["AttributionMethod", "InputXGradient", "RandomAttribution"]
from caap.methods.caap import CAAP as CAAP  # the flagship method (Hydra target caap.methods.CAAP)
