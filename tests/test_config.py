"""Every option of every config group composes and instantiates; bad overrides fail at composition."""

from __future__ import annotations

import functools
from enum import Enum
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from caap.config import register_schemas
from caap.methods import AttributionMethod
from caap.metrics import AttributionMetric
from caap.models import ViTClassifier
from caap.paths import CONF_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_options() -> None:
    for group in ("model", "method", "layers", "data", "metric", "logger", "trainer", "experiment", "debug"):
        assert options(group), group
    assert (CONF_DIR / "hydra" / "job_logging" / "caap.yaml").exists()


# real-size backbones and real datasets are built with fixtures in tests/test_backbones.py, tests/test_real_datasets.py
REAL_MODELS = {
    "vit_small_augreg",
    "vit_base_augreg",
    "deit_small_distilled",
    "deit_base_distilled",
    "deit3_base",
}
REAL_MODELS |= {"dinov2_base_reg", "clip_base_ft", "clip_base_zeroshot", "eva02_small", "mixer_base"}
REAL_DATA = {"imagenet_val", "imagenet_s", "imagenet_segmentation", "voc_segmentation"}


# the fast model options: (timm name, blocks, prefix tokens, classes, input side, multilabel)
FAST_MODELS = {
    "fashiongrid": ("vit_fashiongrid_patch7_56", 6, 1, 10, 56, True),
    "test_vit": ("test_vit", 6, 1, 10, 56, False),
    "vit_small_random": ("vit_small_patch16_224", 12, 1, 10, 224, False),
}


@pytest.mark.parametrize("name", [n for n in options("model") if n not in REAL_MODELS])
def test_model_options_build(compose_cfg, name: str) -> None:
    assert name in FAST_MODELS, f"add model={name} to FAST_MODELS (or REAL_MODELS) with its expected shape"
    timm_name, depth, prefix, classes, side, multilabel = FAST_MODELS[name]
    cfg = compose_cfg(f"model={name}", "model.pretrained=false")
    model = instantiate(cfg.model)
    assert isinstance(model, ViTClassifier) and model.name == timm_name
    assert (model.depth, model.num_prefix_tokens, model.num_classes) == (depth, prefix, classes)
    assert (model.image_size, model.multilabel) == ((side, side), multilabel)
    assert model.class_names == (list(cfg.model.class_names) if cfg.model.class_names else None)
    with torch.no_grad():
        assert model(torch.rand(1, 3, side, side)).shape == (1, classes)


def _configured(value: object) -> object:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


@pytest.mark.parametrize("name", options("method"))
def test_method_options_instantiate(compose_cfg, name: str) -> None:
    """The option builds its `_target_` class and every option it sets reaches the method unchanged (a
    `score: null` resolves to the LibraGrad preset's score; a neutral block to a context of its kind)."""
    node = compose_cfg(f"method={name}").method
    method = instantiate(node)
    assert type(method) is get_class(node._target_) and isinstance(method, AttributionMethod)
    for key, value in OmegaConf.to_container(node, resolve=True).items():
        if key == "_target_":
            continue
        assert hasattr(method, key), f"method={name}: option {key} is not kept by {type(method).__name__}"
        stored = getattr(method, key)
        if key == "score" and value is None:
            assert stored == ("prob" if method.libragrad in ("full", True) else "logit"), name
        elif key == "neutral":
            assert stored.kind == value["kind"], name
        else:
            assert _configured(stored) == value, f"method={name}: {key}={stored!r}, configured {value!r}"


# metric groups that need no ground-truth masks (they run on unlabelled folders, as build_metrics suggests)
MASK_FREE_METRICS = {"faithfulness", "rise", "sanity"}


