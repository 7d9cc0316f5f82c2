"""Real-dataset loaders on fixture files written in the official formats: ImageNet val (synset folders, Kaggle
LOC_val_solution.csv, devkit ground truth + meta.mat), ImageNet-S PNG ids, Gur et al.'s gtsegs_ijcv.mat (HDF5),
VOC palette PNGs; masks follow the image's resize and crop; an end-to-end run on VOC."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from caap.batch import BACKGROUND, FOREGROUND, IGNORE
from caap.data import (
    ImageNetS,
    ImageNetSegmentation,
    ImageNetVal,
    VOCSegmentation,
    imagenet_class_names,
    imagenet_wnids,
)
from caap.methods import AttributionMethod
from caap.models import ViTClassifier

WNIDS = imagenet_wnids()


def _jpeg(path, h=40, w=60, seed=0) -> np.ndarray:
    rgb = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95)
    return rgb


def _two_region_image(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An image red on the right third, blue elsewhere, and its [H, W] mask (True on the red part)."""
    mask = np.zeros((h, w), dtype=bool)
    mask[:, 2 * w // 3 :] = True
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    rgb[mask] = (255, 0, 0)
    rgb[~mask] = (0, 0, 255)
    return rgb, mask


def _check_alignment(sample: dict, positive: int) -> None:
    """Red pixels are exactly where the segmentation has the positive value (away from the blurred boundary)."""
    red = sample["image"][0] > 0.9
    blue = sample["image"][2] > 0.9
    seg = sample["segmentation"]
    assert seg.shape == sample["image"].shape[1:]
    assert (seg[red] == positive).all() and (seg[blue] != positive).all()
    assert red.any() and blue.any()


def test_imagenet_val_synset_folders(tmp_path) -> None:
    _jpeg(tmp_path / WNIDS[3] / "ILSVRC2012_val_00000007.JPEG")
    _jpeg(tmp_path / WNIDS[999] / "ILSVRC2012_val_00000002.JPEG")
    ds = ImageNetVal(tmp_path, image_size=16, crop_pct=0.875)
    assert len(ds) == 2 and ds.num_classes == 1000
    labels = [int(ds[i]["target"].argmax()) for i in range(2)]
    assert labels == [3, 999]  # timm's class order, not the order of the folders present
    assert ds.class_names[0] == imagenet_class_names()[0] == "tench"
    assert ds[0]["image"].shape == (3, 16, 16)


def test_imagenet_val_kaggle_loc_solution(tmp_path) -> None:
    root = tmp_path / "val"
    for i in (1, 2, 3):
        _jpeg(root / f"ILSVRC2012_val_{i:08d}.JPEG", seed=i)
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(
        "ImageId,PredictionString\n"
        f"ILSVRC2012_val_00000002,{WNIDS[10]} 1 2 30 40 {WNIDS[10]} 5 5 20 20 \n"
        f"ILSVRC2012_val_00000001,{WNIDS[0]} 0 0 10 10 {WNIDS[7]} 3 3 9 9 \n"
    )
    ds = ImageNetVal(root, image_size=16, labels_file=csv)
    assert [p.rsplit("/", 1)[-1] for p in ds.paths] == [
        "ILSVRC2012_val_00000001.JPEG",
        "ILSVRC2012_val_00000002.JPEG",
    ]
    assert ds.targets[0].nonzero().flatten().tolist() == [0, 7] and ds.targets[
        1
    ].nonzero().flatten().tolist() == [10]
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n99999999 1 2 3 4\n")
    with pytest.raises(ValueError, match="n99999999"):
        ImageNetVal(root, image_size=16, labels_file=csv)


def test_imagenet_val_devkit_ground_truth_maps_ilsvrc_ids_through_meta_mat(tmp_path) -> None:
    from scipy.io import savemat

    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True)
    # the devkit's own id order differs from timm's: ILSVRC2012_ID 1 -> WNIDS[500], 2 -> WNIDS[0], 3 -> WNIDS[42]
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    synsets = np.array(
        [
            (1, WNIDS[500], "a", "", 0),
            (2, WNIDS[0], "tench", "", 0),
            (3, WNIDS[42], "b", "", 0),
            (1001, "n00000001", "parent", "", 3),
        ],
        dtype=dtype,
    )
    savemat(str(devkit / "data" / "meta.mat"), {"synsets": synsets})
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n3\n1\n")
    root = tmp_path / "val"
    for i in (1, 2, 3):
        _jpeg(root / f"ILSVRC2012_val_{i:08d}.JPEG", seed=i)
    ds = ImageNetVal(
        root, image_size=16, labels_file=devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    )
    assert ds.targets.argmax(1).tolist() == [0, 42, 500]
    ds = ImageNetVal(
        root,
        image_size=16,
        labels_file=devkit / "data" / "ILSVRC2012_validation_ground_truth.txt",
        devkit=devkit,
    )
    assert ds.targets.argmax(1).tolist() == [0, 42, 500]


