"""Data: IDX reader, FashionGrid, SyntheticGrid, ImageFolderDataset, collate, sampler and datamodule."""

from __future__ import annotations

import functools
import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caap.data import (
    FASHION_MNIST_CLASSES,
    AttributionDataModule,
    ContiguousDistributedSampler,
    FashionGrid,
    ImageFolderDataset,
    SyntheticGrid,
    collate_skip_none,
    contiguous_split,
    load_fashion_mnist,
    read_idx,
    select_indices,
)
from caap.data.idx import DEBIAN_FASHION_MNIST

# helpers ------------------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def check_grid_contract(sample: dict, num_classes: int, image_size: int, cell: int, grid: int) -> None:
    """The FashionGrid sample contract, checked against the image itself."""
    image, target, masks = sample["image"], sample["target"], sample["masks"]
    assert image.shape == (3, image_size, image_size) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert target.shape == (num_classes,) and target.dtype == torch.float32
    assert set(target.unique().tolist()) <= {0.0, 1.0} and target.sum() >= 1
    assert isinstance(sample["index"], int)
    cells, items = masks["cell"], masks["item"]
    assert cells.shape == items.shape == (num_classes, image_size, image_size)
    assert cells.dtype == items.dtype == torch.bool
    # target equals which classes have a (non-empty) cell and item
    assert torch.equal(cells.flatten(1).any(1), target.bool())
    assert torch.equal(items.flatten(1).any(1), target.bool())
    # item pixels lie inside their class's cell; cells of distinct classes are disjoint
    assert not (items & ~cells).any()
    assert cells.sum(0).max() <= 1
    # each present class's cell mask is exactly one grid cell
    for c in target.nonzero().flatten().tolist():
        ys, xs = cells[c].nonzero(as_tuple=True)
        assert cells[c].sum() == cell * cell
        assert ys.min() % cell == 0 and xs.min() % cell == 0 and ys.max() - ys.min() == cell - 1
    assert int(target.sum()) <= grid * grid
    # the image is zero outside all cells and non-zero on every item pixel
    union = cells.any(0)
    assert (image[:, ~union] == 0).all()
    assert (image.amax(0)[items.any(0)] > 0).all()


# IDX ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path: Path, name: str) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / name, array))
    assert out.dtype == np.uint8 and out.shape == (5, 4, 3)
    assert np.array_equal(out, array)
    labels = np.arange(7, dtype=np.uint8)
    assert np.array_equal(read_idx(str(write_idx(tmp_path / f"l-{name}", labels))), labels)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")


# FashionGrid --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Fashion-MNIST copy (first 1200 train / 300 test items) in IDX files, gz and plain mixed."""
    if not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    root = tmp_path_factory.mktemp("fmnist")
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    assert train_x.shape == (60_000, 28, 28) and test_x.shape == (10_000, 28, 28)
    assert set(np.unique(test_y)) == set(range(10))
    write_idx(root / "train-images-idx3-ubyte.gz", train_x[:1200])
    write_idx(root / "train-labels-idx1-ubyte", train_y[:1200].astype(np.uint8))
    write_idx(root / "t10k-images-idx3-ubyte", test_x[:300])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", test_y[:300].astype(np.uint8))
    return root


def test_fashiongrid_contract(mini_root: Path) -> None:
    ds = FashionGrid("test", size=12, seed=3, root=mini_root)
    assert len(ds) == 12 and ds.num_classes == 10 and ds.classes == FASHION_MNIST_CLASSES
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["index"] == i
        check_grid_contract(sample, 10, 56, 28, 2)
        # grey replicated to RGB; the item mask is exactly the item's bright pixels inside its cell
        image = sample["image"]
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        items = sample["masks"]["item"].any(0)
        assert torch.equal(items, image[0] > ds.item_threshold / 255.0)
        # one layout entry per present class, classes distinct
        layout = ds.layout(i)
        classes = [c for c, _, _ in layout]
        assert len(set(classes)) == len(classes)
        assert sorted(classes) == sample["target"].nonzero().flatten().tolist()
    with pytest.raises(IndexError):
        ds[12]