@pytest.mark.parametrize("name", options("metric"))
def test_metric_options_instantiate(compose_cfg, name: str) -> None:
    """Each entry builds its `_target_` class; the mask-free groups need no masks, and the segmentation group
    (real segmentation datasets: object masks, no grid cells) needs no cell masks."""
    nodes = compose_cfg(f"metric={name}").metric
    metrics = {k: instantiate(v) for k, v in nodes.items()}
    assert metrics
    for key, metric in metrics.items():
        assert type(metric) is get_class(nodes[key]._target_) and isinstance(metric, AttributionMetric)
    masked = {k for k, m in metrics.items() if m.requires_masks}
    assert (not masked) == (name in MASK_FREE_METRICS), (name, masked)
    if name == "segmentation":
        assert {metrics[k].mask for k in masked} == {"item"}


# the data options: their dataset size (image_folder: the one image the test writes)
DATA_SIZES = {"fashiongrid": 10000, "fashionscenes": 10000, "synthetic": 64, "image_folder": 1}


@pytest.mark.parametrize("name", [n for n in options("data") if n not in REAL_DATA])
def test_data_options_instantiate(compose_cfg, name: str, tmp_path: Path) -> None:
    from PIL import Image

    from caap.models import build_model
    from caap.run import build_datamodule

    overrides = [f"data={name}"]
    if name == "image_folder":
        Image.new("RGB", (60, 70), (200, 10, 10)).save(tmp_path / "a.png")
        overrides.append(f"data.root={tmp_path}")
    cfg = compose_cfg(*overrides)
    assert cfg.data.name == name and cfg.data.batch_size > 0
    datamodule = build_datamodule(
        cfg, build_model("vit_fashiongrid_patch7_56", class_names=list("abcdefghij"))
    )
    size = DATA_SIZES[name]
    assert len(datamodule.dataset) == size
    limit = size if cfg.data.limit is None else min(cfg.data.limit, size)
    assert datamodule.indices == list(range(limit))
    sample = datamodule.dataset[datamodule.indices[0]]
    assert int(sample["index"]) == 0
    side = 112 if name == "fashionscenes" else 56  # scenes are generated at their own size, not resized
    assert sample["image"].shape == (3, side, side)
    assert float(sample["image"].min()) >= 0.0 and float(sample["image"].max()) <= 1.0
    if name == "image_folder":  # the red test image, resized: (200, 10, 10) / 255
        torch.testing.assert_close(
            sample["image"][:, 28, 28], torch.tensor([200, 10, 10]) / 255, atol=0.01, rtol=0
        )


def test_synthetic_data_takes_the_input_size_of_any_model(compose_cfg) -> None:
    """`data=synthetic` with a 224 px backbone draws 224 px grids (unless data.dataset.image_size is set)."""
    from caap.models import build_model
    from caap.run import build_datamodule

    model = build_model("vit_small_patch16_224", num_classes=10, kwargs={"depth": 1})
    images = build_datamodule(compose_cfg("data=synthetic"), model).dataset[0]["image"][None]
    assert images.shape == (1, 3, 224, 224) and model(images).shape == (1, 10)
    set_size = compose_cfg("data=synthetic", "data.dataset.image_size=112")
    assert build_datamodule(set_size, model).dataset[0]["image"].shape == (3, 112, 112)


# (start, stop) of each layers option, and the range CAAP resolves from it on a 6-block model
LAYER_RANGES = {"default": ((0, 2), (0, 2)), "early": ((0, None), (0, 7)), "middle": ((2, -2), (2, 5))}
LAYER_RANGES["auto"] = ((0, None), (0, 7))  # placeholders, replaced by the chosen range


@functools.cache
def _six_block_model() -> ViTClassifier:
    from caap.models import build_model

    return build_model("vit_fashiongrid_patch7_56")


