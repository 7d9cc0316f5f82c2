"""`python -m caap.train`: tiny FashionGrid and FashionScenes runs write a loadable model and a complete card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from caap.data.idx import DEBIAN_FASHION_MNIST
from caap.models import build_model
from caap.models.embedded import ASSETS
from caap.paths import CONF_DIR
from caap.train import train

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(
        not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists(),
        reason="Debian's dataset-fashion-mnist is not installed",
    ),
]
TINY = ["train_size=64", "val_size=32", "test_size=48", "batch_size=32", "num_workers=0", "threads=1"]


def compose_train(config: str, out: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config, overrides=[f"output_dir={out}", *TINY, *overrides])


def check_card(card: dict, out: Path, name: str) -> dict[str, torch.Tensor]:
    """The card on disk equals the returned one, is complete, and its weights file loads."""
    assert json.loads((out / f"{name}.json").read_text()) == card
    assert card["model"] == name and 0.0 <= card["test_mAP"] <= 1.0
    assert len(card["test_AP_per_class"]) == 10 and "Trouser" in card["test_AP_per_class"]
    # one pass over 64 images in batches of 32 (TINY); the timing fields are recorded, their size is not tested
    assert card["train_steps"] == 2
    assert isinstance(card["train_seconds"], float) and isinstance(card["train_images_per_second"], float)
    assert card["command"].startswith("python -m caap.train") and card["device"]
    assert card["config"]["train_size"] == 64 and card["test_images"] == 48
    assert "output_dir" not in card["config"] and str(out) not in json.dumps(card)  # no path of this machine
    assert not (ASSETS / f"{name}.json").exists() or name == "vit_fashiongrid_patch7_56"
    return load_file(out / f"{name}.safetensors")


def test_train_fashiongrid_default(tmp_path: Path) -> None:
    shipped = (ASSETS / "vit_fashiongrid_patch7_56.safetensors").stat().st_mtime_ns
    card = train(compose_train("train", tmp_path))
    weights = check_card(card, tmp_path, "vit_fashiongrid_patch7_56")
    assert card["weights_dtype"] == "float32" and "test_mAP_float32" not in card
    assert all(v.dtype == torch.float32 for v in weights.values())
    model = build_model("vit_fashiongrid_patch7_56")
    model.model.load_state_dict(weights)  # the same architecture the shipped model has
    assert (ASSETS / "vit_fashiongrid_patch7_56.safetensors").stat().st_mtime_ns == shipped  # export=false


def test_train_fashionscenes_half_weights_reload(tmp_path: Path) -> None:
    small = ["+model.kwargs.depth=2", "model.kwargs.patch_size=8", "+model.kwargs.embed_dim=48"]
    cfg = compose_train("train_fashionscenes", tmp_path, *small)
    assert cfg.dataset._target_ == "caap.data.FashionScenes" and cfg.half
    card = train(cfg)
    name = "vit_fashionscenes_patch8_112"  # the export name follows the patch size
    weights = check_card(card, tmp_path, name)
    assert card["weights_dtype"] == "float16" and 0.0 <= card["test_mAP_float32"] <= 1.0
    assert card["architecture"]["patch_size"] == 8 and card["architecture"]["img_size"] == 112
    assert all(v.dtype == torch.float16 for v in weights.values())
    kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    model = build_model(cfg.model.name, kwargs=kwargs, multilabel=True)
    model.model.load_state_dict({k: v.float() for k, v in weights.items()})
    assert model.model.patch_embed.grid_size == (14, 14) and len(model.model.blocks) == 2
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert model(torch.rand(2, 3, 112, 112)).shape == (2, 10)


def test_train_max_time_stops_the_training_then_tests_and_exports(tmp_path: Path) -> None:
    """`max_time` (a GPU run's safety net) ends the training early (here at once); the model is still tested
    and its card written, with the steps actually taken and the rate of the images actually seen."""
    cfg = compose_train("train", tmp_path, "train_size=320", "val_size=32", "max_time=00:00:00:00")
    card = train(cfg)
    assert card["train_steps"] < 10 and card["config"]["max_time"] == "00:00:00:00"  # 320 / 32 planned
    assert card["train_images_per_second"] == pytest.approx(
        32 * card["train_steps"] / card["train_seconds"], rel=0.1
    )
    assert 0.0 <= card["test_mAP"] <= 1.0
    assert json.loads((tmp_path / "vit_fashiongrid_patch7_56.json").read_text()) == card
