"""A constant pixel value in [0, 1] as a reference: what the Captum perturbation methods (occlusion, feature
ablation, LIME, KernelSHAP) set absent patches to. 0.0 is the `black` reference image; a grey level v is
`mean_color` with `rgb: v`."""

from __future__ import annotations

from typing import Any


def check_pixel_value(value: Any, key: str = "method.baseline") -> float:
    """`value` as a float if it is a number in [0, 1], else a ValueError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}={value!r} must be a pixel value in [0, 1] (0 = black)")
    return float(value)
