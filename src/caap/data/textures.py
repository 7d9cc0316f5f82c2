"""Procedural background textures for synthetic scenes: smooth colour noise, stripes, checkers and blotches.

A scene benchmark whose background is a flat colour (FashionGrid's black) lets any method that replaces
evidence by that colour look perfect; these textures are never flat, carry structure at several scales and
orientations unrelated to any patch grid, and are a pure function of the generator passed in.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

TEXTURES = ("noise", "stripes", "checkers", "blotches")
MIN_PALETTE_DISTANCE = 0.3  # RGB distance between any two colours of a texture's palette


@lru_cache(maxsize=64)
def resize_matrix(source: int, size: int, mode: str = "bicubic", antialias: bool = False) -> np.ndarray:
    """The `[size, source]` matrix of torch's 1-D `mode` resize from `source` to `size` samples (align_corners
    False): torch's bicubic and bilinear (antialiased or not) resizes are separable, so `R @ X @ R.T` resizes a
    `[source, source]` image as `torch.nn.functional.interpolate` does, at the cost of two small matmuls."""
    # width 2, not 1: torch reads a [N, 1, H, 1] tensor's strides as channels-last and mixes up the batch
    eye = torch.eye(source)[:, None, :, None].expand(source, 1, source, 2).contiguous()
    weights = torch.nn.functional.interpolate(
        eye, size=(size, 2), mode=mode, antialias=antialias, align_corners=False
    )
    return weights[:, 0, :, 0].T.numpy().copy()


def smooth_noise(rng: np.random.Generator, cells: int, channels: int, size: int) -> np.ndarray:
    """Smooth random field `[channels, size, size]` in [0, 1]: uniform noise on a `cells x cells` lattice,
    upsampled bicubically (clipped), so its features are about `size / cells` pixels wide."""
    lattice = rng.random((channels, cells, cells), dtype=np.float32)
    resize = resize_matrix(cells, size)
    return np.clip(resize @ lattice @ resize.T, 0.0, 1.0)


def palette(rng: np.random.Generator, n: int, min_distance: float = MIN_PALETTE_DISTANCE) -> np.ndarray:
    """`n` random RGB colours `[n, 3]` in [0, 1] at pairwise distance >= `min_distance` (rejection sampling on
    a fixed number of candidates; the most spread candidate wins if none qualifies)."""
    colours = [rng.random(3, dtype=np.float32)]
    while len(colours) < n:
        candidates = rng.random((32, 3), dtype=np.float32)
        gaps = np.linalg.norm(candidates[:, None] - np.stack(colours)[None], axis=-1).min(1)
        ok = np.flatnonzero(gaps >= min_distance)
        colours.append(candidates[ok[0] if len(ok) else int(gaps.argmax())])
    return np.stack(colours)


@lru_cache(maxsize=4)
def _coordinates(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _rotated(rng: np.random.Generator, size: int, period: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates `[size, size]` rotated by a random angle, in units of `period`, randomly shifted."""
    yy, xx = _coordinates(size)
    angle = rng.uniform(0.0, np.pi)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (xx * cos + yy * sin) / np.float32(period) + np.float32(rng.random())
    v = (yy * cos - xx * sin) / np.float32(period) + np.float32(rng.random())
    return u, v


def _mix(colours: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Blend two colours `[2, 3]` by a weight map `[H, W]` in [0, 1]: `[3, H, W]`."""
    return colours[0][:, None, None] * (1.0 - weight) + colours[1][:, None, None] * weight


def procedural_texture(
    rng: np.random.Generator, size: int, kind: str | None = None
) -> tuple[np.ndarray, str]:
    """One random texture `[3, size, size]` float32 in [0, 1] and its kind.

    Kinds (`kind=None`: one at random): `noise` (bicubic colour noise on a 3-8 cell lattice, contrast
    stretched), `stripes` (two colours, a sine of period 6-28 px at any angle, softness random up to square
    waves), `checkers` (two colours, squares of 8-32 px at any angle), `blotches` (three colours, a smooth field
    cut at its terciles, edges slightly soft). Every kind gets a low-amplitude smooth colour shading and a faint
    grey pixel grain, so no background is flat.
    """
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))] if kind is None else kind
    if kind == "noise":
        colours = palette(rng, 2)
        field = smooth_noise(rng, int(rng.integers(3, 9)), 3, size)
        lo, hi = field.min(axis=(1, 2), keepdims=True), field.max(axis=(1, 2), keepdims=True)
        stretched = (field - lo) / np.maximum(hi - lo, 1e-3)
        image = _mix(colours, stretched.mean(0)) * 0.5 + stretched * 0.5
    elif kind == "stripes":
        colours = palette(rng, 2)
        u, _ = _rotated(rng, size, rng.uniform(6.0, 28.0))
        sharpness = np.float32(rng.uniform(1.0, 10.0))
        image = _mix(colours, 1.0 / (1.0 + np.exp(-sharpness * np.sin(2.0 * np.pi * u))))
    elif kind == "checkers":
        colours = palette(rng, 2)
        u, v = _rotated(rng, size, rng.uniform(8.0, 32.0))
        image = _mix(colours, ((np.floor(u) + np.floor(v)) % 2.0).astype(np.float32))
    elif kind == "blotches":
        colours = palette(rng, 3)
        field = smooth_noise(rng, int(rng.integers(4, 10)), 1, size)[0]
        sample = np.sort(field.ravel()[::7])
        low, high = sample[len(sample) // 3], sample[2 * len(sample) // 3]
        steep = np.float32(60.0)
        first = 1.0 / (1.0 + np.exp(-steep * (field - low)))
        second = 1.0 / (1.0 + np.exp(-steep * (field - high)))
        image = _mix(colours[:2], first) * (1.0 - second) + colours[2][:, None, None] * second
    else:
        raise ValueError(f"texture kind '{kind}' is unknown; allowed: {list(TEXTURES)}")
    shading = (smooth_noise(rng, 3, 3, size) - 0.5) * np.float32(rng.uniform(0.1, 0.3))
    grain = (rng.random((size, size), dtype=np.float32) - 0.5) * np.float32(rng.uniform(0.0, 0.06))
    image = np.clip(image + shading + grain, 0.0, 1.0).astype(np.float32, copy=False)
    return image, kind
