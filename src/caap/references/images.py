"""Reference images in pixel space (`[.., 3, H, W]`, values in [0, 1], normalised by the model inside): CAAP's
neutral contexts and the baselines of the perturbation metrics.

`images(source, model)` returns `[S, B or 1, 3, H, W]`: S samples (several only for noise, whose maps CAAP
averages) and a batch dimension of B when the reference depends on the source image (blur) or 1 when it does
not (then CAAP computes its residual prefix once for the whole run).

Kinds (`kind`): `black`, `mean_color` (a constant colour: `rgb`, or the model's normalisation mean, i.e. a
zero input after normalisation), `blur` (Gaussian blur of the source, `sigma` in pixels), `noise` (Gaussian or
uniform, `seed`, `num_samples`), `image` (a fixed image file resized to the input size), `dataset_mean` (the
mean image of a dataset, from `prepare(dataset_or_loader, max_images)` or a saved tensor file).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from caap.models.vit import ViTClassifier

IMAGE_KINDS = ("black", "mean_color", "blur", "noise", "image", "dataset_mean")
NOISE_DISTRIBUTIONS = ("gaussian", "uniform")


def _check_source(source: Tensor) -> None:
    if source.ndim != 4 or source.shape[1] != 3:
        raise ValueError(f"reference images: expected source images [B, 3, H, W], got {tuple(source.shape)}")


def _rgb(value: float | Sequence[float], key: str) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{key}={list(value)!r} must be one number or three (R, G, B) in [0, 1]")
    return values


def _resize(image: Tensor, size: tuple[int, ...]) -> Tensor:
    """Bilinear (antialiased) resize of `[N, 3, h, w]` to `size`; a no-op when it already has that size."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


class ReferenceImage(ABC):
    """Pixel-space reference images for source images: what CAAP patches into, what metrics perturb towards.

    Attributes:
        kind: the config name of the reference.
        depends_on_image: whether the images depend on the source image (then CAAP recomputes its neutral
            prefix per batch; otherwise it is computed once per run and cached).
        num_samples: S, the number of samples; CAAP averages its maps over them.
    """

    kind: str = "reference"
    depends_on_image: bool = False
    num_samples: int = 1

    def __init__(self, *, key: str = "neutral") -> None:
        self._key = key  # the config entry that holds this reference (`neutral`, `baseline`), for messages

    @abstractmethod
    def images(self, source: Tensor, model: ViTClassifier) -> Tensor:
        """Reference images `[S, B or 1, 3, H, W]` (pixel space, [0, 1]) for source images `[B, 3, H, W]`.

        The batch dimension is B when `depends_on_image`, else 1. Dtype and device follow `source`.
        """

    def cache_key(self) -> Hashable:
        """A value that changes whenever the images this context produces (for a given size) change."""
        return (self.kind, id(self))

    def prepare(self, data: Any, max_images: int | None = None) -> None:  # noqa: B027  (optional hook)
        """Optional hook to compute statistics from data (`dataset_mean`); a no-op for the other kinds."""

    @property
    def needs_data(self) -> bool:
        """Whether `prepare` must be called (or a file given) before `images` can be used."""
        return False

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class BlackImage(ReferenceImage):
    """All-zero (black) images `[1, 1, 3, H, W]`; the blank FashionGrid canvas, an in-distribution context."""

    kind = "black"

    def images(self, source: Tensor, model: ViTClassifier) -> Tensor:
        _check_source(source)
        return source.new_zeros((1, 1, *source.shape[1:]))

    def cache_key(self) -> Hashable:
        return ("black",)


class MeanColorImage(ReferenceImage):
    """A constant colour `[1, 1, 3, H, W]`: `rgb` if given, else the model's normalisation mean (`model.mean`).

    Args:
        rgb: one value or three (R, G, B) in [0, 1]; None uses `model.mean` (i.e. a zero input after
            normalisation).
    """

    kind = "mean_color"

    def __init__(self, rgb: float | Sequence[float] | None = None, *, key: str = "neutral") -> None:
        super().__init__(key=key)
        self.rgb = None if rgb is None else _rgb(rgb, f"{key}.rgb")

    def images(self, source: Tensor, model: ViTClassifier) -> Tensor:
        _check_source(source)
        if self.rgb is None:
            colour = model.mean.reshape(3).to(device=source.device, dtype=source.dtype)
        else:
            colour = torch.tensor(self.rgb, device=source.device, dtype=source.dtype)
        return colour.view(1, 1, 3, 1, 1).expand(1, 1, 3, *source.shape[-2:]).contiguous()

    def cache_key(self) -> Hashable:
        return ("mean_color", self.rgb)


