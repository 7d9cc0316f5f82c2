"""The Lightning side of an evaluation: the test loop (`AttributionModule`) and its callbacks (maps, outputs,
media), which `caap.run.evaluate` builds from the config (`callbacks` group)."""

from caap.lit.callbacks import MapWriter, RunOutputs, SampleImages, WandbMedia
from caap.lit.module import AttributionModule, RunInfo

__all__ = ["AttributionModule", "MapWriter", "RunInfo", "RunOutputs", "SampleImages", "WandbMedia"]
