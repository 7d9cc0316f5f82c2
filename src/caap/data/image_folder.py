"""`ImageFolderDataset`: any folder of images, optionally labelled, as `{image, target, index, path}` samples.

Covers ImageNet val laid out flat with a labels file (`ILSVRC2012_val_00000001.JPEG 65`), class-per-folder
layouts (`root/<class_name>/*.jpg`, `labels_file="folders"`) and unlabelled folders. Images are read with PIL,
converted to RGB, resized (shorter side) and center-cropped to a square, and returned in pixel space [0, 1];
models normalise inside. An unreadable file (not an image, truncated, ...) does not stop a run: `readable`
decodes an image once and remembers the answer, logging a warning that names each file that fails, so that
`AttributionDataModule` selects readable images only; its sample is None (no second warning), and
`collate_skip_none` would drop it from a batch.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from caap.data.readable import RememberedReads
from caap.data.transforms import INTERPOLATIONS, EvalTransform

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".webp",
    ".tif",
    ".tiff",
    ".gif",
    ".ppm",
    ".pgm",
)
FOLDERS = "folders"


def data_path(value: str | Path | None, option: str) -> Path:
    """`value` as a path (`~` expanded); a ValueError naming `data.root` when it is not set. Data options that
    need files say `root: ???`, but the schema's `root: null` wins the merge, so the datasets get None."""
    if value is None or str(value) in ("", "???"):
        raise ValueError(f"data.root is not set: data={option} needs the path of its files (data.root=/path)")
    return Path(value).expanduser()


def _norm_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not exts:
        raise ValueError("ImageFolderDataset needs at least one image extension")
    return exts