def test_imagenet_val_caffe_val_txt_and_wrong_head(tmp_path) -> None:
    _jpeg(tmp_path / "ILSVRC2012_val_00000001.JPEG")
    (tmp_path / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG 65\n")
    ds = ImageNetVal(tmp_path, image_size=16, labels_file="val.txt")
    assert int(ds[0]["target"].argmax()) == 65
    with pytest.raises(ValueError, match="1000 classes"):
        ImageNetVal(tmp_path, image_size=16, labels_file="val.txt", num_classes=10)


def _imagenet_s_png(path, ids: np.ndarray) -> None:
    rgb = np.zeros((*ids.shape, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1] = ids % 256, ids // 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def test_imagenet_s_decodes_r_plus_256g_in_sorted_category_order(tmp_path) -> None:
    root = tmp_path / "ImageNetS50"
    rng = np.random.default_rng(0)
    categories = [
        WNIDS[i] for i in rng.permutation(np.arange(0, 1000, 20))
    ]  # 50 synsets, file order shuffled
    cat_file = tmp_path / "ImageNetS_categories_im50.txt"
    cat_file.write_text("\n".join(categories) + "\n")
    h, w = 30, 45
    rgb, mask = _two_region_image(h, w)
    (root / "validation" / WNIDS[300]).mkdir(parents=True)
    Image.fromarray(rgb).save(root / "validation" / WNIDS[300] / "ILSVRC2012_val_00000011.JPEG", quality=100)
    ids = np.where(mask, 46, 0)  # id 46 = the 46th synset in sorted order = WNIDS[900]
    ids[0, :5] = 1000  # ignore
    _imagenet_s_png(root / "validation-segmentation" / WNIDS[300] / "ILSVRC2012_val_00000011.png", ids)
    with pytest.raises(ValueError, match="categories_file"):
        ImageNetS(root, image_size=24, variant=50)
    ds = ImageNetS(root, image_size=24, crop_pct=0.9, variant=50, categories_file=cat_file)
    sample = ds[0]
    _check_alignment(sample, positive=900)
    assert set(sample["segmentation"].unique().tolist()) <= {900, BACKGROUND, IGNORE}
    assert sample["target"].nonzero().flatten().tolist() == [300, 900]  # folder label + classes in the mask
    _imagenet_s_png(
        root / "validation-segmentation" / WNIDS[300] / "ILSVRC2012_val_00000011.png", ids * 0 + 51
    )
    with pytest.raises(ValueError, match=r"outside 0\.\.50"):
        ds[0]


def _matlab_v73(path, images: list[np.ndarray], masks: list[np.ndarray]) -> None:
    """gtsegs_ijcv.mat as MATLAB -v7.3 stores it: column-major arrays behind object references, gt in cells."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img = f.create_dataset("value/img", (len(images), 1), dtype=h5py.ref_dtype)
        gt = f.create_dataset("value/gt", (len(images), 1), dtype=h5py.ref_dtype)
        for i, (im, m) in enumerate(zip(images, masks, strict=True)):
            img[i, 0] = refs.create_dataset(f"img{i}", data=im.transpose(2, 1, 0)).ref  # [3, W, H]
            data = refs.create_dataset(f"gt{i}", data=m.astype(np.uint8).T)  # [W, H]
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = data.ref
            gt[i, 0] = cell.ref


def test_imagenet_segmentation_reads_the_v73_mat(tmp_path) -> None:
    rgb, mask = _two_region_image(33, 50)
    path = tmp_path / "gtsegs_ijcv.mat"
    _matlab_v73(path, [rgb, rgb[:, ::-1].copy()], [mask, mask[:, ::-1].copy()])
    ds = ImageNetSegmentation(path, image_size=24, crop_pct=0.875, num_classes=1000)
    assert len(ds) == 2
    for i in range(2):
        sample = ds[i]
        _check_alignment(sample, positive=FOREGROUND)
        assert set(sample["segmentation"].unique().tolist()) == {FOREGROUND, BACKGROUND}
        assert sample["target"].shape == (1000,) and sample["target"].sum() == 0
    with h5py.File(tmp_path / "other.mat", "w") as f:
        f["x"] = 1
    with pytest.raises(ValueError, match="/value/img"):
        ImageNetSegmentation(tmp_path / "other.mat", image_size=24)


def _voc(root, name: str, rgb: np.ndarray, raw: np.ndarray) -> None:
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.jpg", quality=100)
    png = Image.fromarray(raw.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[1:21] = np.random.default_rng(0).integers(0, 256, size=(20, 3))
    palette[255] = (224, 224, 192)
    png.putpalette(palette.flatten().tolist())
    png.save(root / "SegmentationClass" / f"{name}.png")


def _voc_fixture(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    rgb, mask = _two_region_image(40, 48)
    raw = np.where(mask, 15, 0)  # 15 = person
    raw[:, 2 * 48 // 3 - 6 : 2 * 48 // 3] = 255  # void border (on the blue side)
    _voc(root, "2007_000033", rgb, raw)
    _voc(root, "2007_000042", rgb, np.where(mask, 8, 0))  # 8 = cat
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2007_000042\n")
    return root


def test_voc_palette_pngs_in_both_label_spaces(tmp_path) -> None:
    _voc_fixture(tmp_path)
    ds = VOCSegmentation(tmp_path, image_size=24, crop_pct=0.9, num_classes=1000)
    sample = ds[0]
    _check_alignment(sample, positive=FOREGROUND)
    assert IGNORE in sample["segmentation"].unique().tolist()
    assert sample["target"].shape == (1000,)
    voc = VOCSegmentation(tmp_path, image_size=24, label_space="voc")
    assert voc.class_names[14] == "person"
    _check_alignment(voc[0], positive=14)
    assert voc[1]["target"].nonzero().flatten().tolist() == [7]
    with pytest.raises(ValueError, match="20-class VOC head"):
        VOCSegmentation(tmp_path, image_size=24, label_space="voc", num_classes=1000)
    with pytest.raises(FileNotFoundError, match="ImageSets"):
        VOCSegmentation(tmp_path / "nothing", image_size=24)


def test_unreadable_voc_image_is_left_out_once(tmp_path, caplog) -> None:
    from caap.data import AttributionDataModule

    root = _voc_fixture(tmp_path)
    (root / "JPEGImages" / "2007_000033.jpg").write_bytes(b"truncated")
    dm = AttributionDataModule(VOCSegmentation(tmp_path, image_size=24, num_classes=1000))
    assert dm.indices == [1] and dm.dataset[0] is None
    named = [r for r in caplog.records if "2007_000033.jpg" in r.getMessage()]
    assert len(named) == 2  # the sample's warning, then the datamodule's count
    assert "left out 1 unreadable image(s)" in caplog.text


def test_image_folder_applies_the_model_crop_pct(tmp_path) -> None:
    from timm.data import create_transform

    from caap.data import ImageFolderDataset

    _jpeg(tmp_path / "a.jpg", h=64, w=80)
    full = ImageFolderDataset(tmp_path, image_size=32)[0]["image"]
    cropped = ImageFolderDataset(tmp_path, image_size=32, crop_pct=0.5)[0]["image"]
    timm_eval = create_transform(
        input_size=32, crop_pct=0.5, interpolation="bicubic", mean=(0, 0, 0), std=(1, 1, 1)
    )
    with Image.open(tmp_path / "a.jpg") as img:
        torch.testing.assert_close(cropped, timm_eval(img.convert("RGB")))  # timm's own eval preprocessing
    assert not torch.allclose(full, cropped)


class RedShare(AttributionMethod):
    """A test double that knows the answer on the two-region fixture: each patch's mean red channel (1 on the
    red object, 0 on the blue background, fractions at the boundary)."""

    def __init__(self, **_: object) -> None:  # the `random` config's seed is not used
        pass

    def attribute(self, model: ViTClassifier, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(images[:, :1], model.patch_size[0])[:, 0]


def test_run_on_voc_scores_segmentation_metrics(compose_cfg, tmp_path) -> None:
    """End to end: the model's preprocessing fills the dataset and the segmentation reaches the localisation
    metrics aligned with the image: a map of the red object scores every pointing game and the segmentation
    AP perfectly; the void border (VOC's 255), where the map crosses from object to background, is left out
    of the pixel accuracy of image 0 only."""
    from caap.run import evaluate

    root = _voc_fixture(tmp_path)
    cfg = compose_cfg(
        "model=test_vit",
        "data=voc_segmentation",
        f"data.root={root}",
        "method=random",
        "method._target_=test_real_datasets.RedShare",
        "metric=segmentation",
        "target=pred",
        "logger=csv",
        "media_images=0",
    )
    results = evaluate(cfg)
    expected = {"mif", "lif", "srg", "pointing", "pointing_tolerance", "energy_pointing"}
    expected |= {"seg_pixel_accuracy", "seg_miou", "seg_map", "seg_ap"}
    assert set(results) == expected
    facts = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert facts["num_maps"] == 2
    assert results["pointing"] == results["pointing_tolerance"] == results["seg_ap"] == 1.0
    assert results["seg_map"] > 0.999 and results["energy_pointing"] > 0.9 and results["seg_miou"] > 0.95
    assert results["srg"] == pytest.approx(results["lif"] - results["mif"], abs=1e-9)
    with open(tmp_path / "run" / "per_image.csv") as fh:
        accuracy = [float(r["seg_pixel_accuracy"]) for r in csv.DictReader(fh)]
    assert accuracy[0] == 1.0 and 0.95 < accuracy[1] < 1.0


def _fixture_for(name: str, tmp_path) -> list[str]:
    """Fixture files for a data option and the overrides pointing the run at them."""
    rgb, mask = _two_region_image(40, 50)
    if name in ("imagenet_val", "image_folder"):
        _jpeg(tmp_path / WNIDS[7] / "ILSVRC2012_val_00000001.JPEG")
        return [f"data.root={tmp_path}"]
    if name == "imagenet_s":
        root = tmp_path / "ImageNetS50"
        (tmp_path / "cats.txt").write_text("\n".join(WNIDS[:50]))
        (root / "validation" / WNIDS[3]).mkdir(parents=True)
        Image.fromarray(rgb).save(root / "validation" / WNIDS[3] / "x.JPEG")
        _imagenet_s_png(root / "validation-segmentation" / WNIDS[3] / "x.png", np.where(mask, 4, 0))
        return [
            f"data.root={root}",
            "data.dataset.variant=50",
            f"data.dataset.categories_file={tmp_path / 'cats.txt'}",
        ]
    if name == "imagenet_segmentation":
        _matlab_v73(tmp_path / "gtsegs_ijcv.mat", [rgb], [mask])
        return [f"data.root={tmp_path / 'gtsegs_ijcv.mat'}"]
    return [f"data.root={_voc_fixture(tmp_path)}"]


@pytest.mark.parametrize(
    "name", ["imagenet_val", "imagenet_s", "imagenet_segmentation", "voc_segmentation", "image_folder"]
)
def test_data_options_follow_the_model_preprocessing(compose_cfg, tmp_path, name: str) -> None:
    """Each real-data option (and any image folder) fills size, crop_pct, interpolation, classes from an
    ImageNet-1k model, whose 1000 class names are unique."""
    from caap.models import build_model
    from caap.run import build_datamodule

    cfg = compose_cfg(f"data={name}", *_fixture_for(name, tmp_path))
    model = build_model("test_vit", img_size=56, num_classes=1000, kwargs={"patch_size": 7}, crop_pct=0.5)
    datamodule = build_datamodule(cfg, model)
    sample = datamodule.dataset[datamodule.indices[0]]
    assert sample["image"].shape == (3, 56, 56) and float(sample["image"].min()) >= 0.0
    assert datamodule.dataset.transform.resize == 112  # floor(56 / crop_pct)
    assert datamodule.class_names[0] == "tench"
    if name in ("imagenet_val", "image_folder"):  # the two cranes and the two maillots, told apart
        assert len(set(datamodule.class_names)) == 1000
        assert datamodule.class_names[134] == "crane (n02012849)" == f"crane ({WNIDS[134]})"
        assert datamodule.class_names[517] == "crane (n03126707)"
    if name not in ("imagenet_val", "image_folder"):
        assert sample["segmentation"].shape == (56, 56) and sample["segmentation"].dtype == torch.long


@pytest.mark.parametrize(
    ("name", "labelled"),
    [
        ("imagenet_val", True),
        ("imagenet_s", True),
        ("imagenet_segmentation", False),
        ("voc_segmentation", False),
        ("image_folder", False),
    ],
)
def test_target_label_needs_a_labelled_data_option(compose_cfg, tmp_path, name: str, labelled: bool) -> None:
    """The data options without class labels (ImageNet-Segmentation, VOC in the default foreground label space,
    an image folder without labels_file) say so, and a run with target=label on them is refused at setup
    (it made 0 maps) while target=pred runs."""
    from caap.models import build_model
    from caap.run import build_datamodule, evaluate

    cfg = compose_cfg(f"data={name}", *_fixture_for(name, tmp_path), "model=test_vit", "logger=csv")
    model = build_model("test_vit", img_size=56, num_classes=1000, kwargs={"patch_size": 7})
    assert build_datamodule(cfg, model).has_labels is labelled
    if not labelled:
        with pytest.raises(ValueError, match="use target=pred"):
            evaluate(cfg)
