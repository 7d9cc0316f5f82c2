"""`layers=auto`: the shared-work landscape equals CAAP range by range; calibration and evaluation are disjoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor

from caap.batch import AttributionBatch
from caap.layer_selection import SELECTION_FILE, calibration_indices
from caap.maps_io import load_maps
from caap.methods.caap import CAAP
from caap.metrics import AttributionMetric
from caap.models import build_model
from caap.models.layers import all_layer_ranges
from caap.run import evaluate
from test_run import read_wandb_records

AUTO = [
    "data=synthetic",
    "data.limit=4",
    "data.batch_size=4",
    "model=test_vit",
    "model.img_size=28",  # 4 x 4 patches: 28 ranges stay cheap
    "data.dataset.image_size=28",
    "method=caap",
    "layers=auto",
    "layers.calibration_images=3",
    "layers.select_by._target_=caap.metrics.MIF",
    "+layers.select_by.ratios=[0.25,0.5,1.0]",
    "metric=localisation",
    "logger=csv",
    "media_images=0",
]


@pytest.fixture(scope="module")
def model():
    """timm's test ViT (6 blocks) on 28 px images: 4 x 4 patches keep the 28 ranges x CAAP reference cheap."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield build_model("test_vit", img_size=28, num_classes=10, kwargs={"patch_size": 7}).eval()
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "options",
    [
        {"score": "delta", "mode": "hold", "neutral": "black"},
        {
            "score": "logit",
            "mode": "hold",
            "head_tokens_only": False,
            "neutral": {"kind": "noise", "num_samples": 2},
        },
        {"score": "prob", "mode": "inject", "window": 2, "neutral": {"kind": "blur", "sigma": 2.0}},
    ],
)
def test_range_maps_equal_caap_range_by_range(model, options) -> None:
    images = torch.rand(3, 3, 28, 28)
    images = torch.cat([images, images[:1]])  # a repeated image (two classes of one image, as target=label)
    target = torch.tensor([1, 4, 7, 2])
    ranges = all_layer_ranges(model.depth)
    method = CAAP(chunk_size=32, **options)
    got = dict(method.range_maps(model, images, target, ranges))
    assert list(got) == ranges
    for start, stop in ranges[:: 1 if options["mode"] == "hold" else 5]:
        reference = CAAP(start=start, stop=stop, chunk_size=32, **options).attribute(model, images, target)
        torch.testing.assert_close(got[(start, stop)], reference, rtol=1e-5, atol=1e-5)


def test_calibration_indices_are_the_last_images() -> None:
    assert calibration_indices(10, 3) == [7, 8, 9]
    # the last readable ones: an unreadable file is never a calibration image (it shrank the calibration set)
    assert calibration_indices(10, 3, readable=lambda i: i not in (8, 6)) == [5, 7, 9]
    for bad in (0, 10):
        with pytest.raises(ValueError, match=r"layers\.calibration_images"):
            calibration_indices(10, bad)


