"""`evaluate(cfg)`: build the configured model, method, data, metrics and loggers, run the loop, return metrics.

Outputs (a contract that reports and resumption rely on), all in `cfg.output_dir`:
`metrics.json` (final metric values, each metric's `higher_is_better`, and run facts), `curves.json` (the mean
curve `{"x": [K], "y": [K]}` of each curve metric, e.g. deletion / insertion), `images.safetensors` (the
first `report_images` images, uint8 `[3, H, W]` by dataset index), `per_image.csv` (one row per image and class), `maps/`
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
from caap.layer_selection import LayerSelection, apply_selection, log_selection, select_layer_range
from caap.lit.callbacks import MapWriter, RunOutputs, SampleImages, WandbMedia
from caap.lit.module import AttributionModule
from caap.metrics.base import AttributionMetric, higher_is_better
from caap.models.vit import ViTClassifier
from caap.resume import (
    FINISHED_KEY,
    check_same_config,
    finished_metrics,
    previous_wandb_id,
    session_prefix,
    stored_maps,
)
from caap.sweep import job_label, job_overrides, job_position, sweep_group

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


def build_loggers(
    cfg: DictConfig, output_dir: Path, config: dict, wandb_id: str | None = None
) -> list[Logger]:
    """Instantiate the logger group; the W&B run is named after the overrides and carries the composed config.

    In a multirun every job's W&B run joins one group (the sweep folder, `caap.sweep.sweep_group`) and its
    config has the job's overrides under `overrides` (`{key: value}`) and its place under `sweep`.
    `wandb_id` continues an earlier W&B run (a resumed run, see `caap.resume`).
    """
    loggers: list[Logger] = []
    for node in (cfg or {}).values():
        extra: dict[str, Any] = {}
        if node.get("_target_", "").endswith("WandbLogger"):
            position = job_position()
            extra = {
                "config": {
                    **config,
                    "overrides": job_overrides(),
                    "sweep": None
                    if position is None
                    else {"group": sweep_group(), "job": position[0], "num_jobs": position[1]},
                }
            }
            if node.get("name") is None:
                extra["name"] = run_name()
            if node.get("group") is None and sweep_group() is not None:
                extra["group"] = sweep_group()
            if wandb_id is not None and node.get("id") is None:
                extra.update(id=wandb_id, resume="allow")
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
        better = "higher" if higher_is_better(name, metrics) else "lower"
        table.add_row(name, f"{value:.4f}", better)
    console.print(table)
    console.print(f"outputs: {facts['output_dir']}")
    if facts.get("wandb_dir"):
        console.print(
            f"W&B run ({facts['wandb_mode']}): {facts['wandb_dir']}  (upload: wandb sync {facts['wandb_dir']})"
        )


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Compute and score attribution maps as `cfg` says; returns `{metric name: value}`.

    With `cfg.resume` set (the run folder), a finished run returns its stored metrics and an unfinished one
    continues where it was killed (see `caap.resume`). With `layers=auto` the layer range is chosen on
    calibration images first (see `caap.layer_selection`).
    """
    start_time = time.perf_counter()
    output_dir = Path(cfg.output_dir)
    resuming = bool(cfg.get("resume"))
    if resuming:
        done = finished_metrics(output_dir)
        if done is not None:
            print(f"{job_label() or 'run'}: finished earlier, skipped ({output_dir})", flush=True)
            return done["metrics"]
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir.mkdir(parents=True, exist_ok=True)

    model: ViTClassifier = instantiate(cfg.model)
    selection: LayerSelection | None = None
    if cfg.get("layers") is not None and cfg.layers.get("select_by") is not None:  # layers=auto
        datamodule = build_datamodule(cfg.data, model)
        selection = LayerSelection.load(output_dir) if resuming else None
        if selection is None:
            selection = select_layer_range(cfg, model, datamodule)
            selection.save(output_dir)
        else:
            datamodule.exclude(selection.calibration_indices)
        apply_selection(cfg, selection)
        method = instantiate(cfg.method)
        method.setup(model)
    else:
        method = instantiate(cfg.method)
        method.setup(model)
        datamodule = build_datamodule(cfg.data, model)
    if resuming:
        check_same_config(output_dir, cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    if hasattr(method, "prepare"):  # e.g. CAAP's dataset-mean neutral context averages the evaluated images
        method.prepare(datamodule.dataset)
    metrics = build_metrics(cfg.metric, datamodule)
    for (
        metric
    ) in metrics.values():  # e.g. token dropping on a model that cannot drop tokens: fail before maps
        if hasattr(metric, "check_model"):
            metric.check_model(model)
    loggers = build_loggers(
        cfg.logger, output_dir, config, previous_wandb_id(output_dir) if resuming else None
    )
    if selection is not None:
        log_selection(selection, loggers)
    class_names = model.class_names or getattr(datamodule, "class_names", None)
    facts: dict[str, Any] = {
        "method": cfg.method.get("_target_", "?").rsplit(".", 1)[-1],
        "model": cfg.model.name,
        "data": cfg.data.name,
        "num_images": len(datamodule.indices),
        "output_dir": str(output_dir),
    }
    if selection is not None:
        facts["layers_auto"] = {
            "start": selection.start,
            "stop": selection.stop,
            "metric": selection.metric,
            "value": selection.value,
            "calibration_images": len(selection.calibration_indices),
            "seconds": selection.seconds,
        }
    module = AttributionModule(model, method, metrics, target=cfg.target)
    prefix = ""
    if resuming:
        module.stored_maps = stored_maps(output_dir)
        prefix = session_prefix(output_dir) if module.stored_maps else ""
        facts["resumed_maps"] = len(module.stored_maps)
        log.info("resuming %s: %d maps already written", output_dir, len(module.stored_maps))
    callbacks = [
        MapWriter(output_dir / "maps", prefix=prefix),
        RunOutputs(output_dir, class_names, facts),
        WandbMedia(cfg.media_images, class_names),
    ]
    if cfg.get("report_images", 0):  # images for the map gallery of `python -m caap.report`
        callbacks.append(SampleImages(output_dir, cfg.report_images))
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
    written[FINISHED_KEY] = True  # written last: a resumed run skips only runs that got here
    (output_dir / "metrics.json").write_text(json.dumps(written, indent=2))
    print_summary(results, metrics, written)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return results
