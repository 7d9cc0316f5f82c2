"""Segmentation ground truth for localisation metrics: ImageNet-S, ImageNet-Segmentation (Gur et al.), Pascal VOC.

Every dataset here returns `{image [3, S, S], target [C], index, path, segmentation [S, S] long}`, with the
segmentation map in the compact class-id form of `caap.batch` (c >= 0: class c of the model's label space,
BACKGROUND, FOREGROUND for an object of a class the model does not name, IGNORE for void pixels). Image and
map go through the same resize and centre crop (`EvalTransform`, the model's timm data config).

- ImageNet-S (Gao et al., TPAMI 2022; LUSSeg/ImageNet-S): `ImageNetS{50,300,919}/validation/<wnid>/<name>.JPEG`
  and `validation-segmentation/<wnid>/<name>.png`, class id = `R + 256 * G` of the PNG, 0 = background,
  1000 = ignore; id k (1..V) is the k-th synset of the variant's categories in sorted order
  (`ImageNetS_categories_im919.txt`), mapped here to timm's ImageNet-1k index.
- ImageNet-Segmentation (Guillaumin, Kuettel and Ferrari, IJCV 2014, as released by Gur et al. and used by
  Chefer et al.): `gtsegs_ijcv.mat`, MATLAB v7.3 (HDF5): `/value/img` `[N, 1]` references to `[3, W, H]` uint8
  images, `/value/gt` `[N, 1]` references to 1x1 cells referencing `[W, H]` 0/1 masks (MATLAB column-major,
  so both are transposed). No class labels: objects are FOREGROUND (use target=pred).
- Pascal VOC segmentation (Everingham et al.): `JPEGImages/<id>.jpg`, palette PNGs `SegmentationClass/<id>.png`
  (0 background, 1..20 the classes, 255 void), `ImageSets/Segmentation/<split>.txt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from caap.batch import BACKGROUND, FOREGROUND, IGNORE
from caap.data.image_folder import IMAGE_EXTENSIONS, data_path
from caap.data.imagenet import imagenet_class_names, imagenet_wnids
from caap.data.readable import RememberedReads
from caap.data.transforms import EvalTransform

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
IMAGENET_S_VARIANTS = (50, 300, 919)
IMAGENET_S_IGNORE = 1000


class SegmentationDataset(Dataset):
    """Base: images with class-id segmentation maps, resized and cropped together.

    Subclasses fill `self.items` (one entry per sample) and implement `read(index) -> (PIL image, [H, W] long
    class-id map, [C] float image labels)`. An unreadable sample gives None (with a warning, once), and
    `readable` tells so, as in `ImageFolderDataset`.
    """

    items: list
    num_classes: int | None
    class_names: list[str] | None
    has_labels: bool = True  # False: targets are all zero (no class labels), so runs need target=pred

    def __init__(
        self, image_size: int, crop_pct: float | None = None, interpolation: str | None = "bicubic"
    ) -> None:
        self.image_size = image_size
        self.transform = EvalTransform(image_size, crop_pct, interpolation)
        self._reads = RememberedReads(self.read, self.describe, (OSError, KeyError), "sample")

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> tuple[Image.Image, Tensor, Tensor]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return str(self.items[index])

    def read_or_none(self, index: int) -> tuple[Image.Image, Tensor, Tensor] | None:
        """`read(index)`, or None when a file of the sample cannot be read (a warning the first time; the answer
        is remembered)."""
        return self._reads(index)

    def readable(self, index: int) -> bool:
        """Whether sample `index` reads (read at the first ask, then remembered)."""
        return self._reads.readable(index)

    def __getitem__(self, index: int) -> dict | None:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{type(self).__name__} index {index} out of range [0, {len(self)})")
        index = index % len(self)
        sample = self.read_or_none(index)
        if sample is None:
            return None
        image, seg, target = sample
        pixels, resized = self.transform(image, seg)
        return {
            "image": pixels,
            "target": target,
            "index": index,
            "path": self.describe(index),
            "segmentation": resized,
        }


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def decode_imagenet_s(png: np.ndarray) -> np.ndarray:
    """ImageNet-S class ids `[H, W]` (int64) from the RGB(A) PNG array `[H, W, 3|4]`: `R + 256 * G`."""
    if png.ndim != 3 or png.shape[2] < 2:
        raise ValueError(f"ImageNet-S masks are RGB PNGs (id = R + 256 G); got an array of shape {png.shape}")
    return png[..., 0].astype(np.int64) + 256 * png[..., 1].astype(np.int64)


class ImageNetS(SegmentationDataset):
    """ImageNet-S validation (or test) images with their semantic segmentation, in timm's ImageNet-1k classes.

    Args:
        root: the `ImageNetS919` (or 300 / 50) folder holding `validation/` and `validation-segmentation/`.
        image_size, crop_pct, interpolation: the model's preprocessing (filled from the model in a run).
        variant: 50, 300 or 919 categories.
        split: `validation` or `test` (masks in `<split>-segmentation/`).
        categories_file: the variant's `ImageNetS_categories_im{variant}.txt` (one synset per line); default:
            the synset folders of the segmentation split, when there are exactly `variant` of them.
        num_classes: the model's head size; must be 1000 (ImageNet-1k label space).
        class_names: names for tables (default timm's ImageNet names).

    target `[1000]`: the image's synset folder plus every class present in its mask.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        crop_pct: float | None = None,
        interpolation: str | None = "bicubic",
        variant: int = 919,
        split: str = "validation",
        categories_file: str | Path | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(image_size, crop_pct, interpolation)
        if variant not in IMAGENET_S_VARIANTS:
            raise ValueError(f"ImageNetS variant={variant} is not one of {list(IMAGENET_S_VARIANTS)}")
        if num_classes not in (None, 1000):
            raise ValueError(
                f"ImageNetS scores ImageNet-1k classes, but the model has num_classes={num_classes}"
            )
        self.root = data_path(root, "imagenet_s")
        self.image_dir, self.mask_dir = self.root / split, self.root / f"{split}-segmentation"
        for d in (self.image_dir, self.mask_dir):
            if not d.is_dir():
                raise FileNotFoundError(
                    f"ImageNetS: {d} is not a folder; root must be the ImageNetS{variant} folder holding "
                    f"'{split}/' and '{split}-segmentation/'"
                )
        folders = sorted(p.name for p in self.mask_dir.iterdir() if p.is_dir())
        if categories_file is not None:
            path = Path(categories_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"ImageNetS categories_file {path} not found")
            categories = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        elif len(folders) == variant:
            categories = folders
        else:
            raise ValueError(
                f"ImageNetS: {self.mask_dir} has {len(folders)} synset folders, not {variant}; pass "
                f"categories_file=ImageNetS_categories_im{variant}.txt (from LUSSeg/ImageNet-S data/categories)"
            )
        if len(categories) != variant:
            raise ValueError(f"ImageNetS categories list {len(categories)} synsets, expected {variant}")
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        unknown = [w for w in categories if w not in index]
        if unknown:
            raise ValueError(f"ImageNetS categories {unknown[:5]} are not ImageNet-1k synsets")
        # lookup table: ImageNet-S id -> value of the compact segmentation map
        self.id_to_class = np.full(IMAGENET_S_IGNORE + 1, IGNORE, dtype=np.int64)
        self.id_to_class[0] = BACKGROUND
        for k, wnid in enumerate(sorted(categories), start=1):
            self.id_to_class[k] = index[wnid]
        self.variant = variant
        self.items = []
        for png in sorted(self.mask_dir.glob("*/*.png")):
            if png.parent.name not in index:
                raise ValueError(f"ImageNetS: folder {png.parent.name} of {png} is not an ImageNet-1k synset")
            image = _find_image(self.image_dir / png.parent.name, png.stem)
            if image is None:
                raise FileNotFoundError(
                    f"ImageNetS: no image for mask {png} under {self.image_dir / png.parent.name}"
                )
            self.items.append((image, png, index[png.parent.name]))
        if not self.items:
            raise ValueError(f"ImageNetS: no masks (*/*.png) under {self.mask_dir}")
        self.num_classes = 1000
        self.class_names = list(class_names) if class_names is not None else list(imagenet_class_names())

    def describe(self, index: int) -> str:
        return str(self.items[index][0])

    def read(self, index: int) -> tuple[Image.Image, Tensor, Tensor]:
        image_path, png_path, label = self.items[index]
        with Image.open(png_path) as png:
            ids = decode_imagenet_s(np.asarray(png.convert("RGB")))
        if ids.max() > IMAGENET_S_IGNORE or (ids.max() > self.variant and ids.max() != IMAGENET_S_IGNORE):
            bad = sorted(set(np.unique(ids)) - set(range(self.variant + 1)) - {IMAGENET_S_IGNORE})
            raise ValueError(f"ImageNetS mask {png_path} holds ids {bad[:5]} outside 0..{self.variant}, 1000")
        seg = torch.from_numpy(self.id_to_class[ids])
        with Image.open(image_path) as img:
            image = img.convert("RGB")
        target = torch.zeros(1000)
        target[label] = 1.0
        present = seg.unique()
        target[present[present >= 0]] = 1.0
        return image, seg, target


class ImageNetSegmentation(SegmentationDataset):
    """The ImageNet-Segmentation benchmark (4,276 images, binary object masks) from `gtsegs_ijcv.mat`.

    Args:
        path: the `gtsegs_ijcv.mat` file (MATLAB v7.3 / HDF5, read with h5py).
        image_size, crop_pct, interpolation: the model's preprocessing (filled from the model in a run).
        num_classes: the model's head size (targets are all-zero `[C]`: no labels, use target=pred).
        class_names: names of the model's classes, for tables.

    segmentation: FOREGROUND where the mask is 1, BACKGROUND elsewhere.
    """

    def __init__(
        self,
        path: str | Path,
        image_size: int,
        crop_pct: float | None = None,
        interpolation: str | None = "bicubic",
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        import h5py

        super().__init__(image_size, crop_pct, interpolation)
        self.path = data_path(path, "imagenet_segmentation")
        if not self.path.is_file():
            raise FileNotFoundError(
                f"ImageNetSegmentation: {self.path} not found (the gtsegs_ijcv.mat of Gur et al.'s release)"
            )
        with h5py.File(self.path, "r") as f:
            if "value" not in f or "img" not in f["value"] or "gt" not in f["value"]:
                raise ValueError(
                    f"ImageNetSegmentation: {self.path} lacks /value/img and /value/gt (keys: {list(f.keys())}); "
                    f"expected the MATLAB v7.3 gtsegs_ijcv.mat"
                )
            n = f["value/img"].shape[0]
        self.items = list(range(n))
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.has_labels = False  # object masks without classes
        self._file = None

    def describe(self, index: int) -> str:
        return f"{self.path}#{index}"

    def _h5(self):
        import h5py

        if self._file is None:  # opened lazily, once per worker process
            self._file = h5py.File(self.path, "r")
        return self._file

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def read(self, index: int) -> tuple[Image.Image, Tensor, Tensor]:
        f = self._h5()
        img = np.asarray(f[f["value/img"][index, 0]]).transpose(2, 1, 0)  # [3, W, H] -> [H, W, 3]
        cell = f[f["value/gt"][index, 0]]  # a 1x1 MATLAB cell of references
        gt = np.asarray(f[cell[0, 0]]).transpose(1, 0)  # [W, H] -> [H, W]
        seg = torch.from_numpy(np.where(gt > 0, FOREGROUND, BACKGROUND).astype(np.int64))
        image = Image.fromarray(np.ascontiguousarray(img.astype(np.uint8)))
        return image, seg, torch.zeros(self.num_classes or 0)


class VOCSegmentation(SegmentationDataset):
    """Pascal VOC semantic segmentation (`val` of VOC2012 by default) from palette PNGs.

    Args:
        root: the `VOC2012` folder (with JPEGImages/, SegmentationClass/, ImageSets/Segmentation/), or a folder
            holding `VOCdevkit/VOC<year>`.
        image_size, crop_pct, interpolation: the model's preprocessing (filled from the model in a run).
        split: a list in ImageSets/Segmentation (`train`, `val`, `trainval`).
        year: used to find `VOCdevkit/VOC<year>` under root.
        label_space: `foreground` (the model's classes are not VOC's, e.g. ImageNet: objects are FOREGROUND,
            targets all-zero, use target=pred) or `voc` (the model has a 20-class VOC head: class c = VOC c - 1,
            targets multi-hot over the classes present).
        num_classes, class_names: the model's head size and names (filled from the model in a run).
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        crop_pct: float | None = None,
        interpolation: str | None = "bicubic",
        split: str = "val",
        year: str = "2012",
        label_space: str = "foreground",
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(image_size, crop_pct, interpolation)
        if label_space not in ("foreground", "voc"):
            raise ValueError(
                f"VOCSegmentation label_space='{label_space}' is not one of ['foreground', 'voc']"
            )
        root = data_path(root, "voc_segmentation")
        if (root / "VOCdevkit" / f"VOC{year}").is_dir():
            root = root / "VOCdevkit" / f"VOC{year}"
        self.root = root
        split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(
                f"VOCSegmentation: {split_file} not found; root must be a VOC{year} folder (JPEGImages/, "
                f"SegmentationClass/, ImageSets/Segmentation/) or hold VOCdevkit/VOC{year}"
            )
        ids = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        self.items = ids
        self.label_space = label_space
        self.has_labels = label_space == "voc"  # foreground: objects without the model's classes
        if label_space == "voc":
            if num_classes not in (None, len(VOC_CLASSES)):
                raise ValueError(
                    f"VOCSegmentation label_space=voc needs a 20-class VOC head; the model has {num_classes} "
                    f"classes (use label_space=foreground with target=pred for ImageNet models)"
                )
            self.num_classes = len(VOC_CLASSES)
            self.class_names = list(class_names) if class_names is not None else list(VOC_CLASSES)
        else:
            self.num_classes = num_classes
            self.class_names = list(class_names) if class_names is not None else None

    def describe(self, index: int) -> str:
        return str(self.root / "JPEGImages" / f"{self.items[index]}.jpg")

    def read(self, index: int) -> tuple[Image.Image, Tensor, Tensor]:
        name = self.items[index]
        with Image.open(self.root / "SegmentationClass" / f"{name}.png") as png:
            if png.mode != "P" and png.mode != "L":
                raise ValueError(f"VOC mask {name}.png has mode {png.mode}; expected a palette (P) PNG")
            raw = np.asarray(png).astype(np.int64)
        seg = np.full(raw.shape, IGNORE, dtype=np.int64)
        seg[raw == 0] = BACKGROUND
        objects = (raw >= 1) & (raw <= len(VOC_CLASSES))
        seg[objects] = raw[objects] - 1 if self.label_space == "voc" else FOREGROUND
        with Image.open(self.root / "JPEGImages" / f"{name}.jpg") as img:
            image = img.convert("RGB")
        target = torch.zeros(self.num_classes or 0)
        if self.label_space == "voc":
            present = np.unique(raw[objects]) - 1
            target[torch.from_numpy(present)] = 1.0
        return image, torch.from_numpy(seg), target
