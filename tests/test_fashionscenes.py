"""FashionScenes: sample contract, determinism, exact visible masks, occlusion labels, textures, placement, splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from caap.data import FashionScenes, collate_skip_none, load_fashion_mnist
from caap.data.fashionscenes import Scene, resolve_occlusion
from caap.data.idx import DEBIAN_FASHION_MNIST
from caap.data.textures import TEXTURES, procedural_texture, resize_matrix
from caap.run import evaluate

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(
        not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists(),
        reason="Debian's dataset-fashion-mnist is not installed",
    ),
]


@pytest.fixture(scope="module")
def test_scenes() -> FashionScenes:
    return FashionScenes("test", size=1000, seed=0)


@pytest.fixture(scope="module")
def scenes_with_a_drop(test_scenes: FashionScenes) -> list[tuple[int, Scene]]:
    """The first scenes (by index) in which at least one item was removed as too occluded."""
    found = []
    for index in range(200):
        scene = test_scenes.scene(index)
        if not scene.kept.all():
            found.append((index, scene))
        if len(found) == 3:
            return found
    pytest.fail("no scene among the first 200 removed an occluded item")


def present(sample: dict) -> list[int]:
    return sample["target"].nonzero().flatten().tolist()


# contract -----------------------------------------------------------------------------------------------------


def test_sample_contract_and_boxes(test_scenes: FashionScenes) -> None:
    assert len(test_scenes) == 1000 and test_scenes.num_classes == 10
    for index in range(12):
        sample = test_scenes[index]
        image, target, masks = sample["image"], sample["target"], sample["masks"]
        assert sample["index"] == index
        assert image.shape == (3, 112, 112) and image.dtype == torch.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert target.shape == (10,) and set(target.unique().tolist()) <= {0.0, 1.0}
        assert 1 <= target.sum() <= 4
        cells, items = masks["cell"], masks["item"]
        assert cells.shape == items.shape == (10, 112, 112) and cells.dtype == items.dtype == torch.bool
        assert torch.equal(items.flatten(1).any(1), target.bool())
        assert torch.equal(cells.flatten(1).any(1), target.bool())
        assert items.sum(0).max() <= 1  # a pixel shows one item at most
        for c in present(sample):
            ys, xs = items[c].nonzero(as_tuple=True)
            box = torch.zeros(112, 112, dtype=torch.bool)
            box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
            assert torch.equal(cells[c], box)  # "cell" is exactly the visible pixels' bounding box
        # the labelled classes are exactly the kept items' classes, all distinct
        scene = test_scenes.scene(index)
        classes = [p.cls for p in scene.placements]
        assert len(set(classes)) == len(classes)
        assert sorted(classes[k] for k in np.flatnonzero(scene.kept)) == present(sample)
    with pytest.raises(IndexError):
        test_scenes[1000]
    batch = collate_skip_none([test_scenes[0], test_scenes[1]])
    assert batch["image"].shape == (2, 3, 112, 112) and batch["masks"]["cell"].shape == (2, 10, 112, 112)
    training = FashionScenes("test", size=4, masks=False)
    assert "masks" not in training[0] and torch.equal(training[0]["image"], test_scenes[0]["image"])


def test_deterministic_by_seed_split_and_index(test_scenes: FashionScenes) -> None:
    again = FashionScenes("test", size=1000, seed=0)
    for index in (7, 0, 3):  # order of access does not matter
        a, b = test_scenes[index], again[index]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
        assert torch.equal(a["masks"]["item"], b["masks"]["item"])
        assert torch.equal(a["masks"]["cell"], b["masks"]["cell"])
    images = [test_scenes[i]["image"] for i in range(6)]
    assert all(not torch.equal(images[i], images[j]) for i in range(6) for j in range(i + 1, 6))
    other_seed = FashionScenes("test", size=8, seed=1)
    assert all(not torch.equal(test_scenes[i]["image"], other_seed[i]["image"]) for i in range(4))


# exact masks and occlusion ------------------------------------------------------------------------------------


def test_masks_are_exactly_the_visible_item_pixels(test_scenes: FashionScenes) -> None:
    for index in range(30):
        sample, scene = test_scenes[index], test_scenes.scene(index)
        image, items = sample["image"].numpy(), sample["masks"]["item"].numpy()
        kept = np.flatnonzero(scene.kept)
        # recompose: background, then each kept item's silhouette in drawing order
        recomposed = scene.background.copy()
        for k in kept:
            recomposed[:, scene.silhouettes[k]] = scene.paint(k)[:, scene.silhouettes[k]]
        assert np.array_equal(recomposed, image)
        # outside every mask the image is the background; inside class c's mask it is item c's paint
        anywhere = items.any(0)
        assert np.array_equal(image[:, ~anywhere], scene.background[:, ~anywhere])
        for k in kept:
            mask = items[scene.placements[k].cls]
            assert np.array_equal(image[:, mask], scene.paint(k)[:, mask])
            assert not (mask & ~scene.silhouettes[k]).any()
            # an item's mask leaves out every pixel a later (kept) item covers, and nothing else
            later = np.zeros_like(mask)
            for j in kept[kept > k]:
                later |= scene.silhouettes[j]
            assert np.array_equal(mask, scene.silhouettes[k] & ~later)
            assert mask.sum() >= test_scenes.min_visible * scene.silhouettes[k].sum()


def test_occluded_items_lose_their_label_and_masks(
    test_scenes: FashionScenes, scenes_with_a_drop: list[tuple[int, Scene]]
) -> None:
    for index, scene in scenes_with_a_drop:
        sample = test_scenes[index]
        for k in np.flatnonzero(~scene.kept):
            cls = scene.placements[k].cls
            assert sample["target"][cls] == 0
            assert not sample["masks"]["item"][cls].any() and not sample["masks"]["cell"][cls].any()
            assert scene.visible_fraction[k] < test_scenes.min_visible
            # a removed item is not drawn: its silhouette shows the background or a kept item on top
            shown = sample["masks"]["item"].numpy().any(0)
            hidden = scene.silhouettes[k] & ~shown
            assert np.array_equal(sample["image"].numpy()[:, hidden], scene.background[:, hidden])
    # the same layout with min_visible just above 0 keeps every item with at least one visible pixel
    index, scene = scenes_with_a_drop[0]
    lenient = FashionScenes("test", size=1000, seed=0, min_visible=1e-6)
    relaxed = lenient.scene(index)
    assert relaxed.placements == scene.placements
    assert relaxed.kept.sum() > scene.kept.sum()


def test_resolve_occlusion_drops_the_most_covered_layer_first() -> None:
    layers = np.zeros((3, 20, 20), dtype=bool)
    layers[0, 0:10, 0:10] = True  # A: 100 px
    layers[1, 0:10, 4:14] = True  # B covers 60 of A's pixels
    layers[2, 0:10, 7:20] = True  # C covers 70 of B's pixels
    visible, kept, fraction = resolve_occlusion(layers, min_visible=0.5)
    # B (30% visible) goes first; then A is fully visible again and stays
    assert kept.tolist() == [True, False, True]
    assert fraction[1] == pytest.approx(0.3) and fraction[0] == pytest.approx(0.7)
    assert np.array_equal(visible[0], layers[0] & ~layers[2]) and not visible[1].any()
    assert np.array_equal(visible[2], layers[2])
    _, kept_all, _ = resolve_occlusion(layers, min_visible=0.25)
    assert kept_all.all()
    _, only_top, _ = resolve_occlusion(np.stack([layers[2], layers[2]]), min_visible=0.5)
    assert only_top.tolist() == [False, True]


# backgrounds, placement, scale --------------------------------------------------------------------------------


def test_backgrounds_are_never_flat(test_scenes: FashionScenes) -> None:
    kinds = set()
    for seed in range(400):
        image, kind = procedural_texture(np.random.default_rng(seed), 112)
        kinds.add(kind)
        assert image.shape == (3, 112, 112) and image.dtype == np.float32
        assert image.std(axis=(1, 2)).max() > 0.05, (seed, kind)
        # never a single colour in any quarter of the canvas either
        assert image.reshape(3, 2, 56, 2, 56).std(axis=(2, 4)).max(0).min() > 0.01, (seed, kind)
    assert kinds == set(TEXTURES)
    for index in range(40):
        assert test_scenes.scene(index).background.std(axis=(1, 2)).max() > 0.05
    with pytest.raises(ValueError, match="texture kind"):
        procedural_texture(np.random.default_rng(0), 112, "plaid")


def test_positions_are_not_grid_aligned_and_scales_in_range(test_scenes: FashionScenes) -> None:
    placements = [p for i in range(300) for p in test_scenes.scene(i).placements]
    corners = np.array([(p.top, p.left) for p in placements]).ravel()
    for patch in (14, 8):  # the patch grids of the two candidate models
        share = np.bincount(corners % patch, minlength=patch) / len(corners)
        assert share.min() > 0.4 / patch and share.max() < 1.8 / patch, (patch, share)
    sizes = np.array([p.size for p in placements])
    assert sizes.min() >= 24 and sizes.max() <= 56
    assert sizes.min() <= 26 and sizes.max() >= 54  # the whole range is used
    assert all(p.top + p.size <= 112 and p.left + p.size <= 112 for p in placements)
    small = FashionScenes("test", size=20, seed=2, min_scale=30, max_scale=32)
    for i in range(20):
        scene = small.scene(i)
        for k, p in enumerate(scene.placements):
            assert 30 <= p.size <= 32
            ys, xs = np.nonzero(scene.silhouettes[k])
            assert ys.min() >= p.top and ys.max() < p.top + p.size
            assert xs.min() >= p.left and xs.max() < p.left + p.size


def test_tints_vary_and_contrast_with_the_background(test_scenes: FashionScenes) -> None:
    tints = np.array([p.tint for i in range(100) for p in test_scenes.scene(i).placements])
    assert tints.std(0).min() > 0.2  # spread over every channel
    contrasts = []
    for index in range(60):
        scene = test_scenes.scene(index)
        for k in np.flatnonzero(scene.kept):
            mask = scene.visible[k]
            contrasts.append(np.linalg.norm(scene.image[:, mask] - scene.background[:, mask], axis=0).mean())
    assert np.median(contrasts) > 0.3


def test_resize_matrix_matches_torch_interpolate() -> None:
    x = np.random.default_rng(0).random((28, 28), dtype=np.float32)
    for size, mode, antialias in [(24, "bilinear", True), (56, "bilinear", True), (112, "bicubic", False)]:
        resize = resize_matrix(28, size, mode, antialias)
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(x)[None, None], size=(size, size), mode=mode, antialias=antialias
        )[0, 0].numpy()
        assert np.allclose(resize @ x @ resize.T, expected, atol=1e-5)


# splits and errors --------------------------------------------------------------------------------------------


def test_splits_draw_items_from_disjoint_fashion_mnist_rows() -> None:
    train = FashionScenes("train", size=200, seed=0, val_items=5000)
    val = FashionScenes("val", size=200, seed=0, val_items=5000)
    test = FashionScenes("test", size=200, seed=0)
    assert len(train.source_ids) + len(val.source_ids) == 60_000 and len(test.source_ids) == 10_000
    assert train.source_ids.max() < val.source_ids.min() == 55_000

    def used(ds: FashionScenes) -> set[int]:
        return {int(ds.source_ids[p.item]) for i in range(100) for p in ds.scene(i).placements}

    train_rows, val_rows = used(train), used(val)
    assert train_rows and val_rows and not train_rows & val_rows
    assert max(train_rows) < 55_000 <= min(val_rows)
    raw = {"train": load_fashion_mnist("train"), "test": load_fashion_mnist("test")}
    for ds in (train, val, test):  # a source id is the row, in its Fashion-MNIST file, of the item drawn
        images, labels = raw["test" if ds.split == "test" else "train"]
        for p in ds.scene(1).placements:
            assert np.array_equal(ds.items[p.item], images[ds.source_ids[p.item]])
            assert labels[ds.source_ids[p.item]] == p.cls
    # the same index gives different scenes in different splits
    assert not torch.equal(train[0]["image"], val[0]["image"])
    assert not torch.equal(val[0]["image"], test[0]["image"])


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        FashionScenes("dev")
    with pytest.raises(ValueError, match="min_scale"):
        FashionScenes("test", min_scale=40, max_scale=30)
    with pytest.raises(ValueError, match="max_scale"):
        FashionScenes("test", max_scale=120)
    with pytest.raises(ValueError, match="min_visible"):
        FashionScenes("test", min_visible=0.0)
    with pytest.raises(ValueError, match="max_items"):
        FashionScenes("test", max_items=11)
    with pytest.raises(ValueError, match="val_items"):
        FashionScenes("val", val_items=0)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionScenes("test", root=tmp_path)


# end to end ---------------------------------------------------------------------------------------------------


def test_metrics_run_unchanged_on_scenes(compose_cfg) -> None:
    cfg = compose_cfg(
        "data=fashionscenes",
        "data.limit=2",
        "data.batch_size=2",
        "model=test_vit",
        "model.img_size=112",
        "model.kwargs.patch_size=14",
        "logger=csv",
        "media_images=0",
    )
    results = evaluate(cfg)
    assert set(results) == {"mif", "lif", "srg", "grid_pointing", "energy_pointing", "class_discrimination"}
    assert all(np.isfinite(v) for k, v in results.items() if k != "class_discrimination")
