"""Reference token embeddings `r_0` `[B, T, D]`: what token-replacement faithfulness puts in place of removed
tokens, and Integrated Gradients' baseline.

A token reference is `zero_tokens` (all-zero token embeddings, LibraGrad's rule for models whose token
sequence cannot shrink) or any reference image (`caap.references.images`), whose `r_0` is used: its prefix
tokens and position embeddings equal the source's, so only the patch content differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from caap.models.vit import ViTClassifier
from caap.references.images import IMAGE_KINDS, ReferenceImage, build_reference, reference_options

ZERO_TOKENS = "zero_tokens"
TOKEN_KINDS = (ZERO_TOKENS, *IMAGE_KINDS)

TokenReference = ReferenceImage | str
"""A `ReferenceImage`, or `ZERO_TOKENS`."""


def build_token_reference(
    config: TokenReference | Mapping[str, Any],
    key: str = "baseline",
    allowed: Sequence[str] = TOKEN_KINDS,
) -> TokenReference:
    """`ZERO_TOKENS` or the `ReferenceImage` of a kind name or mapping; a clear error for a kind outside
    `allowed` and for a reference that needs data it was not given (`dataset_mean` without `path`)."""
    if isinstance(config, ReferenceImage):
        return config
    options = reference_options(config, key, allowed)
    if options["kind"] == ZERO_TOKENS:
        if len(options) > 1:
            raise ValueError(f"{key}.kind='{ZERO_TOKENS}' takes no options, got {sorted(options)}")
        return ZERO_TOKENS
    reference = build_reference(options, key, allowed)
    if reference.needs_data:
        raise ValueError(f"{key}.kind={reference.kind!r} needs {key}.path (a saved mean image) here")
    return reference


def reference_tokens(model: ViTClassifier, images: Tensor, reference: TokenReference) -> Tensor:
    """Reference token embeddings `[B, T, D]` for source images `[B, 3, H, W]`: all zeros for `zero_tokens`,
    else `model.embed` of the reference image (its first sample, broadcast over the batch when shared)."""
    if isinstance(reference, str):
        if reference != ZERO_TOKENS:
            raise ValueError(f"token reference {reference!r}: build it with build_token_reference first")
        r0 = model.embed(images[:1])
        return r0.new_zeros(images.shape[0], *r0.shape[1:])
    base = reference.images(images, model)  # [S, 1 | B, 3, H, W]
    base = base[0].expand(images.shape[0], *images.shape[1:])
    return model.embed(base.to(images.dtype))