def gaussian_blur(images: Tensor, sigma: float, kernel_size: int | None = None) -> Tensor:
    """Separable Gaussian blur of `[B, C, H, W]` with `sigma` in pixels (replicate padding).

    `kernel_size` defaults to `2 * ceil(3 * sigma) + 1`; it must be odd.
    """
    if sigma <= 0:
        return images.clone()
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3 * sigma) + 1
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size={kernel_size} must be a positive odd integer")
    half = kernel_size // 2
    coords = torch.arange(kernel_size, device=images.device, dtype=torch.float32) - half
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    c = images.shape[1]
    x = F.pad(images, (half, half, half, half), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


class BlurredImage(ReferenceImage):
    """A Gaussian blur of each source image: `[1, B, 3, H, W]`; depends on the image.

    Args:
        sigma: standard deviation in pixels (> 0).
        kernel_size: odd kernel size; None = `2 * ceil(3 * sigma) + 1`.
    """

    kind = "blur"
    depends_on_image = True

    def __init__(self, sigma: float = 5.0, kernel_size: int | None = None, *, key: str = "neutral") -> None:
        super().__init__(key=key)
        if not sigma > 0:
            raise ValueError(f"{key}.sigma={sigma!r} must be > 0 (pixels)")
        if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 != 1):
            raise ValueError(f"{key}.kernel_size={kernel_size} must be a positive odd integer")
        self.sigma = float(sigma)
        self.kernel_size = kernel_size

    def images(self, source: Tensor, model: ViTClassifier) -> Tensor:
        _check_source(source)
        return gaussian_blur(source, self.sigma, self.kernel_size).unsqueeze(0)

    def cache_key(self) -> Hashable:
        return ("blur", self.sigma, self.kernel_size)


class NoiseImages(ReferenceImage):
    """Noise images `[S, 1, 3, H, W]` drawn from a seeded generator (reproducible, the same for every batch).

    Args:
        distribution: `gaussian` (per pixel `mean + std * N(0, 1)`, clamped to [0, 1]) or `uniform` (U[0, 1]).
        mean, std: for `gaussian`; one value or three; None uses the model's normalisation mean / std, so the
            normalised input is about N(0, 1).
        seed: seed of the generator (CPU generator, so the noise is the same on every device).
        num_samples: S samples; CAAP averages the S maps.
    """

    kind = "noise"

    def __init__(
        self,
        distribution: str = "gaussian",
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        seed: int = 0,
        num_samples: int = 1,
        *,
        key: str = "neutral",
    ) -> None:
        super().__init__(key=key)
        if distribution not in NOISE_DISTRIBUTIONS:
            raise ValueError(
                f"{key}.distribution={distribution!r} is not supported; allowed: {list(NOISE_DISTRIBUTIONS)}"
            )
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"{key}.num_samples={num_samples!r} must be an integer >= 1")
        self.distribution = distribution
        self.mean = None if mean is None else _rgb(mean, f"{key}.mean")
        self.std = None if std is None else _rgb(std, f"{key}.std")
        self.seed = int(seed)
        self.num_samples = num_samples

    def images(self, source: Tensor, model: ViTClassifier) -> Tensor:
        _check_source(source)
        shape = (self.num_samples, 1, 3, *source.shape[-2:])
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        if self.distribution == "uniform":
            noise = torch.rand(shape, generator=gen)
        else:
            mean = model.mean.detach().cpu().reshape(3) if self.mean is None else torch.tensor(self.mean)
            std = model.std.detach().cpu().reshape(3) if self.std is None else torch.tensor(self.std)
            noise = torch.randn(shape, generator=gen) * std.view(1, 1, 3, 1, 1) + mean.view(1, 1, 3, 1, 1)
            noise = noise.clamp_(0.0, 1.0)
        return noise.to(device=source.device, dtype=source.dtype)

    def cache_key(self) -> Hashable:
        return ("noise", self.distribution, self.mean, self.std, self.seed, self.num_samples)


