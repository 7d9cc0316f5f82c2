"""`evaluate(cfg)` end to end: outputs contract, W&B offline run, targets, and clear failures on bad input."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from caap.batch import AttributionBatch
from caap.data import SyntheticGrid
from caap.maps_io import load_maps
from caap.paths import CONF_DIR
from caap.run import evaluate
from caap.stats import DEFAULT_SETTINGS, mean_interval

FAST = ["data=synthetic", "data.limit=6", "data.batch_size=3", "model.pretrained=false", "media_images=2"]


def read_wandb_records(run_dir: Path) -> list:
    """Every record of an offline W&B run file, decoded with wandb's protobuf definitions.

    The `.wandb` file is a LevelDB-style log (what wandb's former Python `datastore` read): a 7-byte header
    (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, little-endian
    length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4); a record's chunks concatenate to one protobuf `Record`.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        if kind == 0 and length == 0:
            break
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_evaluate_synthetic_writes_the_output_contract(compose_cfg) -> None:
    cfg = compose_cfg(*FAST, "logger=wandb")
    results = evaluate(cfg)
    out = Path(cfg.output_dir)
    assert set(results) == {"mif", "lif", "srg", "grid_pointing", "energy_pointing", "class_discrimination"}
    assert results["srg"] == pytest.approx(results["lif"] - results["mif"], abs=1e-9)  # SRG = LIF - MIF

    written = json.loads((out / "metrics.json").read_text())
    assert written["metrics"] == results
    # written once, with the run's timing and W&B facts, and the finished mark
    assert written["finished"] is True
    # the rate is the run's image count over its time (a relation, not a speed)
    assert written["images_per_second"] == pytest.approx(written["num_images"] / written["seconds"])
    # the test loop's own rate: every evaluated image (not map), within the run's time
    loop = written["loop"]
    assert loop["images"] == written["num_images"] < written["num_maps"]
    assert (
        0 < loop["seconds"] < written["seconds"] and loop["images_per_second"] > written["images_per_second"]
    )
    assert loop["after_first_batch_images_per_second"] > 0
    assert written["wandb_mode"] == "offline" and Path(written["wandb_dir"]).parent == out / "wandb"
    data = SyntheticGrid(size=64, image_size=56, grid=2, num_classes=10, seed=0)
    expected_keys = {(i, int(c)) for i in range(6) for c in data[i]["target"].nonzero().flatten()}
    assert written["num_maps"] == len(expected_keys)

    maps = load_maps(out / "maps")
    assert set(maps) == expected_keys and all(m.shape == (8, 8) for m in maps.values())
    with open(out / "per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(int(r["index"]), int(r["class"])) for r in rows} == expected_keys
    # each metric is the mean of its defined per-image values; its CI is the image bootstrap of that mean
    assert written["bootstrap"] == {**asdict(DEFAULT_SETTINGS), "interval": "percentile", "unit": "image"}
    assert DEFAULT_SETTINGS.resamples >= 1000 and DEFAULT_SETTINGS.level == 0.95
    images = np.array([int(r["index"]) for r in rows])
    for name, value in results.items():
        column = torch.tensor([float(r[name]) for r in rows], dtype=torch.float64)
        assert value == pytest.approx(float(column[column.isfinite()].mean()), rel=1e-9), name
        low, high = written["ci"][name]
        assert low <= value <= high and low < high, name
        assert (low, high) == pytest.approx(mean_interval(column.numpy(), images), rel=1e-9), name
    # the stored maps are the ones scored, on their own (image, class): the mask metrics recomputed from
    # maps/ and the dataset's masks give the run's values
    keys = sorted(maps)
    samples = [data[i] for i, _ in keys]
    batch = AttributionBatch(
        images=torch.stack([s["image"] for s in samples]),
        maps=torch.stack([maps[k] for k in keys]),
        classes=torch.tensor([c for _, c in keys]),
        index=torch.tensor([i for i, _ in keys]),
        labels=torch.stack([s["target"] for s in samples]),
        cell_masks=torch.stack([s["masks"]["cell"] for s in samples]),
        item_masks=torch.stack([s["masks"]["item"] for s in samples]),
    )
    for name in ("grid_pointing", "energy_pointing", "class_discrimination"):
        metric = instantiate(cfg.metric[name])
        metric.update(batch)
        assert float(metric.compute()) == pytest.approx(results[name], rel=1e-9), name
    assert (out / "config.yaml").exists() and (out / "csv" / "metrics.csv").exists()
    assert "test/mif" in (out / "csv" / "metrics.csv").read_text()

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = read_wandb_records(run_dir)
    history = {
        item.key or "/".join(item.nested_key): item.value_json
        for r in records
        if r.HasField("history")
        for item in r.history.item
    }
    summary = {
        item.key or "/".join(item.nested_key): item.value_json
        for r in records
        if r.HasField("summary")
        for item in r.summary.update
    }
    logged = {**history, **summary}
    for name, value in results.items():
        assert float(logged[f"test/{name}"]) == pytest.approx(value, rel=1e-6)
        ci = [float(logged[f"test/{name}/ci_{end}"]) for end in ("low", "high")]
        assert ci == pytest.approx(written["ci"][name], rel=1e-6)
    media = {k.split("/")[0] for k in logged}
    assert {"maps", "per_image"} <= media, sorted(logged)


def test_callbacks_are_configurable(compose_cfg) -> None:
    """A callback dropped by override writes nothing; one added by override runs; metrics.json stays."""
    cfg = compose_cfg(
        *FAST,
        "logger=csv",
        "method=random",
        "report_images=4",
        "~callbacks.sample_images",
        "+callbacks.timer={_target_: lightning.pytorch.callbacks.Timer}",
    )
    evaluate(cfg)
    out = Path(cfg.output_dir)
    assert not (out / "images.safetensors").exists()
    assert json.loads((out / "metrics.json").read_text())["finished"] is True


def test_wandb_run_is_finished_when_the_run_raises(compose_cfg, monkeypatch) -> None:
    import wandb

    from caap.lit.module import AttributionModule

    def failing_step(self, batch, batch_idx):
        _ = self.logger.experiment  # the W&B run has started
        raise RuntimeError("planted failure")

    monkeypatch.setattr(AttributionModule, "test_step", failing_step)
    cfg = compose_cfg(*FAST, "logger=wandb", "method=random")
    with pytest.raises(RuntimeError, match="planted failure"):
        evaluate(cfg)
    assert wandb.run is None
    assert not (Path(cfg.output_dir) / "metrics.json").exists()


def test_target_pred_gives_one_map_per_image(compose_cfg) -> None:
    """target=pred explains each image's top class: one map per image, for the class the model ranks first
    (the shipped FashionGrid model, so that the classes differ between images)."""
    cfg = compose_cfg(*FAST, "model.pretrained=true", "logger=csv", "target=pred", "method=random")
    evaluate(cfg)
    maps = load_maps(Path(cfg.output_dir) / "maps")
    assert sorted(i for i, _ in maps) == list(range(6))
    data = SyntheticGrid(size=64, image_size=56, grid=2, num_classes=10, seed=0)
    with torch.no_grad():
        top = instantiate(cfg.model)(torch.stack([data[i]["image"] for i in range(6)])).argmax(-1)
    assert sorted(maps) == [(i, int(c)) for i, c in enumerate(top)]
    assert len(set(top.tolist())) > 1


def test_evaluate_fashiongrid_shipped_model(compose_cfg) -> None:
    cfg = compose_cfg("logger=csv", "data.limit=8", "data.batch_size=4", "media_images=0")
    results = evaluate(cfg)
    assert set(results) == {"mif", "lif", "srg", "grid_pointing", "energy_pointing", "class_discrimination"}
    # the trained model's gradient maps point at the right cell far more often than chance (0.25 on average)
    assert results["grid_pointing"] > 0.35
    assert results["lif"] > results["mif"] and results["srg"] > 0


def test_missing_fashion_mnist_names_the_package(compose_cfg, tmp_path) -> None:
    cfg = compose_cfg("logger=csv", f"data.root={tmp_path / 'nowhere'}", "model.pretrained=false")
    with pytest.raises(Exception, match="dataset-fashion-mnist"):
        evaluate(cfg)


def folder_with_unreadable_files(tmp_path: Path) -> Path:
    """a_broken.png (text), b_ok0.png, c_truncated.jpg (decoding fails after the header), d_ok1.png, e_ok2.png."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("b_ok0.png", "d_ok1.png", "e_ok2.png"):
        Image.fromarray((torch.rand(60, 60, 3) * 255).byte().numpy()).save(folder / name)
    (folder / "a_broken.png").write_bytes(b"not an image")
    Image.fromarray((torch.rand(60, 60, 3) * 255).byte().numpy()).save(folder / "c_truncated.jpg")
    whole = (folder / "c_truncated.jpg").read_bytes()
    (folder / "c_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return folder


def test_unreadable_image_is_skipped_and_logged(compose_cfg, tmp_path, caplog) -> None:
    """An unreadable first file and a truncated one in the middle are skipped and named; num_images counts the
    images scored (it counted the files), and data.limit counts readable images."""
    folder = folder_with_unreadable_files(tmp_path)
    args = [
        "data=image_folder",
        f"data.root={folder}",
        "data.batch_size=2",
        "target=pred",
        "metric=faithfulness",
        "logger=csv",
        "model.pretrained=false",
        "method=random",
    ]
    cfg = compose_cfg(*args)
    results = evaluate(cfg)
    assert {"mif", "lif", "srg", "mif_aopc", "pixel_deletion", "pixel_insertion"} <= set(results)
    written = json.loads((Path(cfg.output_dir) / "metrics.json").read_text())
    assert written["num_maps"] == 3 and written["num_images"] == 3
    assert "a_broken.png" in caplog.text and "c_truncated.jpg" in caplog.text
    assert "2 unreadable image(s)" in caplog.text
    limited = compose_cfg(*args, "data.limit=2", f"output_dir={tmp_path / 'limited'}")
    evaluate(limited)
    written = json.loads((tmp_path / "limited" / "metrics.json").read_text())
    assert written["num_maps"] == 2 and written["num_images"] == 2
    assert sorted(i for i, _ in load_maps(tmp_path / "limited" / "maps")) == [1, 3]


def test_folder_of_unreadable_files_fails_at_setup(compose_cfg, tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / name).write_text("not an image")
    cfg = compose_cfg(
        "data=image_folder", f"data.root={folder}", "target=pred", "metric=faithfulness", "logger=csv"
    )
    with pytest.raises(ValueError, match=r"no image to evaluate.*none of the dataset's 2 samples"):
        evaluate(cfg)  # it ran 0 images and reported NaN metrics


def test_unreadable_first_image_does_not_skip_the_masks_check(compose_cfg, tmp_path) -> None:
    """The masks check reads the first selected image: an unreadable first file made it pass silently, and the
    default metrics failed after the first batch in a long Lightning traceback."""
    cfg = compose_cfg(
        "data=image_folder",
        f"data.root={folder_with_unreadable_files(tmp_path)}",
        "target=pred",
        "logger=csv",
        "model.pretrained=false",
    )
    with pytest.raises(ValueError, match=r"need ground-truth masks.*use metric=faithfulness"):
        evaluate(cfg)
    assert not (Path(cfg.output_dir) / "maps").exists()


def test_masks_metric_on_unlabelled_folder_fails_before_running(compose_cfg, tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray((torch.rand(56, 56, 3) * 255).byte().numpy()).save(folder / "a.png")
    cfg = compose_cfg(
        "data=image_folder", f"data.root={folder}", "target=pred", "logger=csv", "model.pretrained=false"
    )
    with pytest.raises(ValueError, match="metric=faithfulness"):
        evaluate(cfg)


@pytest.mark.parametrize("metric", sorted(p.stem for p in (CONF_DIR / "metric").glob("*.yaml")))
def test_target_label_on_an_unlabelled_folder_fails_at_setup(compose_cfg, tmp_path, metric: str) -> None:
    """target=label explains the classes each image is labelled with: on a folder without labels it made 0 maps
    (faithfulness then failed in PixelDeletion with 'update once first', the default metrics with a hint to
    metric=faithfulness). Every metric group is refused at setup, pointing to target=pred, before any map."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray((torch.rand(56, 56, 3) * 255).byte().numpy()).save(folder / "a.png")
    cfg = compose_cfg(
        "data=image_folder", f"data.root={folder}", f"metric={metric}", "logger=csv", "model.pretrained=false"
    )
    with pytest.raises(ValueError, match=r"target=label needs .*labels.*ImageFolderDataset.*use target=pred"):
        evaluate(cfg)
    assert not (Path(cfg.output_dir) / "config.yaml").exists()


def test_unknown_target_fails_at_setup(compose_cfg) -> None:
    cfg = compose_cfg(*FAST, "target=top", "logger=csv")
    with pytest.raises(ValueError, match=r"target='top' is not supported; allowed: \['label', 'pred'\]"):
        evaluate(cfg)
    assert not (Path(cfg.output_dir) / "config.yaml").exists()


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_sim_equals_one_process(compose_cfg, tmp_path, capfd) -> None:
    common = [
        "data=synthetic",
        "data.limit=9",
        "data.batch_size=2",
        "model.pretrained=false",
        "logger=csv",
        "media_images=0",
    ]
    single = evaluate(compose_cfg(*common, f"output_dir={tmp_path / 'one'}"))
    double = evaluate(compose_cfg(*common, "trainer=ddp_sim", f"output_dir={tmp_path / 'two'}"))
    assert set(single) == set(double)
    # float32 results depend on batch composition (GEMM sizes): one process already moves MIF by ~1e-6
    # relative between data.batch_size=2 and 3 on this random-weight model, and each DDP rank sees other
    # batches; a merge or padding bug moves the means by orders of magnitude more
    for name in single:
        assert double[name] == pytest.approx(single[name], rel=2e-5, abs=1e-5), name
    assert set(load_maps(tmp_path / "one" / "maps")) == set(load_maps(tmp_path / "two" / "maps"))
    # the synced values go to the loggers once from rank zero: no Lightning "use sync_dist=True" warning
    # (the spawned ranks write to the captured file descriptors)
    assert "sync_dist" not in capfd.readouterr().err
    logged = (tmp_path / "two" / "csv" / "metrics.csv").read_text()
    assert all(f"test/{name}" in logged for name in single)


def test_data_classes_the_model_cannot_score_fail_at_setup(compose_cfg, tmp_path) -> None:
    """Labels and masks index the model's classes: labels beyond the head (10 data classes, an 8-class head),
    or target=pred with mask metrics on a head larger than the masks cover (an ImageNet backbone on
    data=synthetic: a top class >= 10 failed in the pointing games at a batch), are refused at setup. Fewer
    data classes than the head with target=label runs (the labels name the head's first classes)."""
    small = compose_cfg(*FAST, "model=test_vit", "model.num_classes=8", "logger=csv")
    with pytest.raises(ValueError, match=r"data=synthetic has 10 classes but model 'test_vit' has 8"):
        evaluate(small)
    assert not (Path(small.output_dir) / "config.yaml").exists()
    large = [*FAST, "model=test_vit", "model.num_classes=12", "logger=csv", "method=random"]
    with pytest.raises(ValueError, match=r"target=pred .*one of 12.*cover 10 classes.*metric=faithfulness"):
        evaluate(compose_cfg(*large, "target=pred"))
    evaluate(compose_cfg(*large, f"output_dir={tmp_path / 'label'}"))
    assert json.loads((tmp_path / "label" / "metrics.json").read_text())["num_maps"] > 6


def test_images_of_another_size_than_the_model_fail_at_setup(compose_cfg) -> None:
    """A fixed-size model refused other image sizes only at the first batch, after a long Lightning traceback."""
    cfg = compose_cfg(*FAST, "data.dataset.image_size=28", "logger=csv")  # the fixed-size FashionGrid model
    with pytest.raises(ValueError, match=r"expects 56x56 images, got 28x28"):
        evaluate(cfg)
    assert not (Path(cfg.output_dir) / "config.yaml").exists()


def test_seed_that_is_not_an_integer_is_named(compose_cfg) -> None:
    with pytest.raises(ValueError, match=r"seed must be an integer; got 'abc'"):
        evaluate(compose_cfg(*FAST, "seed=abc", "logger=csv"))  # it said "invalid literal for int()"


def test_layer_index_out_of_range_fails_before_any_data(compose_cfg, tmp_path) -> None:
    cfg = compose_cfg("method=caap", "layers.start=9", "model.pretrained=false", f"data.root={tmp_path}")
    with pytest.raises(ValueError, match=r"layers\.start"):
        evaluate(cfg)  # data.root is empty: the layer error must come first


@pytest.mark.parametrize(
    ("override", "needle"),
    [("media_images=-1", "media_images must be"), ("report_images=-2", "report_images must be")],
)
def test_negative_image_counts_fail_before_any_map(compose_cfg, override: str, needle: str) -> None:
    """A negative overlay / gallery count was taken silently as 0; it is refused, naming the option, before the
    run folder holds a config."""
    cfg = compose_cfg(*FAST, override, "logger=csv")
    with pytest.raises(Exception, match=needle):  # Hydra wraps the callback's ValueError
        evaluate(cfg)
    assert not (Path(cfg.output_dir) / "config.yaml").exists()
