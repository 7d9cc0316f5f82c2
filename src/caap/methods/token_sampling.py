"""Token-level input sampling, in the spirit of TIS (Englebert et al., "Transformer Input Sampling", 2023).

`num_samples` random subsets of patch tokens are kept (each patch token kept independently with probability
`keep_prob`; prefix tokens, CLS and registers, always kept); the others are removed by the token-removal
engine's `mask` mode (`caap.token_removal`: hidden from every query by an attention key mask, patch pools over
the kept tokens only). The attribution of patch i is the mean target score (`prob` or `logit`, `caap.scores`)
of the samples that keep i minus the mean of the samples that drop it. TIS proper samples subsets guided by token
clusters and regresses; this is the plain, unguided, averaged form.

Seeded: the subsets are a pure function of `seed` and the grid size, shared by every image (maps do not
depend on batching). Batched: `batch_size` sequences (images x subsets) per forward from one `r_0` per image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caap.methods.base import AttributionMethod
from caap.methods.option_checks import check_positive_int, check_probability
from caap.models.vit import ViTClassifier
from caap.scores import PROB_OR_LOGIT, check_score, target_score
from caap.token_removal import removal_logits


def check_token_removal(model: ViTClassifier) -> None:
    """Token sampling removes tokens: a clear error on models that cannot lose them (MLP-Mixer)."""
    model.check_token_removal("token sampling")


def sample_keep(num_samples: int, n: int, keep_prob: float, seed: int) -> Tensor:
    """`[num_samples, n]` bool kept-token subsets; no subset is empty (an empty one keeps a random token)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(num_samples, n, generator=g) < keep_prob
    fallback = torch.randint(0, n, (num_samples,), generator=g)
    empty = ~keep.any(1)
    keep[empty, fallback[empty]] = True
    return keep


class TokenSampling(AttributionMethod):
    """Mean score with the token kept minus mean score with it dropped, `[B, gh, gw]`."""

    requires_grad = False
    name = "token_sampling"

    def __init__(
        self,
        num_samples: int = 512,
        keep_prob: float = 0.5,
        score: str = "prob",
        batch_size: int = 512,
        seed: int = 0,
    ) -> None:
        self.num_samples = check_positive_int("num_samples", num_samples)
        self.keep_prob = check_probability("keep_prob", keep_prob)
        self.score = check_score(score, PROB_OR_LOGIT, key="method.score")
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.seed = int(seed)

    def setup(self, model: ViTClassifier) -> None:
        check_token_removal(model)

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        check_token_removal(model)
        b = images.shape[0]
        gh, gw = model.grid_size(images)
        n = gh * gw
        keep = sample_keep(self.num_samples, n, self.keep_prob, self.seed).to(images.device)  # [K, N]
        r0 = model.embed(images)  # [B, T, D]
        scores = torch.empty(b, self.num_samples, device=images.device)
        per_chunk = max(1, self.batch_size // b)
        for s in range(0, self.num_samples, per_chunk):
            kp = keep[s : s + per_chunk]  # [k, N]
            k = kp.shape[0]
            rows = torch.arange(b, device=images.device).repeat_interleave(k)  # image-major
            logits = removal_logits(model, r0, kp.repeat(b, 1), rows, "mask", max_batch=b * k).float()
            scores[:, s : s + k] = target_score(
                logits, target.repeat_interleave(k), self.score, model.multilabel
            ).reshape(b, k)
        kf = keep.float()
        kept = scores @ kf / kf.sum(0).clamp_min(1.0)
        dropped = scores @ (1 - kf) / (1 - kf).sum(0).clamp_min(1.0)
        return (kept - dropped).reshape(b, gh, gw)