def _load_rgb_image(path: Path) -> Tensor:
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float().div_(255.0)


class FileImage(ReferenceImage):
    """A fixed image file (any format PIL reads), converted to RGB and resized to the input size: `[1, 1, 3, H, W]`.

    Args:
        path: the image file; a missing file raises `FileNotFoundError` at construction.
    """

    kind = "image"

    def __init__(self, path: str, *, key: str = "neutral") -> None:
        super().__init__(key=key)
        if path is None:
            raise ValueError(f"{key}.path is required for {key}.kind='image' (an image file)")
        self.path = str(path)
        resolved = Path(self.path).expanduser()
        if not resolved.is_file():
            raise FileNotFoundError(f"{key}.path='{self.path}' ({key}.kind='image') is not a file")
        self._image = _load_rgb_image(resolved)  # [3, h, w]

    def images(self, source: Tensor, model: ViTClassifier) -> Tensor:
        _check_source(source)
        image = self._image.to(device=source.device, dtype=torch.float32).unsqueeze(0)
        return _resize(image, tuple(source.shape[-2:])).to(source.dtype).unsqueeze(0)

    def cache_key(self) -> Hashable:
        return ("image", self.path)


def _batch_images(item: Any) -> Tensor | None:
    """The image tensor `[3, H, W]` or `[B, 3, H, W]` of a dataset item or loader batch (dict, tuple, tensor)."""
    if item is None:
        return None
    if isinstance(item, Tensor):
        return item
    if isinstance(item, Mapping):
        return item.get("image")
    if isinstance(item, list | tuple) and item:
        return _batch_images(item[0])
    raise TypeError(f"dataset_mean prepare: cannot find images in a {type(item).__name__}")


class DatasetMeanImage(ReferenceImage):
    """The mean image of a dataset `[1, 1, 3, H, W]`, resized to the input size when it differs.

    Either call `prepare(dataset_or_loader, max_images)` (items or batches as dicts with an `image` key,
    tuples whose first element is the image, or tensors) or give `path`, a tensor `[3, H, W]` saved by
    `save` (`torch.save`) or a safetensors file with an `image` tensor. `prepare` overrides the loaded file.

    Args:
        path: optional saved mean image; a missing file raises `FileNotFoundError` at construction.
        max_images: default cap on the number of images `prepare` averages.
    """

    kind = "dataset_mean"

    def __init__(
        self, path: str | None = None, max_images: int | None = 1024, *, key: str = "neutral"
    ) -> None:
        super().__init__(key=key)
        self.path = None if path is None else str(path)
        self.max_images = max_images
        self._mean: Tensor | None = None
        self._version = 0
        if self.path is not None:
            self._mean = self._load(Path(self.path).expanduser())

    def _load(self, path: Path) -> Tensor:
        if not path.is_file():
            raise FileNotFoundError(
                f"{self._key}.path='{path}' ({self._key}.kind='dataset_mean') is not a file"
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if "image" not in tensors:
                raise ValueError(
                    f"{self._key}.path='{path}' holds {sorted(tensors)}; expected an 'image' tensor"
                )
            mean = tensors["image"]
        else:
            mean = torch.load(path, map_location="cpu", weights_only=True)
        mean = mean.float().squeeze(0) if mean.ndim == 4 else mean.float()
        if mean.ndim != 3 or mean.shape[0] != 3:
            raise ValueError(
                f"{self._key}.path='{path}' holds a tensor {tuple(mean.shape)}; expected [3, H, W]"
            )
        self._version += 1
        return mean

    @property
    def needs_data(self) -> bool:
        return self._mean is None

    @property
    def mean_image(self) -> Tensor | None:
        """The mean image `[3, H, W]` (CPU, float32), or None before `prepare` / without a file."""
        return self._mean

    def prepare(self, data: Any, max_images: int | None = None) -> None:
        """Average up to `max_images` images of a dataset (indexable) or loader (iterable of batches)."""
        limit = max_images if max_images is not None else self.max_images
        total: Tensor | None = None
        count = 0
        if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, Tensor):
            n = len(data) if limit is None else min(len(data), limit)
            items: Iterable[Any] = (data[i] for i in range(n))
        else:
            items = data
        for item in items:
            images = _batch_images(item)
            if images is None:
                continue
            images = images.detach().float().cpu()
            if images.ndim == 3:
                images = images.unsqueeze(0)
            if limit is not None:
                images = images[: limit - count]
            batch_sum = images.double().sum(0)
            total = batch_sum if total is None else total + batch_sum
            count += images.shape[0]
            if limit is not None and count >= limit:
                break
        if total is None or count == 0:
            raise ValueError("dataset_mean prepare: the data yielded no images (it needs at least one)")
        self._mean = (total / count).float()
        self._version += 1

    def save(self, path: str) -> None:
        """Save the mean image `[3, H, W]` with `torch.save` (a `.safetensors` suffix saves safetensors)."""
        if self._mean is None:
            raise RuntimeError("dataset_mean: nothing to save; call prepare(dataset_or_loader) first")
        if str(path).endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file({"image": self._mean.contiguous()}, str(path))
        else:
            torch.save(self._mean, path)

    def images(self, source: Tensor, model: ViTClassifier) -> Tensor:
        _check_source(source)
        if self._mean is None:
            raise RuntimeError(
                f"{self._key}.kind='dataset_mean' has no mean image: call prepare(dataset_or_loader) (CAAP.prepare "
                f"for a neutral context) before use, or set {self._key}.path to a saved mean image"
            )
        mean = self._mean.to(device=source.device).unsqueeze(0)
        return _resize(mean, tuple(source.shape[-2:])).to(source.dtype).unsqueeze(0)

    def cache_key(self) -> Hashable:
        return ("dataset_mean", id(self), self._version)


