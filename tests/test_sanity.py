"""Cascading-randomisation sanity check (Adebayo et al. 2018): the cascade, the correlations, the metric."""

from __future__ import annotations

import csv
import itertools
import logging
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from caap.batch import AttributionBatch
from caap.lit.module import AttributionModule
from caap.methods import InputXGradient
from caap.methods.base import AttributionMethod
from caap.metrics import CascadingRandomisation
from caap.metrics.functional import cascade_stages, cascading_randomisation, spearman_per_map, ssim_per_map
from caap.models.build import build_model
from caap.models.vit import ViTClassifier
from caap.run import evaluate

FG = "vit_fashiongrid_patch7_56"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained() -> ViTClassifier:
    return build_model(FG, pretrained=True, multilabel=True)


class PatchBrightness(AttributionMethod):
    """A model-independent 'method': each patch's mean intensity (sanity checks must flag it: correlation 1)."""

    name = "brightness"

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        p = model.patch_size[0]
        return torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), p)[:, 0]


def _images(n: int, seed: int = 0) -> Tensor:
    return torch.rand(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def test_cascade_randomises_top_down_on_a_copy(trained: ViTClassifier) -> None:
    original = {k: v.clone() for k, v in trained.state_dict().items()}
    assert cascade_stages(3) == ["head", "block2", "block1", "block0"]
    seen = []
    for name, model in cascading_randomisation(trained, stages=3, seed=0, control=True):
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
        seen.append((name, changed))
    names = [n for n, _ in seen]
    assert names == ["original", "head", "block5", "block4"]
    assert seen[0][1] == set()
    assert seen[1][1] == {"model.norm.weight", "model.norm.bias", "model.head.weight", "model.head.bias"}
    block5 = seen[2][1] - seen[1][1]
    assert block5 and all(k.startswith("model.blocks.5.") for k in block5)
    assert {k for k in original if k.startswith("model.blocks.5.") and "weight" in k} <= block5
    assert seen[3][1] > seen[2][1]  # cumulative
    assert all(torch.equal(v, original[k]) for k, v in trained.state_dict().items())  # never touched
    again = dict(cascading_randomisation(trained, stages=2, seed=0))["block5"]
    for name, model in cascading_randomisation(trained, stages=2, seed=0):  # seeded: same weights every call
        if name == "block5":
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    # independent randomisation: each stage changes only its own layers of the trained weights
    for name, model in cascading_randomisation(trained, stages=3, seed=0, control=True, cumulative=False):
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
        if name == "original":
            assert changed == set()
        elif name == "head":
            assert changed == seen[1][1]
        else:
            assert changed == seen[names.index(name)][1] - seen[names.index(name) - 1][1]
    with pytest.raises(ValueError, match=r"stages must be in 1\.\.7"):
        next(cascading_randomisation(trained, stages=8))


def test_spearman_matches_scipy_with_ties() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 4, (5, 8, 8), generator=g).float()  # many ties
    b = a + torch.randn(5, 8, 8, generator=g)
    want = [spearmanr(x.flatten().numpy(), y.flatten().numpy()).statistic for x, y in zip(a, b, strict=True)]
    torch.testing.assert_close(spearman_per_map(a, b), torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(spearman_per_map(a, -a), -torch.ones(5, dtype=torch.float64))
    c = a.clone()
    c[0] = 3.0  # constant: no ranking
    c[1, 0, 0] = float("nan")
    got = spearman_per_map(a, c)
    assert got[:2].isnan().all() and torch.isfinite(got[2:]).all()


def test_ssim_identical_and_different() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 8, 8, generator=g)
    torch.testing.assert_close(
        ssim_per_map(a, a, (56, 56)), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert (ssim_per_map(a, torch.randn(3, 8, 8, generator=g), (56, 56)) < 0.5).all()


def _batch(model: ViTClassifier, method: AttributionMethod, index: list[int]) -> AttributionBatch:
    images = _images(len(index), seed=3)
    classes = torch.tensor([i % 10 for i in index])
    return AttributionBatch(
        images=images, maps=method(model, images, classes), classes=classes, index=torch.tensor(index)
    )


def test_model_independent_method_keeps_correlation_one(trained: ViTClassifier) -> None:
    method = PatchBrightness()
    metric = CascadingRandomisation(stages=3, method=method)
    metric.update(_batch(trained, method, [0, 1]), trained)
    torch.testing.assert_close(metric.compute(), torch.tensor(1.0, dtype=torch.float64))
    extra = metric.extra_results()
    assert list(extra) == [
        "original",
        "head",
        "block5",
        "block4",
        "ssim/original",
        "ssim/head",
        "ssim/block5",
        "ssim/block4",
    ]
    assert all(abs(v - 1.0) < 1e-6 for v in extra.values())


def test_gradient_maps_decorrelate(trained: ViTClassifier) -> None:
    method = InputXGradient()
    metric = CascadingRandomisation(stages=2, method=method)
    metric.update(_batch(trained, method, [0, 1, 2, 3]), trained)
    extra = metric.extra_results()
    assert extra["original"] == pytest.approx(1.0)  # deterministic: the control reproduces the maps
    assert extra["head"] < 0.5 and extra["block5"] < 0.5
    assert float(metric.compute()) < 0.5


class Zeros(AttributionMethod):
    """All-zero maps: no ranking to correlate."""

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        return images.new_zeros(images.shape[0], *model.grid_size(images))


def test_constant_maps_are_undefined_and_logged(trained: ViTClassifier, caplog) -> None:
    metric = CascadingRandomisation(stages=1, method=Zeros())
    with caplog.at_level(logging.WARNING):
        metric.update(_batch(trained, Zeros(), [0, 1]), trained)
        value = metric.compute()
    assert value.isnan() and metric.per_sample()[2].isnan().all()
    assert "no rank correlation" in caplog.text and "2 of 2 values undefined" in caplog.text


def test_needs_method_and_model(trained: ViTClassifier) -> None:
    batch = _batch(trained, PatchBrightness(), [0])
    with pytest.raises(ValueError, match="re-runs the attribution method"):
        CascadingRandomisation().update(batch, trained)
    with pytest.raises(ValueError, match="runs the model"):
        CascadingRandomisation(method=PatchBrightness()).update(batch, None)
    with pytest.raises(ValueError, match="stages must be >= 1"):
        CascadingRandomisation(stages=0)


def test_module_hands_its_method_over(trained: ViTClassifier) -> None:
    method = PatchBrightness()
    metric = CascadingRandomisation(stages=1)
    AttributionModule(trained, method, {"sanity": metric})
    assert metric.method is method
    own = PatchBrightness()
    kept = CascadingRandomisation(stages=1, method=own)
    AttributionModule(trained, method, {"sanity": kept})
    assert kept.method is own  # a configured method is left alone


def test_two_rank_merge_per_stage(trained: ViTClassifier) -> None:
    method = PatchBrightness()
    batches = {i: _batch(trained, method, [i]) for i in range(4)}
    for b in batches.values():  # make per-pair values differ: perturb the stored maps
        b.maps += torch.randn(b.maps.shape, generator=torch.Generator().manual_seed(int(b.index)))

    def run(metric: CascadingRandomisation, rows: list[int]) -> None:
        for i in rows:
            metric.update(batches[i], trained)

    single = CascadingRandomisation(stages=2, method=method)
    run(single, [0, 1, 2, 3])
    r0, r1 = CascadingRandomisation(stages=2, method=method), CascadingRandomisation(stages=2, method=method)
    run(r0, [0, 2])
    run(r1, [1, 3, 0])  # padded with a repeat of sample 0
    other = itertools.cycle([dim_zero_cat(getattr(r1, attr)) for attr in r0._reductions])
    r0.dist_sync_fn = lambda t, group=None: [t, next(other)]
    r0.distributed_available_fn = lambda: True
    torch.testing.assert_close(r0.compute(), single.compute())
    assert r0.extra_results() == pytest.approx(single.extra_results())
    index, _, rho, _ = r0.per_stage_samples()
    assert index.tolist() == [0, 1, 2, 3] and rho.shape == (4, 3)


def test_sanity_config_end_to_end(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(
        "metric=sanity",
        "metric.sanity.stages=2",
        "method=input_x_gradient",
        "data.limit=3",
        "logger=csv",
        "media_images=0",
        "trainer.enable_progress_bar=false",
    )
    results = evaluate(cfg)
    stages = ["original", "head", "block5"]
    assert set(results) == {"sanity", *(f"sanity/{s}" for s in stages), *(f"sanity/ssim/{s}" for s in stages)}
    assert results["sanity/original"] == pytest.approx(1.0) and results["sanity/block5"] < 0.5
    with open(Path(cfg.output_dir) / "per_image.csv") as fh:
        header = next(csv.reader(fh))
    assert {"sanity", "sanity/head", "sanity/block5"} <= set(header)


@pytest.mark.ddp
def test_localisation_and_sanity_ddp_sim_equal_one_process(compose_cfg, tmp_path: Path) -> None:
    """Two real processes (gloo): padded ranks, a one-map batch, per-stage extra results, dataset-level sums."""
    common = [
        "metric=localisation",
        "+metric.sanity={_target_:caap.metrics.CascadingRandomisation,stages:2}",
        "method=input_x_gradient",
        "data.limit=5",
        "data.batch_size=2",
        "logger=csv",
        "media_images=0",
    ]
    single = evaluate(compose_cfg(*common, f"output_dir={tmp_path / 'one'}"))
    double = evaluate(compose_cfg(*common, "trainer=ddp_sim", f"output_dir={tmp_path / 'two'}"))
    assert set(single) == set(double) and "sanity/head" in single
    for name in single:
        assert double[name] == pytest.approx(single[name], rel=1e-6, abs=1e-7), name
