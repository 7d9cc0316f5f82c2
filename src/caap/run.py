"""`evaluate(cfg)`: build the configured model, method, data, metrics and loggers, run the loop, return metrics.

Outputs (a contract that reports and resumption rely on), all in `cfg.output_dir`:
`metrics.json` (final metric values and run facts), `per_image.csv` (one row per image and class), `maps/`
(safetensors keyed by dataset index and class, see `caap.maps_io`), `config.yaml` (the composed config), `csv/`
(Lightning's CSV log) and `wandb/` (the offline W&B run, when the wandb logger is on).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from caap.data import AttributionDataModule
from caap.lit.callbacks import MapWriter, RunOutputs, WandbMedia
from caap.lit.module import AttributionModule
from caap.metrics.base import AttributionMetric
from caap.models.vit import ViTClassifier

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig, model: ViTClassifier) -> AttributionDataModule:
    """The datamodule of `cfg.data`; dataset keys left null (`image_size`, `class_names`, `num_classes`) are
    filled from the model."""
    data_config = getattr(model, "data_config", None) or {}
    from_model = {
        "image_size": int(model.image_size[0]),  # the size the model was built for
        "class_names": model.class_names,
        "num_classes": model.num_classes,
        "crop_pct": data_config.get("crop_pct"),  # timm's evaluation preprocessing of the model
        "interpolation": data_config.get("interpolation"),
    }
    fill = {
        k: v for k, v in from_model.items() if k in cfg.dataset and cfg.dataset[k] is None and v is not None
    }
    dataset = instantiate(cfg.dataset, **fill)
    return AttributionDataModule(
        dataset=dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        limit=cfg.limit,
        shard=cfg.shard,
        num_shards=cfg.num_shards,
    )


def build_metrics(cfg: DictConfig, datamodule: AttributionDataModule) -> dict[str, AttributionMetric]:
    """Instantiate the metric group; metrics that need masks fail here, before any map, when the data has none."""
    metrics = {name: instantiate(node) for name, node in cfg.items()}
    needs_masks = [name for name, m in metrics.items() if getattr(m, "requires_masks", False)]
    if needs_masks and datamodule.indices:
        sample = datamodule.dataset[datamodule.indices[0]]
        if sample is not None and "masks" not in sample and "segmentation" not in sample:
            raise ValueError(
                f"metrics {needs_masks} need ground-truth masks, but dataset "
                f"{type(datamodule.dataset).__name__} has none; use metric=faithfulness"
            )
    return metrics


def run_name() -> str:
    """The run's name: its command-line overrides (Hydra's override_dirname), or 'default'."""
    try:
        return HydraConfig.get().job.override_dirname or "default"
    except ValueError:  # composed outside a Hydra app (tests, notebooks)
        return "default"


def build_loggers(cfg: DictConfig, output_dir: Path, config: dict) -> list[Logger]:
    """Instantiate the logger group; the W&B run is named after the overrides and carries the composed config."""
    loggers: list[Logger] = []
    for node in (cfg or {}).values():
        extra: dict[str, Any] = {}
        if node.get("_target_", "").endswith("WandbLogger"):
            extra = {"config": config}
            if node.get("name") is None:
                extra["name"] = run_name()
            (output_dir / "wandb").mkdir(parents=True, exist_ok=True)
        loggers.append(
            instantiate(node, _partial_=True)(**extra)
        )  # `config` clashes with instantiate's own arg
    return loggers


def print_summary(
    results: dict[str, float], metrics: dict[str, AttributionMetric], facts: dict[str, Any]
) -> None:
    """The metric table and where the run's outputs are."""
    console = Console()
    table = Table(title=f"{facts['method']} on {facts['data']} ({facts['num_maps']} maps)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("better", justify="center")
    for name, value in results.items():
        better = "higher" if getattr(metrics.get(name), "higher_is_better", True) else "lower"
        table.add_row(name, f"{value:.4f}", better)
    console.print(table)
    console.print(f"outputs: {facts['output_dir']}")
    if facts.get("wandb_dir"):
        console.print(
            f"W&B run ({facts['wandb_mode']}): {facts['wandb_dir']}  (upload: wandb sync {facts['wandb_dir']})"
        )


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Compute and score attribution maps as `cfg` says; returns `{metric name: value}`."""
    start_time = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)

    model: ViTClassifier = instantiate(cfg.model)
    method = instantiate(cfg.method)
    method.setup(model)
    datamodule = build_datamodule(cfg.data, model)
    if hasattr(method, "prepare"):  # e.g. CAAP's dataset-mean neutral context averages the evaluated images
        method.prepare(datamodule.dataset)
    metrics = build_metrics(cfg.metric, datamodule)
    for name, metric in metrics.items():  # token removal needs attention (not Mixer): fail before maps
        if getattr(metric, "removes_tokens", False):
            model.check_token_removal(f"metric '{name}' (token removal)")
    loggers = build_loggers(cfg.logger, output_dir, config)
    class_names = model.class_names or getattr(datamodule, "class_names", None)
    facts: dict[str, Any] = {
        "method": cfg.method.get("_target_", "?").rsplit(".", 1)[-1],
        "model": cfg.model.name,
        "data": cfg.data.name,
        "num_images": len(datamodule.indices),
        "output_dir": str(output_dir),
    }
    module = AttributionModule(model, method, metrics, target=cfg.target)
    callbacks = [
        MapWriter(output_dir / "maps"),
        RunOutputs(output_dir, class_names, facts),
        WandbMedia(cfg.media_images, class_names),
    ]
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(output_dir)
    )
    trainer.test(module, datamodule=datamodule, verbose=False)

    written = json.loads((output_dir / "metrics.json").read_text())
    results: dict[str, float] = written["metrics"]
    seconds = time.perf_counter() - start_time
    written.update(seconds=seconds, images_per_second=facts["num_images"] / seconds)
    wandb_logger = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
    if wandb_logger is not None:
        run = wandb_logger.experiment
        written.update(wandb_dir=str(Path(run.dir).parent), wandb_mode=run.settings.mode)
        run.summary.update({"seconds": seconds, "num_maps": written["num_maps"]})
        run.finish()
    (output_dir / "metrics.json").write_text(json.dumps(written, indent=2))
    print_summary(results, metrics, written)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return results