def test_fashiongrid_deterministic_by_seed_and_index(mini_root: Path) -> None:
    a = FashionGrid("test", size=8, seed=0, root=mini_root)
    b = FashionGrid("test", size=8, seed=0, root=mini_root)
    c = FashionGrid("test", size=8, seed=1, root=mini_root)
    for i in (5, 0, 7):  # order of access does not matter
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"]) and torch.equal(sa["target"], sb["target"])
        assert torch.equal(sa["masks"]["item"], sb["masks"]["item"])
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(8))
    assert [a.layout(i) for i in range(8)] != [c.layout(i) for i in range(8)]
    assert a.layout(0) != a.layout(1) or a.layout(1) != a.layout(2)


def test_fashiongrid_train_val_pools_disjoint(mini_root: Path) -> None:
    raw, _ = load_fashion_mnist("train", mini_root)
    train = FashionGrid("train", size=16, root=mini_root, val_items=200)
    val = FashionGrid("val", size=16, root=mini_root, val_items=200)
    assert np.array_equal(val.items, raw[-200:]) and np.array_equal(train.items, raw[:-200])
    assert len(train.items) + len(val.items) == len(raw)
    # every item a val grid uses comes from the last val_items of Fashion-MNIST train
    for i in range(16):
        for _, _, item in val.layout(i):
            assert 0 <= item < 200
        for _, _, item in train.layout(i):
            assert 0 <= item < 1000
    # the same index gives different grids in different splits
    assert [train.layout(i) for i in range(4)] != [val.layout(i) for i in range(4)]


