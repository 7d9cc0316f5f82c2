"""Reference inputs, below both methods and metrics: images in pixel space (CAAP's neutral contexts, the
pixel and token baselines of the faithfulness metrics), token embeddings (token replacement, Integrated
Gradients) and constant pixel values (occlusion-style Captum methods).

One vocabulary of kinds: `black`, `mean_color`, `blur`, `noise`, `image`, `dataset_mean` (images) and
`zero_tokens` (all-zero token embeddings). Each user accepts the subset that makes sense for it.
"""

from caap.references.images import (
    IMAGE_KINDS,
    RETIRED_KINDS,
    BlackImage,
    BlurredImage,
    DatasetMeanImage,
    FileImage,
    MeanColorImage,
    NoiseImages,
    ReferenceImage,
    build_reference,
    gaussian_blur,
)
from caap.references.pixel_value import check_pixel_value
from caap.references.tokens import (
    TOKEN_KINDS,
    ZERO_TOKENS,
    TokenReference,
    build_token_reference,
    reference_tokens,
)

__all__ = [
    "IMAGE_KINDS",
    "RETIRED_KINDS",
    "TOKEN_KINDS",
    "ZERO_TOKENS",
    "BlackImage",
    "BlurredImage",
    "DatasetMeanImage",
    "FileImage",
    "MeanColorImage",
    "NoiseImages",
    "ReferenceImage",
    "TokenReference",
    "build_reference",
    "build_token_reference",
    "check_pixel_value",
    "gaussian_blur",
    "reference_tokens",
]
