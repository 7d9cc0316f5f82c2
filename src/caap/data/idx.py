"""Reader for the IDX files of MNIST-style datasets (Fashion-MNIST as Debian's `dataset-fashion-mnist` ships it).

Written by hand: torchvision's `FashionMNIST` insists on its own folder layout and download logic; the IDX
format is a 4-byte magic, big-endian dimensions and raw uint8 data, which numpy reads directly.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped, by its `.gz` suffix) into a uint8 array of the shape its header gives."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file '{stem}[.gz]' not found under {root}. Install Debian's package "
        f"'dataset-fashion-mnist' (`apt-get install dataset-fashion-mnist`, done by `make setup`) or point "
        f"data.root at a folder holding the four IDX files."
    )


def load_fashion_mnist(split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images `[N, 28, 28]` uint8 and labels `[N]` int64 for split 'train' (60k) or 'test' (10k)."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split '{split}' is unknown; allowed: {sorted(_FILES)}")
    base = Path(root) if root is not None else DEBIAN_FASHION_MNIST
    images_stem, labels_stem = _FILES[split]
    images = read_idx(_find(base, images_stem))
    labels = read_idx(_find(base, labels_stem)).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"Fashion-MNIST {split} under {base}: images {images.shape} and labels {labels.shape} disagree"
        )
    return images, labels


SPLITS = ("train", "val", "test")


def fashion_mnist_split(
    split: str, root: str | Path | None = None, val_items: int = 5_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The item pool of a benchmark split: images `[N, 28, 28]` uint8, labels `[N]` and source ids `[N]`.

    `train` and `val` are disjoint parts of Fashion-MNIST train (the last `val_items` items form the val pool),
    `test` is Fashion-MNIST test; a source id is the item's row in its Fashion-MNIST file, so train and val ids
    never meet and test ids index another file.
    """
    if split not in SPLITS:
        raise ValueError(f"split '{split}' is unknown; allowed: {sorted(SPLITS)}")
    images, labels = load_fashion_mnist("test" if split == "test" else "train", root)
    ids = np.arange(len(images))
    if split != "test":
        if not 0 < val_items < len(images):
            raise ValueError(f"val_items must lie in (0, {len(images)}); got {val_items}")
        keep = (
            slice(None, len(images) - val_items) if split == "train" else slice(len(images) - val_items, None)
        )
        images, labels, ids = images[keep], labels[keep], ids[keep]
    return images, labels, ids