def list_images(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Relative POSIX paths of the image files under `root`, sorted.

    Recursive; extensions match case-insensitively; hidden files and folders (".name") are left out.
    """
    exts = _norm_extensions(extensions)
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in exts
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _split_fields(line: str) -> list[str]:
    if "\t" in line:
        return [f.strip() for f in line.split("\t") if f.strip()]
    if "," in line:
        return [f.strip() for f in next(csv.reader([line])) if f.strip()]
    return line.split()


def _read_class_names(class_names: Sequence[str] | str | Path) -> tuple[str, ...]:
    if isinstance(class_names, str | Path):
        path = Path(class_names)
        if not path.is_file():
            raise FileNotFoundError(f"class_names file {path} not found (expected one class name per line)")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [str(n) for n in class_names]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class_names holds duplicates: {dup[:10]}")
    return tuple(names)


class ImageFolderDataset(Dataset):
    """Images under `root` (recursive, sorted by relative path), optionally with class labels.

    `option`: the data config option that builds this class (named in messages).

    Args:
      root: the folder of images.
      image_size: S; each image is converted to RGB, its shorter side resized to `resize_size` (default S), then
        center-cropped to S x S.
      labels_file: None (unlabelled), "folders" (class = first folder below root, `root/<class>/.../*.jpg`), or
        a CSV / TSV / whitespace file of `relative_path label [label ...]` lines (a path relative to root is
        also looked up under root). A label is an int class id, or a class name when `class_names` is given.
        A path may omit its extension; a path listed on several lines collects all its labels (multi-label);
        blank lines, `#` comments and a header line are skipped. With a labels file only the listed images
        form the dataset.
      class_names: class names (a list, or a text file with one name per line); index = class id.
      num_classes: C; defaults to len(class_names), else the largest label id + 1.
      extensions: file suffixes that count as images (case-insensitive).
      resize_size: the shorter side before the crop (e.g. 256 for the 224 / 0.875 ImageNet protocol).
      interpolation: "bicubic" (timm ViTs), "bilinear" or "nearest"; None: bicubic.
      crop_pct: the model's centre-crop fraction (timm data config): the shorter side is resized to
        `floor(S / crop_pct)` before the S x S crop, as timm evaluates; None: no margin (resize to S).
        `resize_size` wins when both are given.

    Each sample is a dict:
      image  `[3, S, S]` float in [0, 1],
      target `[C]` float multi-hot when labels are known, all zeros when only `num_classes` is, else `[0]`,
      index  int (dataset index),
      path   str (the image file).
    A file PIL cannot decode gives None instead of a dict, with a warning naming it (once per file); `readable`
    tells so without building the sample.

    Attributes: `paths` (relative paths, dataset order), `classes` (tuple of names or None), `num_classes`
    (int or None), `targets` (`[N, C]` float).
    """

    option = "image_folder"

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        labels_file: str | Path | None = None,
        class_names: Sequence[str] | str | Path | None = None,
        num_classes: int | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        resize_size: int | None = None,
        interpolation: str | None = "bicubic",
        crop_pct: float | None = None,
    ) -> None:
        self.root = data_path(root, self.option)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolderDataset root {self.root} does not exist or is not a folder")
        if image_size < 1:
            raise ValueError(f"ImageFolderDataset image_size must be positive; got {image_size}")
        self.extensions = _norm_extensions(extensions)
        paths = list_images(self.root, self.extensions)
        if not paths:
            raise ValueError(
                f"ImageFolderDataset found no images under {self.root} (searched recursively for extensions "
                f"{', '.join(self.extensions)})"
            )
        self.classes: tuple[str, ...] | None = (
            _read_class_names(class_names) if class_names is not None else None
        )
        labels: list[list[int]] | None = None
        if labels_file is None:
            self.paths = paths
        elif str(labels_file) == FOLDERS:
            self.paths, labels = self._labels_from_folders(paths)
        else:
            self.paths, labels = self._labels_from_file(paths, self._find_labels_file(labels_file))

        if num_classes is None:
            if self.classes is not None:
                num_classes = len(self.classes)
            elif labels is not None:
                num_classes = 1 + max((c for cs in labels for c in cs), default=-1)
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"ImageFolderDataset num_classes must be positive; got {num_classes}")
        if self.classes is not None and num_classes is not None and num_classes != len(self.classes):
            raise ValueError(
                f"ImageFolderDataset num_classes={num_classes} disagrees with {len(self.classes)} class_names"
            )
        self.num_classes = num_classes

        self.targets = torch.zeros(len(self.paths), num_classes or 0)
        if labels is not None:
            for i, cs in enumerate(labels):
                if cs and max(cs) >= self.targets.shape[1]:
                    raise ValueError(
                        f"ImageFolderDataset label {max(cs)} of {self.paths[i]} is out of range for "
                        f"num_classes={num_classes}"
                    )
                self.targets[i, cs] = 1.0
        self.has_labels = labels is not None

        if interpolation is not None and interpolation.lower() not in INTERPOLATIONS:
            raise ValueError(
                f"ImageFolderDataset interpolation '{interpolation}' is unknown; allowed: {list(INTERPOLATIONS)}"
            )
        self.image_size = image_size
        self.transform = EvalTransform(
            image_size, crop_pct, interpolation.lower() if interpolation else None, resize=resize_size
        )
        # PIL raises many kinds (UnidentifiedImageError, OSError, DecompressionBombError, ...): any is "unreadable"
        self._reads = RememberedReads(self.open_rgb, self.describe, (Exception,), "image")

    # labels -------------------------------------------------------------------------------------------------

    def _class_id(self, name: str) -> int | None:
        if self.classes is not None and name in self.classes:
            return self.classes.index(name)
        try:
            value = int(name)
        except ValueError:
            return None
        return value if value >= 0 else None

    def _labels_from_folders(self, paths: list[str]) -> tuple[list[str], list[list[int]]]:
        nested = [p for p in paths if "/" in p]
        if len(nested) < len(paths):
            log.warning(
                "ImageFolderDataset: ignoring %d image(s) directly under %s (labels_file='folders' takes the "
                "class from the first sub-folder)",
                len(paths) - len(nested),
                self.root,
            )
        if not nested:
            raise ValueError(
                f"ImageFolderDataset: labels_file='folders' but {self.root} has no class sub-folders"
            )
        folders = sorted({p.split("/", 1)[0] for p in nested})
        if self.classes is None:
            self.classes = tuple(folders)
        unknown = [f for f in folders if f not in self.classes]
        if unknown:
            raise ValueError(
                f"ImageFolderDataset: class folder(s) {unknown[:10]} under {self.root} are not in class_names"
            )
        return nested, [[self.classes.index(p.split("/", 1)[0])] for p in nested]

    def _find_labels_file(self, labels_file: str | Path) -> Path:
        path = Path(labels_file).expanduser()
        if not path.is_file() and not path.is_absolute() and (self.root / path).is_file():
            path = self.root / path
        if not path.is_file():
            raise FileNotFoundError(
                f"ImageFolderDataset labels_file {labels_file} not found (nor under {self.root})"
            )
        return path

    def _labels_from_file(self, paths: list[str], labels_file: Path) -> tuple[list[str], list[list[int]]]:
        lookup = {p: p for p in paths}
        for p in paths:  # a path may omit its extension (ImageNet's LOC_val_solution.csv does)
            lookup.setdefault(p.rsplit(".", 1)[0], p)
        found: dict[str, list[int]] = {}
        first = True
        for lineno, raw in enumerate(labels_file.read_text().splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = _split_fields(line)
            where = f"{labels_file}:{lineno}: '{line}'"
            rel = fields[0].removeprefix("./")
            ids = [self._class_id(f) for f in fields[1:]]
            if first and (rel not in lookup and all(i is None for i in ids)):
                first = False  # a header line such as "path,label"
                log.info("ImageFolderDataset: skipping header line %s", where)
                continue
            first = False
            if rel not in lookup:
                raise ValueError(
                    f"ImageFolderDataset labels line {where} names an image not found under {self.root}"
                )
            if len(fields) < 2:
                raise ValueError(f"ImageFolderDataset labels line {where} has no label")
            for field, i in zip(fields[1:], ids, strict=True):
                if i is None:
                    hint = "" if self.classes is not None else " (pass class_names to use class names)"
                    raise ValueError(f"ImageFolderDataset labels line {where}: unknown class '{field}'{hint}")
                if self.classes is not None and i >= len(self.classes):
                    raise ValueError(
                        f"ImageFolderDataset labels line {where}: class id {i} is out of range for "
                        f"{len(self.classes)} class_names"
                    )
            found.setdefault(lookup[rel], []).extend(i for i in ids if i is not None)
        if not found:
            raise ValueError(f"ImageFolderDataset labels_file {labels_file} lists no images")
        if len(found) < len(paths):
            log.warning(
                "ImageFolderDataset: %d of %d images under %s are not in %s and are left out",
                len(paths) - len(found),
                len(paths),
                self.root,
                labels_file,
            )
        kept = [p for p in paths if p in found]
        return kept, [sorted(set(found[p])) for p in kept]

    # samples ------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        """The image file of sample `index`."""
        return str(self.root / self.paths[index])

    def open_rgb(self, index: int) -> Image.Image:
        """The RGB image of sample `index` (PIL's errors propagate)."""
        with Image.open(self.root / self.paths[index]) as img:
            return img.convert("RGB")

    def decode(self, index: int) -> Image.Image | None:
        """The RGB image of sample `index`, or None when PIL cannot decode it (a warning names the file the first
        time; the answer is remembered)."""
        return self._reads(index)

    def readable(self, index: int) -> bool:
        """Whether sample `index` decodes (decoded at the first ask, then remembered)."""
        return self._reads.readable(index)

    def load(self, index: int) -> Tensor | None:
        """The transformed image `[3, S, S]` float in [0, 1], or None when it cannot be read (see `decode`)."""
        rgb = self.decode(index)
        return None if rgb is None else self.transform(rgb)[0]

    def __getitem__(self, index: int) -> dict | None:
        if not -len(self) <= index < len(self):
            raise IndexError(f"ImageFolderDataset index {index} out of range [0, {len(self)})")
        index = index % len(self)
        image = self.load(index)
        if image is None:
            return None
        return {
            "image": image,
            "target": self.targets[index].clone(),
            "index": index,
            "path": self.describe(index),
        }

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, n={len(self)}, image_size={self.image_size}, "
            f"num_classes={self.num_classes}, labelled={self.has_labels})"
        )