_KINDS: dict[str, type[ReferenceImage]] = {
    "black": BlackImage,
    "mean_color": MeanColorImage,
    "blur": BlurredImage,
    "noise": NoiseImages,
    "image": FileImage,
    "dataset_mean": DatasetMeanImage,
}
RETIRED_KINDS = {
    "zero": "'mean_color' (a zero input after normalisation) or, for token embeddings, 'zero_tokens'",
    "mean": "'mean_color'",
}
"""Kind names that meant different things in different places, with what to write instead."""


def reference_options(config: Any, key: str, allowed: Sequence[str]) -> dict[str, Any]:
    """`{kind: ..., **options}` of a kind name, a mapping or (key, value) pairs, with a clear error naming `key`
    for a kind that is not in `allowed` (and what to write for a retired one)."""
    if isinstance(config, str):
        options: dict[str, Any] = {"kind": config}
    else:
        try:
            options = dict(config)  # a mapping (also an OmegaConf DictConfig) or (key, value) pairs
        except (TypeError, ValueError):
            options = {}
    if "kind" not in options:
        raise ValueError(
            f"{key}={config!r} must be a kind name, a mapping with a 'kind' key, or a ReferenceImage; "
            f"allowed kinds: {list(allowed)}"
        )
    kind = options.get("kind")
    if kind not in allowed:
        hint = f"; use {RETIRED_KINDS[kind]}" if kind in RETIRED_KINDS else ""
        raise ValueError(f"{key}.kind={kind!r} is not supported; allowed kinds: {list(allowed)}{hint}")
    return options


def build_reference(
    config: ReferenceImage | str | Mapping[str, Any] | None,
    key: str = "neutral",
    allowed: Sequence[str] = IMAGE_KINDS,
) -> ReferenceImage:
    """A `ReferenceImage` from an instance, a kind name (`"black"`), or a mapping `{kind: ..., **options}`;
    None gives `black`. `key` names the config entry in messages; `allowed` the kinds this user accepts.

    Raises:
        ValueError: for a kind outside `allowed` (naming the allowed kinds) or unknown options of a kind.
    """
    if config is None:
        return BlackImage()
    if isinstance(config, ReferenceImage):
        return config
    options = reference_options(config, key, allowed)
    kind = options.pop("kind")
    cls = _KINDS[kind]
    try:
        return cls(**options, key=key)
    except TypeError as err:
        raise ValueError(f"{key}.kind={kind!r}: bad options {sorted(options)} ({err})") from err