@pytest.mark.parametrize("name", options("layers"))
def test_layers_options_compose(compose_cfg, name: str) -> None:
    cfg = compose_cfg(f"layers={name}", "method=caap")
    configured, resolved = LAYER_RANGES[name]
    assert (cfg.layers.start, cfg.layers.stop) == configured
    method = instantiate(cfg.method)  # reads the range by interpolation
    assert method.layer_range(_six_block_model()) == resolved
    if name == "auto":
        assert cfg.layers.select_by._target_ == "caap.metrics.SRG" and cfg.layers.calibration_images == 32


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_instantiate(compose_cfg, name: str) -> None:
    cfg = compose_cfg(f"trainer={name}")
    assert cfg.trainer.inference_mode is False  # gradient methods need autograd in the test loop
    assert cfg.trainer.use_distributed_sampler is False  # caap's sampler shards without padding
    expected = {  # (accelerator, devices, strategy, precision)
        "default": ("auto", 1, "auto", "32-true"),
        "ddp_sim": ("cpu", 2, "ddp_spawn", "32-true"),
        "ddp": ("gpu", -1, "ddp", "32-true"),
        "gpu_bf16": ("gpu", 1, "auto", "bf16-mixed"),
    }[name]
    t = cfg.trainer
    assert (t.accelerator, t.devices, t.strategy, t.precision) == expected
    if name in ("default", "ddp_sim"):
        trainer = instantiate(cfg.trainer, logger=False)
        assert isinstance(trainer, L.Trainer) and trainer.num_devices == expected[1]
        assert trainer.world_size == expected[1] and trainer.precision == "32-true"


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_instantiate(compose_cfg, name: str) -> None:
    from caap.run import build_loggers

    cfg = compose_cfg(f"logger={name}")
    loggers = build_loggers(cfg.logger, Path(cfg.output_dir), {})
    kinds = {"csv": ["CSVLogger"], "wandb": ["CSVLogger", "WandbLogger"]}[name]
    assert [type(lg).__name__ for lg in loggers] == kinds
    assert all(Path(lg.save_dir) == Path(cfg.output_dir) for lg in loggers)  # everything in the run folder


@functools.cache  # read only: the group options of the experiments repeat
def _compose_with_hydra(*overrides: str) -> DictConfig:
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["output_dir=/unused", *overrides], return_hydra_config=True)


def _assert_sets(composed: DictConfig, option: DictConfig, where: str) -> None:
    """Every leaf `option` sets has that value in `composed`."""
    for key, value in option.items():
        assert key in composed, f"{where}.{key} missing"
        if OmegaConf.is_dict(value):
            _assert_sets(composed[key], value, f"{where}.{key}")
        else:
            got = composed[key].name if isinstance(composed[key], Enum) else composed[key]  # hydra.mode
            assert got == value, f"{where}.{key}: {got!r}, the option sets {value!r}"


@pytest.mark.parametrize(("group", "name"), [(g, n) for g in ("experiment", "debug") for n in options(g)])
def test_experiment_and_debug_options_compose(group: str, name: str) -> None:
    """What the option file sets is what the composed config holds (values and the groups it overrides)."""
    cfg = _compose_with_hydra(f"{group}={name}")
    option = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
    for entry in option.get("defaults", []):
        (target, choice), *_ = entry.items()
        path = target.removeprefix("override ").lstrip("/").split("/")
        node, alone = cfg, _compose_with_hydra(f"{'/'.join(path)}={choice}")
        for key in path:
            node, alone = node[key], alone[key]
        same = (set(node), node.get("_target_")) == (set(alone), alone.get("_target_"))
        assert same, f"{group}={name}: {'/'.join(path)} is not {choice}"
    _assert_sets(cfg, OmegaConf.masked_copy(option, [k for k in option if k != "defaults"]), group)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("layers.start=abc", "layers.start"),
        ("model.nme=x", "nme"),
        ("data.batch_size=many", "data.batch_size"),
        ("method=no_such_method", "no_such_method"),
        ("model=no_such_model", "no_such_model"),
    ],
)
def test_bad_overrides_fail_at_composition(compose_cfg, override: str, expected: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(override)
    assert expected in str(err.value) + str(err.value.__cause__)


def test_unknown_timm_model_name_fails_clearly(compose_cfg) -> None:
    cfg = compose_cfg("model.name=vit_no_such_model", "model.pretrained=false")
    with pytest.raises(Exception, match="vit_no_such_model"):
        instantiate(cfg.model)
