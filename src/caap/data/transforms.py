"""The model's evaluation preprocessing (timm's data config) for images and, identically, their masks.

timm evaluates a model by resizing the shorter side to `floor(S / crop_pct)` and centre-cropping `S x S`
(`timm.data.transforms_factory.transforms_imagenet_eval`, crop_mode `center`). `EvalTransform` does the same
with torchvision's v2 transforms, which resize a `tv_tensors.Mask` with nearest-neighbour interpolation and
crop it at the same place, so a segmentation map stays aligned with its image. Normalisation is left to the
model (`ViTClassifier.normalize`): images stay in pixel space [0, 1]. timm's own transform was considered and
not used because it cannot carry a mask along.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def resize_size(image_size: int, crop_pct: float | None) -> int:
    """The shorter side before the centre crop: `floor(S / crop_pct)` as timm computes it (S for None / 1)."""
    if crop_pct is None:
        return image_size
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct={crop_pct} must lie in (0, 1]")
    return math.floor(image_size / crop_pct)


class EvalTransform:
    """PIL image (and optional class-id map `[H, W]`) -> `([3, S, S]` float in [0, 1], `[S, S]` long or None).

    Args:
        image_size: S, the model's input side.
        crop_pct: centre-crop fraction of timm's data config (None: resize straight to S, no margin).
        interpolation: image interpolation (`bicubic`, `bilinear`, `nearest`); masks always use nearest.
        resize: explicit shorter side before the crop (overrides `crop_pct`).
    """

    def __init__(
        self,
        image_size: int,
        crop_pct: float | None = None,
        interpolation: str | None = "bicubic",
        resize: int | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive; got {image_size}")
        interpolation = interpolation or "bicubic"
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation='{interpolation}' is not supported; allowed: {list(INTERPOLATIONS)}"
            )
        self.image_size = image_size
        self.resize = resize or resize_size(image_size, crop_pct)
        self.transform = v2.Compose(
            [
                v2.Resize(self.resize, interpolation=InterpolationMode(interpolation), antialias=True),
                v2.CenterCrop(image_size),
            ]
        )

    def __call__(
        self, image: Image.Image, segmentation: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        # the PIL image goes through PIL's resize, exactly as timm's eval transform does
        image = image.convert("RGB")
        if segmentation is None:
            return self._to_tensor(self.transform(image)), None
        if tuple(segmentation.shape) != (image.height, image.width):
            raise ValueError(
                f"segmentation map of shape {tuple(segmentation.shape)} does not match the image "
                f"{(image.height, image.width)}"
            )
        out, mask = self.transform(image, tv_tensors.Mask(segmentation.long()))
        return self._to_tensor(out), mask.as_subclass(Tensor).long()

    @staticmethod
    def _to_tensor(image: Image.Image) -> Tensor:
        return v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True).as_subclass(
            Tensor
        )

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, resize={self.resize})"