def test_layers_auto_chooses_on_calibration_and_evaluates_on_disjoint_images(compose_cfg, tmp_path) -> None:
    cfg = compose_cfg(*AUTO)
    results = evaluate(cfg)
    out = Path(cfg.output_dir)
    chosen = json.loads((out / SELECTION_FILE).read_text())
    depth = 6  # timm's test_vit
    assert [(r["start"], r["stop"]) for r in chosen["landscape"]] == all_layer_ranges(depth)
    # MIF with prob: lower is better, so the choice is the landscape's minimum
    assert chosen["higher_is_better"] is False and chosen["metric"] == "MIF"
    best = min(chosen["landscape"], key=lambda r: r["value"])
    assert (chosen["start"], chosen["stop"], chosen["value"]) == (best["start"], best["stop"], best["value"])
    assert chosen["calibration_indices"] == [61, 62, 63]  # the last 3 of the 64 synthetic images
    # the chosen range is what ran, and the evaluated images never include a calibration image
    written = OmegaConf.load(out / "config.yaml")
    assert (written.method.start, written.method.stop) == (chosen["start"], chosen["stop"])
    evaluated = {i for i, _ in load_maps(out / "maps")}
    with open(out / "per_image.csv") as fh:
        evaluated |= {int(r["index"]) for r in csv.DictReader(fh)}
    assert evaluated == {0, 1, 2, 3}
    assert not evaluated & set(chosen["calibration_indices"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["layers_auto"]["start"] == chosen["start"] and "grid_pointing" in results


def test_layers_auto_sets_calibration_images_apart_from_an_unlimited_evaluation(compose_cfg) -> None:
    """With the default select_by (SRG, higher is better) and every image of the dataset evaluated."""
    default_metric = [o for o in AUTO if not o.lstrip("+").startswith(("layers.select_by", "logger"))]
    cfg = compose_cfg(
        *default_metric, "data.limit=null", "data.dataset.size=8", "layers.calibration_images=2"
    )
    assert cfg.layers.select_by._target_ == "caap.metrics.SRG"
    evaluate(cfg)
    out = Path(cfg.output_dir)
    evaluated = {i for i, _ in load_maps(out / "maps")}
    assert evaluated == set(range(6))  # images 6 and 7 calibrated the range
    chosen = json.loads((out / SELECTION_FILE).read_text())
    assert chosen["metric"] == "SRG" and chosen["higher_is_better"] is True
    assert chosen["value"] == max(r["value"] for r in chosen["landscape"])
    # the choice and the landscape are in the W&B run
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = read_wandb_records(run_dir)
    summary = {
        i.key or "/".join(i.nested_key): i.value_json
        for r in records
        if r.HasField("summary")
        for i in r.summary.update
    }
    history = {
        i.key or "/".join(i.nested_key) for r in records if r.HasField("history") for i in r.history.item
    }
    assert (int(summary["layers/start"]), int(summary["layers/stop"])) == (chosen["start"], chosen["stop"])
    assert any(k.startswith("layers/landscape") for k in history), sorted(history)


class IndexRecorder(AttributionMetric):
    """A `select_by` metric for tests: records the dataset index of every map it scores (over all instances);
    the value is the map's standard deviation, lower is better."""

    seen: ClassVar[set[int]] = set()
    higher_is_better = False

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        IndexRecorder.seen.update(batch.index.tolist())
        return batch.maps.flatten(1).std(1)


def test_layers_auto_calibrates_on_other_images_than_it_scores(compose_cfg) -> None:
    """The images the selection actually scores (recorded by its metric) are the recorded calibration images,
    and none of them is among the images the run scores (per_image.csv, maps)."""
    cfg = compose_cfg(
        *(o for o in AUTO if not o.lstrip("+").startswith("layers.select_by")),
        "data.limit=null",
        "data.dataset.size=8",
        "layers.calibration_images=2",
        "layers.select_by._target_=test_layer_selection.IndexRecorder",
        "~layers.select_by.score",
    )
    IndexRecorder.seen.clear()
    evaluate(cfg)
    out = Path(cfg.output_dir)
    chosen = json.loads((out / SELECTION_FILE).read_text())
    with open(out / "per_image.csv") as fh:
        scored = {int(r["index"]) for r in csv.DictReader(fh)}
    assert scored == {i for i, _ in load_maps(out / "maps")} == set(range(6))
    assert IndexRecorder.seen == set(chosen["calibration_indices"]) == {6, 7}
    # lower is better: the minimum of a landscape that is not flat
    values = [r["value"] for r in chosen["landscape"]]
    assert chosen["higher_is_better"] is False and len(set(values)) > 1
    assert chosen["value"] == min(values)


def test_layers_auto_needs_caap(compose_cfg) -> None:
    with pytest.raises(
        ValueError, match=r"layers=auto chooses a layer range, but method=\S+Gradient has none"
    ):
        evaluate(compose_cfg(*AUTO, "method=gradient"))


def test_screen_top_k_scores_only_the_best_screened_ranges_exactly(compose_cfg) -> None:
    """`layers.screen_top_k=k`: every range gets a screened value (gradient-estimated maps), only the k best
    screened ranges an exact value, equal to the full landscape's value there; the choice is the best of
    those; k >= the number of ranges is no screening."""
    from hydra.utils import instantiate

    from caap.layer_selection import select_layer_range
    from caap.run import build_datamodule

    cfg = compose_cfg(*AUTO, "method.score=delta", "layers.screen_top_k=3")
    model = instantiate(cfg.model)
    method = instantiate(cfg.method)
    dataset = build_datamodule(cfg, model).dataset
    calib = [62, 63]
    screened = select_layer_range(cfg, method, model, dataset, calib, progress=False)
    cfg.layers.screen_top_k = None
    full = select_layer_range(cfg, method, model, dataset, calib, progress=False)
    assert "screened" not in full.landscape[0]
    scored = [r for r in screened.landscape if r["value"] == r["value"]]
    assert len(scored) == 3 and len(screened.landscape) == len(full.landscape)
    best_screened = sorted(r["screened"] for r in screened.landscape)[:3]  # MIF: lower is better
    assert sorted(r["screened"] for r in scored) == best_screened
    exact = {(r["start"], r["stop"]): r["value"] for r in full.landscape}
    for r in scored:
        assert r["value"] == pytest.approx(exact[(r["start"], r["stop"])], rel=1e-6)
    assert screened.value == min(r["value"] for r in scored)
    cfg.layers.screen_top_k = 28
    assert (
        "screened" not in select_layer_range(cfg, method, model, dataset, calib, progress=False).landscape[0]
    )
    cfg.layers.screen_top_k = 0
    with pytest.raises(ValueError, match=r"layers\.screen_top_k=0"):
        select_layer_range(cfg, method, model, dataset, calib, progress=False)


class AutocastRecorder(AttributionMetric):
    """A `select_by` metric for tests: records the autocast dtype (None: off) it is updated under."""

    seen: ClassVar[set[torch.dtype | None]] = set()
    higher_is_better = False

    def score(self, batch: AttributionBatch, model: torch.nn.Module | None) -> Tensor:
        on = torch.is_autocast_enabled("cpu")
        AutocastRecorder.seen.add(torch.get_autocast_dtype("cpu") if on else None)
        return batch.maps.flatten(1).std(1)


@pytest.mark.parametrize(("precision", "dtype"), [("32-true", None), ("bf16-mixed", torch.bfloat16)])
def test_layers_auto_calibrates_in_the_trainer_precision(compose_cfg, precision, dtype) -> None:
    """The calibration runs outside Lightning: it maps and scores in the autocast of `trainer.precision`, as
    the run's test loop then does."""
    from hydra.utils import instantiate

    from caap.layer_selection import select_layer_range

    cfg = compose_cfg(
        *(o for o in AUTO if not o.lstrip("+").startswith("layers.select_by")),
        "layers.select_by._target_=test_layer_selection.AutocastRecorder",
        "~layers.select_by.score",
        "trainer.accelerator=cpu",
        f"trainer.precision={precision}",
    )
    model = instantiate(cfg.model)
    dataset = instantiate(cfg.data.dataset, image_size=28)
    AutocastRecorder.seen.clear()
    select_layer_range(cfg, instantiate(cfg.method), model, dataset, [0, 1], progress=False)
    assert AutocastRecorder.seen == {dtype}
