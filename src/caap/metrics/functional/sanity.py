"""Model-randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

Cascading randomisation: starting from the top of the network, the weights of the head and then of blocks
L-1, ..., 0 are re-initialised one after the other (cumulatively), and the maps recomputed after each stage
are compared with the original maps by Spearman rank correlation (and SSIM). A method whose maps depend on
what the model learned must lose similarity as the cascade proceeds.

The re-initialisation uses timm's own ViT init (`caap.models.reinitialise`) on a *deep copy* of the model:
the evaluated model is never touched. Each stage is seeded (`seed + stage`), so a stage's
weights are the same in every batch and on every rank.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.functional.image import structural_similarity_index_measure

from caap.models.reinitialise import reinitialise
from caap.models.vit import ViTClassifier


def cascade_stages(depth: int) -> list[str]:
    """Stage names of the cascade for a `depth`-block ViT, top first: 'head', 'block{L-1}', ..., 'block0'."""
    return ["head", *(f"block{j}" for j in range(depth - 1, -1, -1))]


@torch.no_grad()
def cascading_randomisation(
    model: ViTClassifier,
    stages: int | None = None,
    seed: int = 0,
    control: bool = False,
    cumulative: bool = True,
) -> Iterator[tuple[str, ViTClassifier]]:
    """Yield `(stage name, randomised copy)` for the first `stages` stages of the cascade (all: head + L blocks).

    One deep copy of `model` is made and randomised further at each stage (cumulative, top first), so the
    copy yielded at stage s has the head and the s-1 top blocks re-initialised; consume each before the next.
    `control=True` first yields `('original', the unrandomised copy)`: the method re-run on the same weights,
    the reference a deterministic method reproduces exactly (correlation 1). `cumulative=False` is Adebayo et
    al.'s *independent* randomisation: each stage re-initialises only its own layer(s) on a fresh copy.
    """
    names = cascade_stages(model.depth)
    n = len(names) if stages is None else int(stages)
    if not 1 <= n <= len(names):
        raise ValueError(f"stages must be in 1..{len(names)} for a {model.depth}-block model, got {stages}")
    copy_ = copy.deepcopy(model)
    if control:
        yield "original", copy_
    devices = [copy_.mean.device] if copy_.mean.device.type == "cuda" else []
    for s, name in enumerate(names[:n]):
        if not cumulative and (s > 0 or control):
            copy_ = copy.deepcopy(model)
        targets = copy_.head_modules() if name == "head" else [copy_.blocks[int(name[len("block") :])]]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + s)
            for target in targets:
                reinitialise(target)
        yield name, copy_


def spearman_per_map(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation `[P]` between maps `a` and `b` `[P, ...]` (ties get average ranks).

    NaN where either map is constant (its ranking is undefined) or has a non-finite entry.
    """
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    x, y = a.flatten(1).double(), b.flatten(1).double()
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=a.device)
    ok = torch.isfinite(x).all(1) & torch.isfinite(y).all(1)
    x, y = torch.nan_to_num(x), torch.nan_to_num(y)
    ok &= (x.amax(1) > x.amin(1)) & (y.amax(1) > y.amin(1))
    rho = spearman_corrcoef(x.T.contiguous(), y.T.contiguous()).reshape(-1).double()
    return torch.where(ok, rho, float("nan"))


def ssim_per_map(a: Tensor, b: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """SSIM `[P]` between maps `[P, gh, gw]`, each min-max normalised to [0, 1] (data range 1) after nearest
    upsampling to `size` (Adebayo et al. compare normalised maps at image size); torchmetrics' SSIM with its
    default 11x11 Gaussian window. NaN for a map with a non-finite entry."""
    from caap.metrics.functional.segmentation import minmax_normalise

    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=a.device)
    x, y = a.float()[:, None], b.float()[:, None]
    if size is not None:
        x, y = F.interpolate(x, size=size, mode="nearest"), F.interpolate(y, size=size, mode="nearest")
    ok = torch.isfinite(x.flatten(1)).all(1) & torch.isfinite(y.flatten(1)).all(1)
    x, y = torch.nan_to_num(minmax_normalise(x)), torch.nan_to_num(minmax_normalise(y))
    # a tuple only with return_full_image / return_contrast_sensitivity, which are off here
    ssim = cast(Tensor, structural_similarity_index_measure(x, y, data_range=1.0, reduction="none"))
    value = ssim.reshape(-1).double()
    return torch.where(ok, value, float("nan"))
