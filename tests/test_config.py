"""Every option of every config group composes and instantiates; bad overrides fail at composition."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

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


@pytest.mark.parametrize("name", [n for n in options("model") if n not in REAL_MODELS])
def test_model_options_build(compose_cfg, name: str) -> None:
    cfg = compose_cfg(f"model={name}", "model.pretrained=false")
    model = instantiate(cfg.model)
    assert isinstance(model, ViTClassifier)
    assert model.depth >= 1 and model.num_prefix_tokens >= 0


@pytest.mark.parametrize("name", options("method"))
def test_method_options_instantiate(compose_cfg, name: str) -> None:
    method = instantiate(compose_cfg(f"method={name}").method)
    assert isinstance(method, AttributionMethod)


@pytest.mark.parametrize("name", options("metric"))
def test_metric_options_instantiate(compose_cfg, name: str) -> None:
    metrics = {k: instantiate(v) for k, v in compose_cfg(f"metric={name}").metric.items()}
    assert metrics and all(isinstance(m, AttributionMetric) for m in metrics.values())


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
        cfg.data, build_model("vit_fashiongrid_patch7_56", class_names=list("abcdefghij"))
    )
    sample = datamodule.dataset[datamodule.indices[0]]
    side = 112 if name == "fashionscenes" else 56  # scenes are generated at their own size, not resized
    assert sample["image"].shape == (3, side, side)
    assert float(sample["image"].min()) >= 0.0 and float(sample["image"].max()) <= 1.0


@pytest.mark.parametrize("name", options("layers"))
def test_layers_options_compose(compose_cfg, name: str) -> None:
    cfg = compose_cfg(f"layers={name}")
    assert isinstance(cfg.layers.start, int)


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_instantiate(compose_cfg, name: str) -> None:
    cfg = compose_cfg(f"trainer={name}")
    assert cfg.trainer.inference_mode is False
    if name in ("default", "ddp_sim"):
        trainer = instantiate(cfg.trainer, logger=False)
        assert isinstance(trainer, L.Trainer)


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_instantiate(compose_cfg, name: str) -> None:
    from caap.run import build_loggers

    cfg = compose_cfg(f"logger={name}")
    loggers = build_loggers(cfg.logger, Path(cfg.output_dir), {})
    assert loggers


@pytest.mark.parametrize("group", ["experiment", "debug"])
def test_experiment_and_debug_options_compose(compose_cfg, group: str) -> None:
    for name in options(group):
        cfg = compose_cfg(f"{group}={name}")
        assert cfg.data.limit is not None


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
