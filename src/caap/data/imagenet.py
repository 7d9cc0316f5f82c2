"""`ImageNetVal`: the ImageNet-1k validation set in its official layouts, labelled in timm's class order.

Class index c is the c-th synset in sorted WordNet-id order (n01440764 = 0, "tench"), the order every timm
ImageNet-1k head uses (`timm.data.ImageNetInfo`). Layouts (`labels_file`):

- `folders`: synset folders, `root/n01440764/ILSVRC2012_val_00000293.JPEG` (torchvision's `ImageNet` layout);
- `LOC_val_solution.csv` (Kaggle ILSVRC challenge): `ImageId,PredictionString` with
  `ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295`; every listed synset counts;
- `ILSVRC2012_validation_ground_truth.txt` (the ILSVRC2012 devkit): one ILSVRC2012_ID (1..1000) per line for
  `ILSVRC2012_val_00000001.JPEG`, `..._00000002.JPEG`, ...; these ids are the devkit's own order, mapped to
  synsets by the devkit's `data/meta.mat` (`devkit=` the devkit folder or the .mat file; found next to the
  labels file when it sits in the devkit's `data/` folder);
- any other labels file of `relative/path label` lines (e.g. the Caffe `val.txt`, `ILSVRC2012_val_00000001.JPEG 65`
  with timm-order indices, or synset ids as labels), read by `ImageFolderDataset`.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

from caap.data.image_folder import FOLDERS, IMAGE_EXTENSIONS, ImageFolderDataset
from caap.models.imagenet_classes import imagenet_class_names, imagenet_wnids

log = logging.getLogger(__name__)


def read_devkit_meta(path: str | Path) -> dict[int, str]:
    """`{ILSVRC2012_ID: WNID}` of the 1000 leaf synsets from the ILSVRC2012 devkit's `meta.mat`."""
    from scipy.io import loadmat

    path = Path(path).expanduser()
    if path.is_dir():
        path = next((p for p in (path / "data" / "meta.mat", path / "meta.mat") if p.is_file()), path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageNet devkit meta.mat not found at {path} (expected <devkit>/data/meta.mat)"
        )
    synsets = loadmat(str(path), squeeze_me=True)["synsets"]
    out = {}
    for s in synsets:
        if int(s["num_children"]) == 0:
            out[int(s["ILSVRC2012_ID"])] = str(s["WNID"])
    return out


class ImageNetVal(ImageFolderDataset):
    """ImageNet-1k validation images with labels from an official format (see the module docstring).

    Args:
        root: the image folder (synset folders, or the 50,000 flat `ILSVRC2012_val_*.JPEG`).
        image_size, crop_pct, interpolation, resize_size, extensions: as `ImageFolderDataset` (the model's
            timm data config fills them in a run).
        labels_file: `folders`, a `LOC_val_solution.csv`, an `ILSVRC2012_validation_ground_truth.txt`, or any
            `path label` file.
        devkit: the ILSVRC2012 devkit folder (or its `meta.mat`), for the devkit ground truth.
        class_names: readable names for tables (default: timm's ImageNet names); `num_classes` is always 1000.

    Samples as `ImageFolderDataset`: `{image [3, S, S], target [1000] multi-hot, index, path}`.
    """

    option = "imagenet_val"

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        labels_file: str | Path = FOLDERS,
        devkit: str | Path | None = None,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = "bicubic",
        resize_size: int | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        if num_classes not in (None, 1000):
            raise ValueError(
                f"ImageNetVal has 1000 classes, but the model has num_classes={num_classes}; use an ImageNet-1k "
                f"model or data=image_folder"
            )
        self.devkit = devkit
        super().__init__(
            root,
            image_size,
            labels_file=labels_file,
            class_names=imagenet_wnids(),
            num_classes=1000,
            extensions=extensions,
            resize_size=resize_size,
            interpolation=interpolation,
            crop_pct=crop_pct,
        )
        names = list(class_names) if class_names is not None else list(imagenet_class_names())
        if len(names) != 1000:
            raise ValueError(f"ImageNetVal class_names has {len(names)} names, expected 1000")
        self.class_names = names

    @property
    def wnids(self) -> tuple[str, ...]:
        return imagenet_wnids()

    def _labels_from_file(self, paths: list[str], labels_file: Path) -> tuple[list[str], list[list[int]]]:
        lines = [ln.strip() for ln in labels_file.read_text().splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"ImageNetVal labels_file {labels_file} is empty")
        if lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
            return self._from_loc_solution(paths, labels_file)
        if all(ln.isdigit() for ln in lines[:10]):
            return self._from_devkit_ground_truth(paths, labels_file, lines)
        return super()._labels_from_file(paths, labels_file)

    def _match(
        self, paths: list[str], found: dict[str, list[int]], source: Path
    ) -> tuple[list[str], list[list[int]]]:
        lookup = {Path(p).stem: p for p in paths}
        missing = [k for k in found if k not in lookup]
        if len(missing) == len(found):
            raise ValueError(
                f"ImageNetVal: none of the {len(found)} images of {source} (e.g. {missing[0]}) is under {self.root}"
            )
        if missing:
            log.warning("ImageNetVal: %d images of %s are not under %s", len(missing), source, self.root)
        kept = sorted(lookup[k] for k in found if k in lookup)
        by_path = {lookup[k]: v for k, v in found.items() if k in lookup}
        return kept, [sorted(set(by_path[p])) for p in kept]

    def _from_loc_solution(self, paths: list[str], labels_file: Path) -> tuple[list[str], list[list[int]]]:
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        found: dict[str, list[int]] = {}
        with labels_file.open(newline="") as f:
            for lineno, row in enumerate(csv.reader(f), start=1):
                if lineno == 1 or not row:
                    continue
                if len(row) < 2:
                    raise ValueError(
                        f"ImageNetVal {labels_file}:{lineno}: expected 'ImageId,PredictionString'"
                    )
                wnids = [t for t in row[1].split() if t.startswith("n")]
                bad = [w for w in wnids if w not in index]
                if bad or not wnids:
                    raise ValueError(
                        f"ImageNetVal {labels_file}:{lineno}: unknown synset(s) {bad or row[1]!r}"
                    )
                found[Path(row[0]).stem] = [index[w] for w in wnids]
        return self._match(paths, found, labels_file)

    def _from_devkit_ground_truth(
        self, paths: list[str], labels_file: Path, lines: list[str]
    ) -> tuple[list[str], list[list[int]]]:
        devkit = self.devkit if self.devkit is not None else labels_file.parent / "meta.mat"
        meta = read_devkit_meta(devkit)
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        found: dict[str, list[int]] = {}
        for n, line in enumerate(lines, start=1):
            ilsvrc_id = int(line)
            if ilsvrc_id not in meta or meta[ilsvrc_id] not in index:
                raise ValueError(
                    f"ImageNetVal {labels_file}:{n}: ILSVRC2012_ID {ilsvrc_id} is not a leaf synset of {devkit}"
                )
            found[f"ILSVRC2012_val_{n:08d}"] = [index[meta[ilsvrc_id]]]
        return self._match(paths, found, labels_file)