def test_fashiongrid_errors(tmp_path: Path, mini_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionGrid("test", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        FashionGrid("dev", root=mini_root)
    with pytest.raises(ValueError, match="val_items"):
        FashionGrid("val", root=mini_root, val_items=0)
    with pytest.raises(ValueError, match="max_items"):
        FashionGrid("test", root=mini_root, max_items=5)


# SyntheticGrid ------------------------------------------------------------------------------------------------


def test_synthetic_grid_contract() -> None:
    ds = SyntheticGrid(size=10, image_size=48, grid=3, num_classes=7, seed=2)
    assert len(ds) == 10 and ds.num_classes == 7 and len(ds.classes) == 7
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["index"] == i
        check_grid_contract(sample, 7, 48, 16, 3)
        assert sorted(c for c, _ in ds.layout(i)) == sample["target"].nonzero().flatten().tolist()
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(ValueError, match="multiple of grid"):
        SyntheticGrid(image_size=50, grid=3)


def test_synthetic_grid_deterministic_and_distinct() -> None:
    a, b, c = SyntheticGrid(size=8, seed=0), SyntheticGrid(size=8, seed=0), SyntheticGrid(size=8, seed=1)
    for i in (3, 0):
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert torch.equal(a[i]["masks"]["item"], b[i]["masks"]["item"])
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(8))
    # every class has its own texture: same jitter, different classes -> different pixels
    patterns = [a.pattern(k, np.random.default_rng(0))[0] for k in range(a.num_classes)]
    for i in range(len(patterns)):
        for j in range(i + 1, len(patterns)):
            assert np.abs(patterns[i] - patterns[j]).mean() > 0.02
    batch = collate_skip_none([a[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 56, 56) and batch["masks"]["item"].shape == (4, 10, 56, 56)


# ImageFolderDataset -------------------------------------------------------------------------------------------


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """a/1.png (RGB 20x40), a/sub/2.JPG (RGB 50x30), b/3.bmp (grey 16x16), b/x.png (corrupt), notes.txt."""
    root = tmp_path / "images"
    stripes = np.zeros((20, 40, 3), dtype=np.uint8)
    stripes[:, :10, 1] = 255  # green | red | blue columns: the centre crop keeps only the red band
    stripes[:, 10:30, 0] = 255
    stripes[:, 30:, 2] = 255
    _save(root / "a" / "1.png", stripes)
    _save(root / "a" / "sub" / "2.JPG", np.full((50, 30, 3), 128, dtype=np.uint8))
    _save(root / "b" / "3.bmp", np.full((16, 16), 200, dtype=np.uint8))
    (root / "b" / "x.png").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not an image either")
    (root / ".hidden").mkdir()
    _save(root / ".hidden" / "h.png", np.zeros((4, 4, 3), dtype=np.uint8))
    return root


def test_image_folder_unlabelled(image_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = ImageFolderDataset(image_root, image_size=10, interpolation="bilinear")
    assert ds.paths == ["a/1.png", "a/sub/2.JPG", "b/3.bmp", "b/x.png"]
    assert len(ds) == 4 and ds.num_classes is None and ds.classes is None
    sample = ds[0]
    assert set(sample) == {"image", "target", "index", "path"}
    assert sample["image"].shape == (3, 10, 10) and sample["image"].dtype == torch.float32
    assert sample["target"].shape == (0,) and sample["index"] == 0
    assert sample["path"] == str(image_root / "a" / "1.png")
    # shorter side (20) -> 10, so 10x20, then the centre 10 columns = the red band of the original
    inner = sample["image"][:, :, 1:-1]
    assert inner[0].min() > 0.9 and inner[1:].max() < 0.1
    tall = ds[1]["image"]  # 50x30 -> 17x10 -> centre crop 10x10
    assert tall.shape == (3, 10, 10) and torch.allclose(tall, torch.full_like(tall, 128 / 255), atol=0.03)
    grey = ds[2]["image"]  # greyscale -> RGB
    assert grey.shape == (3, 10, 10) and torch.allclose(grey, torch.full_like(grey, 200 / 255), atol=0.01)
    with caplog.at_level(logging.WARNING):
        assert ds[3] is None
    assert any("x.png" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    zeros = ImageFolderDataset(image_root, image_size=8, num_classes=5)
    assert torch.equal(zeros[0]["target"], torch.zeros(5)) and zeros.num_classes == 5


def test_image_folder_labels_file_ids(image_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    (image_root / "labels.csv").write_text("path,label\na/1.png,2\n\n# comment\nb/3.bmp,0\nb/3,3\n")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(image_root, image_size=8, labels_file="labels.csv")
    assert ds.paths == ["a/1.png", "b/3.bmp"]  # only listed images; "b/3" names b/3.bmp without extension
    assert any("not in" in r.getMessage() for r in caplog.records)
    assert ds.num_classes == 4
    assert torch.equal(ds.targets, torch.tensor([[0.0, 0, 1, 0], [1, 0, 0, 1]]))
    assert torch.equal(ds[1]["target"], torch.tensor([1.0, 0, 0, 1]))
    tsv = image_root.parent / "labels.tsv"
    tsv.write_text("a/sub/2.JPG\t1\n./a/1.png\t0\n")
    ds = ImageFolderDataset(image_root, image_size=8, labels_file=tsv, num_classes=3)
    assert ds.paths == ["a/1.png", "a/sub/2.JPG"]
    assert torch.equal(ds.targets, torch.tensor([[1.0, 0, 0], [0, 1, 0]]))
    (image_root / "multi.txt").write_text("a/1.png 0 2\n")
    ds = ImageFolderDataset(image_root, image_size=8, labels_file=image_root / "multi.txt")
    assert torch.equal(ds[0]["target"], torch.tensor([1.0, 0, 1]))


def test_image_folder_labels_file_names_and_errors(image_root: Path) -> None:
    names = ["cat", "dog", "bird"]
    (image_root / "names.txt").write_text("a/1.png dog\nb/3.bmp bird\nb/x.png 0\n")
    ds = ImageFolderDataset(image_root, image_size=8, labels_file="names.txt", class_names=names)
    assert ds.classes == tuple(names) and ds.num_classes == 3
    assert torch.equal(ds.targets, torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]))
    assert ds[2] is None  # the corrupt file keeps its label but yields no sample
    (image_root / "missing.txt").write_text("a/1.png dog\nc/9.png cat\n")
    with pytest.raises(ValueError, match=r"missing.txt:2: 'c/9.png cat'.*not found"):
        ImageFolderDataset(image_root, image_size=8, labels_file="missing.txt", class_names=names)
    (image_root / "unknown.txt").write_text("a/1.png dog\nb/3.bmp horse\n")
    with pytest.raises(ValueError, match=r"unknown.txt:2: 'b/3.bmp horse'.*unknown class 'horse'"):
        ImageFolderDataset(image_root, image_size=8, labels_file="unknown.txt", class_names=names)
    with pytest.raises(ValueError, match="class_names"):
        ImageFolderDataset(image_root, image_size=8, labels_file="unknown.txt")
    (image_root / "range.txt").write_text("a/1.png 7\n")
    with pytest.raises(ValueError, match="out of range"):
        ImageFolderDataset(image_root, image_size=8, labels_file="range.txt", class_names=names)
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        ImageFolderDataset(image_root, image_size=8, labels_file="nope.txt")


def test_image_folder_folders_layout(tmp_path: Path) -> None:
    for rel in ("cat/1.png", "dog/2.png", "dog/deep/3.jpeg"):
        _save(tmp_path / rel, np.full((12, 12, 3), 60, dtype=np.uint8))
    ds = ImageFolderDataset(tmp_path, image_size=6, labels_file="folders")
    assert ds.classes == ("cat", "dog") and ds.num_classes == 2
    assert ds.paths == ["cat/1.png", "dog/2.png", "dog/deep/3.jpeg"]
    assert torch.equal(ds.targets, torch.tensor([[1.0, 0], [0, 1], [0, 1]]))
    ds = ImageFolderDataset(tmp_path, image_size=6, labels_file="folders", class_names=["ant", "cat", "dog"])
    assert torch.equal(ds[0]["target"], torch.tensor([0.0, 1, 0]))
    with pytest.raises(ValueError, match="not in class_names"):
        ImageFolderDataset(tmp_path, image_size=6, labels_file="folders", class_names=["cat"])


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ImageFolderDataset(tmp_path / "does-not-exist", image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"no images under .*empty.*\.png"):
        ImageFolderDataset(empty, image_size=8)


# collate ------------------------------------------------------------------------------------------------------


def test_collate_skip_none(image_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    grid = SyntheticGrid(size=3, image_size=28)
    with caplog.at_level(logging.WARNING):
        batch = collate_skip_none([grid[0], None, grid[2]])
    assert "skipped 1 of 3" in caplog.text
    assert batch["image"].shape == (2, 3, 28, 28) and batch["target"].shape == (2, 10)
    assert batch["index"].tolist() == [0, 2]
    assert batch["masks"]["cell"].shape == (2, 10, 28, 28) and batch["masks"]["item"].dtype == torch.bool
    assert collate_skip_none([None, None]) is None
    folder = ImageFolderDataset(image_root, image_size=8)
    batch = collate_skip_none([folder[i] for i in range(len(folder))])
    assert batch["image"].shape == (3, 3, 8, 8) and batch["target"].shape == (3, 0)
    assert batch["path"] == [str(image_root / p) for p in ("a/1.png", "a/sub/2.JPG", "b/3.bmp")]


# sampler and datamodule ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_contiguous_sampler_covers_each_index_once(n: int, world: int) -> None:
    indices = [3 * i + 1 for i in range(n)]  # arbitrary dataset indices, in order
    shares = [list(ContiguousDistributedSampler(indices, num_replicas=world, rank=r)) for r in range(world)]
    assert [i for share in shares for i in share] == indices  # in order, no padding, no repetition
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    assert [len(ContiguousDistributedSampler(indices, world, r)) for r in range(world)] == sizes
    assert [len(contiguous_split(n, r, world)) for r in range(world)] == sizes


def test_contiguous_sampler_defaults_and_errors() -> None:
    assert list(ContiguousDistributedSampler(4)) == [0, 1, 2, 3]  # no process group: everything
    with pytest.raises(ValueError, match="rank"):
        ContiguousDistributedSampler(4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas"):
        ContiguousDistributedSampler(4, num_replicas=0, rank=0)


def test_select_indices() -> None:
    assert select_indices(10) == list(range(10))
    assert select_indices(10, limit=7) == list(range(7))
    assert select_indices(5, limit=50) == list(range(5))
    shards = [select_indices(10, limit=7, shard=k, num_shards=3) for k in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(i for s in shards for i in s) == list(range(7))
    with pytest.raises(ValueError, match=r"data\.shard.*data\.num_shards"):
        select_indices(10, shard=3, num_shards=3)
    with pytest.raises(ValueError, match=r"data\.shard"):
        select_indices(10, shard=-1, num_shards=2)
    with pytest.raises(ValueError, match=r"data\.num_shards"):
        select_indices(10, num_shards=0)
    with pytest.raises(ValueError, match=r"data\.limit"):
        select_indices(10, limit=0)


def test_datamodule_limit_shard_and_loaders() -> None:
    factory = functools.partial(SyntheticGrid, size=20, image_size=28, num_classes=6)
    dm = AttributionDataModule(factory, batch_size=4, limit=11, shard=1, num_shards=2)
    assert dm.indices == [1, 3, 5, 7, 9]
    assert isinstance(dm.dataset, SyntheticGrid) and len(dm.dataset) == 20
    assert dm.num_classes == 6 and dm.class_names == dm.dataset.classes
    dm.setup("test")
    for loader in (dm.test_dataloader(), dm.predict_dataloader()):
        batches = list(loader)
        assert [b["index"].tolist() for b in batches] == [[1, 3, 5, 7], [9]]
        assert batches[0]["masks"]["cell"].shape == (4, 6, 28, 28)
    # simulated ranks: each gets a contiguous block of the selected indices; together exactly once
    shares = [list(dm.sampler(num_replicas=2, rank=r)) for r in range(2)]
    assert shares == [[1, 3, 5], [7, 9]]
    with pytest.raises(ValueError, match=r"data\.shard"):
        AttributionDataModule(factory, shard=2, num_shards=2)
    with pytest.raises(TypeError, match="map-style"):
        _ = AttributionDataModule(42).dataset  # type: ignore[arg-type]


def test_datamodule_pins_memory_when_its_trainer_runs_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinned host batches let Lightning's non_blocking copies overlap the step: pinned when the attached
    Trainer's device is CUDA (even on a machine whose CUDA the run does not use), not on its CPU runs."""
    from types import SimpleNamespace

    dm = AttributionDataModule(SyntheticGrid(size=4, image_size=28), batch_size=2)
    on = lambda device: SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dm.trainer = on("cpu")
    assert dm.pins_memory() is False and dm.test_dataloader().pin_memory is False
    dm.trainer = on("cuda:0")
    assert dm.pins_memory() is True and dm.test_dataloader().pin_memory is True
    dm.trainer = None  # no Trainer (e.g. a notebook): whether CUDA is there
    assert dm.pins_memory() is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dm.pins_memory() is False
    forced = AttributionDataModule(SyntheticGrid(size=4, image_size=28), pin_memory=False)
    forced.trainer = on("cuda:0")
    assert forced.pins_memory() is False


def test_datamodule_skips_unreadable_images(image_root: Path) -> None:
    dm = AttributionDataModule(ImageFolderDataset(image_root, image_size=8), batch_size=2)
    assert dm.num_classes is None and dm.class_names is None
    batches = list(dm.test_dataloader())
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2]]  # index 3 (x.png) dropped
    assert dm.indices == [0, 1, 2]  # x.png is not selected: every stage sees readable images only


def unreadable_folder(root: Path) -> Path:
    """0 text named .png, 1 ok, 2 truncated JPEG (PIL opens its header; decoding fails), 3 ok, 4 ok."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "0_text.png").write_text("not an image")
    for name in ("1_ok.png", "3_ok.png", "4_ok.png"):
        _save(root / name, rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    _save(root / "2_truncated.jpg", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    whole = (root / "2_truncated.jpg").read_bytes()
    (root / "2_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return root


def test_datamodule_selects_readable_images_once_and_names_the_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unreadable files (a text file named .png, a truncated JPEG, first or in the middle) are found when the
    images are selected: each is named once in a warning with the count, `limit` counts readable images, and
    no later stage (setup checks, loading) meets them."""
    dataset = ImageFolderDataset(unreadable_folder(tmp_path / "images"), image_size=8)
    with caplog.at_level(logging.WARNING):
        dm = AttributionDataModule(dataset, batch_size=2, limit=2)
        assert dm.indices == [1, 3]  # the first two readable images
        assert dm.dataset[0] is None and dm.dataset[2] is None  # read again: no second warning
        assert [b["index"].tolist() for b in dm.test_dataloader()] == [[1, 3]]
    for name in ("0_text.png", "2_truncated.jpg"):
        assert sum(name in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 2, name
    summary = [r.getMessage() for r in caplog.records if "unreadable image(s)" in r.getMessage()]
    assert len(summary) == 1 and "2 unreadable image(s)" in summary[0]
    assert "collate_skip_none" not in caplog.text  # nothing left for the loader to drop
    everything = AttributionDataModule(dataset, batch_size=8)
    assert everything.indices == [1, 3, 4]
    assert [AttributionDataModule(dataset, shard=k, num_shards=2).indices for k in range(2)] == [[1, 4], [3]]


def test_datamodule_fashiongrid_metadata(mini_root: Path) -> None:
    dm = AttributionDataModule(FashionGrid("test", size=6, root=mini_root), batch_size=6, limit=3)
    assert dm.num_classes == 10 and tuple(dm.class_names) == FASHION_MNIST_CLASSES
    (batch,) = list(dm.test_dataloader())
    assert batch["image"].shape == (3, 3, 56, 56) and batch["index"].tolist() == [0, 1, 2]
