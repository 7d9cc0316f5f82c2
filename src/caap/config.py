"""Structured-config schemas for the groups with stable keys (model, layers, data) and their registration.

The YAML options of conf/model, conf/layers and conf/data start from these schemas (`defaults: [/schema/...]`),
so a mistyped value (`layers.start=abc`) or an unknown key (`model.nme=...`) fails when Hydra composes the
config, with an OmegaConf message naming the key and the expected type, before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class ModelConfig:
    """Arguments of `caap.models.build_model` (a timm ViT wrapped as `ViTClassifier`)."""

    _target_: str = "caap.models.build_model"
    name: str = MISSING
    pretrained: bool = False
    weights: str | None = None
    num_classes: int | None = None  # None: the weights' head
    reset_head: bool = False  # a new random head of num_classes outputs instead of the weights' head
    fused_attn: bool = True
    img_size: int | None = None
    dynamic_img_size: bool = False
    multilabel: bool = False
    class_names: list[str] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    head: str = "timm"  # timm | dinov2_linear | clip_zeroshot
    head_weights: str | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    clip_model: str = "ViT-B-16"
    clip_pretrained: str | None = "openai"
    prompts: str = "openai"


@dataclass
class LayersConfig:
    """CAAP's layer range over residual positions 0..L, Python slice semantics (negatives from the end).

    `stop: null` runs the range through position L. Checked against the model's depth when the method is set up.
    """

    name: str = "custom"
    start: int = 0
    stop: int | None = 2


@dataclass
class AutoLayersConfig(LayersConfig):
    """`layers=auto`: the range is chosen on calibration images (see `caap.layer_selection`).

    `select_by` is a metric config (`_target_` an `AttributionMetric`); `start`/`stop` are replaced by the
    chosen range before the method is built. `batch_size: null` uses `data.batch_size`. `screen_top_k: k`
    scores every range on cheap estimated maps first and only the k best on exact maps (null: all exact).
    """

    name: str = "auto"
    start: int = 0
    stop: int | None = None
    select_by: Any = MISSING
    calibration_images: int = 32
    batch_size: int | None = None
    screen_top_k: int | None = None


@dataclass
class DataConfig:
    """The evaluated dataset (`dataset` is instantiated by Hydra) and how it is batched and split."""

    name: str = MISSING
    dataset: Any = MISSING
    root: str | None = None
    batch_size: int = 32
    num_workers: int = 0
    limit: int | None = None
    shard: int = 0
    num_shards: int = 1


def _suffix(text: str | None) -> str:
    """`_text`, or nothing for an empty text (run folders of runs without overrides get no trailing `_`)."""
    return f"_{text}" if text else ""


def _resume_or(resume: str | None, default: str) -> str:
    """The run (or sweep) folder: `resume` when continuing a killed run, else the new folder `default`."""
    return str(resume) if resume not in (None, "") else default


def option_groups() -> str:
    """`group: option, ...` lines of the YAML option groups of conf/ (Hydra's `hydra/` groups left out), for
    `--help` (conf/hydra/help): Hydra's own listing would also show the internal `schema` group."""
    from caap.paths import CONF_DIR

    groups = sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
    return "\n".join(f"{g.name}: {', '.join(sorted(f.stem for f in g.glob('*.yaml')))}" for g in groups)


def register_schemas() -> None:
    """Store the schemas under the `schema` group, which the YAML options extend; register caap's resolvers."""
    if not OmegaConf.has_resolver("caap.suffix"):
        OmegaConf.register_new_resolver("caap.suffix", _suffix)
    if not OmegaConf.has_resolver("caap.resume_or"):
        OmegaConf.register_new_resolver("caap.resume_or", _resume_or)
    if not OmegaConf.has_resolver("caap.option_groups"):
        OmegaConf.register_new_resolver("caap.option_groups", option_groups)
    cs = ConfigStore.instance()
    cs.store(group="schema", name="model", node=ModelConfig)
    cs.store(group="schema", name="layers", node=LayersConfig)
    cs.store(group="schema", name="layers_auto", node=AutoLayersConfig)
    cs.store(group="schema", name="data", node=DataConfig)


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed `conf/config.yaml` with command-line style `overrides`, outside a Hydra app (scripts,
    benchmarks); the schemas and resolvers are registered first."""
    from hydra import compose, initialize_config_dir

    from caap.paths import CONF_DIR

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)
