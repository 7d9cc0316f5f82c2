"""A closed-form weighted linear surrogate for Captum's `Lime` / `KernelShap` (no scikit-learn needed).

Captum's defaults wrap scikit-learn (`SkLearnLinearRegression` for KernelSHAP, `SkLearnLasso` for LIME),
which this environment does not ship. `WeightedRidge` implements Captum's `Model` interface with an exact
weighted least-squares fit (float64 `torch.linalg.lstsq`): it minimises
`sum_i w_i (y_i - x_i . beta - b)^2 / sum_i w_i + alpha * |beta|^2` (intercept not penalised). With
`alpha = 0` this is the weighted linear regression KernelSHAP prescribes (Lundberg and Lee 2017; Captum's
sampler draws coalitions from the Shapley kernel and weights the empty and full coalitions by 1e6).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from captum._utils.models.model import Model
from torch import Tensor
from torch.utils.data import DataLoader


class WeightedRidge(Model):
    """Weighted ridge regression with intercept, solved in closed form; `representation()` = `[1, F]`."""

    def __init__(self, alpha: float = 0.0) -> None:
        self.alpha = float(alpha)
        self.coef: Tensor | None = None
        self.intercept: Tensor | None = None

    def fit(self, train_data: DataLoader, **kwargs: object) -> dict[str, float]:
        xs, ys, ws = [], [], []
        for batch in train_data:
            x, y = batch[0], batch[1]
            w = batch[2] if len(batch) > 2 else torch.ones(x.shape[0])
            xs.append(x.reshape(x.shape[0], -1))
            ys.append(y.reshape(-1))
            ws.append(w.reshape(-1))
        x = torch.cat(xs).double().cpu()
        y = torch.cat(ys).double().cpu()
        w = torch.cat(ws).double().cpu().clamp_min(0)
        w = w / w.sum().clamp_min(torch.finfo(torch.float64).tiny)
        n, f = x.shape
        design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1) * w.sqrt()[:, None]
        rhs = y * w.sqrt()
        if self.alpha > 0:
            penalty = torch.cat([torch.eye(f, dtype=x.dtype), torch.zeros(f, 1, dtype=x.dtype)], dim=1)
            design = torch.cat([design, penalty * self.alpha**0.5])
            rhs = torch.cat([rhs, torch.zeros(f, dtype=x.dtype)])
        # gelsd: minimum-norm solution, robust when fewer samples than features or collinear coalitions
        sol = torch.linalg.lstsq(design, rhs[:, None], driver="gelsd").solution[:, 0]
        self.coef, self.intercept = sol[:f].float(), sol[f].float()
        return {"num_samples": n}

    def representation(self) -> Tensor:
        if self.coef is None:
            raise RuntimeError("WeightedRidge.representation() before fit()")
        return self.coef[None]

    def __call__(self, x: Tensor) -> Tensor:
        if self.coef is None or self.intercept is None:
            raise RuntimeError("WeightedRidge called before fit()")
        return x.reshape(x.shape[0], -1).float() @ self.coef.to(x.device) + self.intercept.to(x.device)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with torch's global RNG seeded, restoring the RNG state afterwards (for Captum's sampling)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def attribute_per_image(
    explainer: Any,
    images: Tensor,
    target: Tensor,
    feature_mask: Tensor,
    grid: tuple[int, int],
    seed: int,
    baseline: float,
    n_samples: int,
    perturbations_per_eval: int,
) -> Tensor:
    """Run a Captum surrogate explainer (KernelShap, Lime) image by image, as Captum requires.

    Each image gets the same seed, so its map does not depend on its position in the batch. Returns the
    per-patch coefficients as maps `[B, gh, gw]`.
    """
    maps = []
    for i in range(images.shape[0]):
        with seeded(seed, images.device):
            coef = explainer.attribute(
                images[i : i + 1].float(),
                baselines=baseline,
                target=int(target[i]),
                feature_mask=feature_mask,
                n_samples=n_samples,
                perturbations_per_eval=perturbations_per_eval,
                return_input_shape=False,
            )
        maps.append(coef.reshape(*grid).to(images.device).float())
    return torch.stack(maps)
