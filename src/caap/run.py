"""`evaluate(cfg)`: build the configured model, method, data, metrics, loggers and callbacks, run the loop.

Outputs (a contract that reports and resumption rely on), all in `cfg.output_dir`:
`metrics.json` (final metric values, each metric's `higher_is_better`, each value's 95% bootstrap CI under
`ci` and the bootstrap settings under `bootstrap` (see `caap.stats`), and run facts; written last, with
`"finished": true`), `curves.json` (the mean curve `{"x": [K], "y": [K]}` of each curve metric, e.g.
deletion / insertion, with its pointwise bootstrap band `"low"`, `"high"`), `images.safetensors` (the first
`report_images` images, uint8 `[3, H, W]` by dataset index), `masks.safetensors` (their ground truth per
class, `<index>_<class>` uint8 `[H, W]`, for data with masks), `per_image.csv` (one row per image and class
with every per-pair value, which `caap.report` pairs runs on), `maps/` (safetensors keyed by dataset index and
class, see `caap.maps_io`), `config.yaml` (the composed config, with the chosen range under `layers=auto`),
`layers_auto.json` (`layers=auto`'s choice and landscape), `csv/` (Lightning's CSV log) and `wandb/` (the
offline W&B run, when the wandb logger is on). The callbacks group (conf/callbacks) writes all but the config.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from caap.batch import TARGETS
from caap.data import AttributionDataModule
from caap.layer_selection import LayerSelection, choose_layer_range, log_selection
from caap.lit.module import AttributionModule, RunInfo
from caap.loggers import dashboard_config, wandb_init_arguments
from caap.methods.base import AttributionMethod
from caap.metrics.base import AttributionMetric, higher_is_better
from caap.models.vit import ViTClassifier
from caap.resume import (
    check_resume_folder,
    check_same_config,
    finished_metrics,
    previous_wandb_id,
    session_prefix,
    stored_maps,
)
from caap.stats import format_value
from caap.sweep import job_label, job_overrides, job_position, method_choice, sweep_group

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig, model: ViTClassifier) -> AttributionDataModule:
    """`cfg.datamodule` around the dataset of `cfg.data`; dataset keys left null (`image_size`, `class_names`,
    `num_classes`, `crop_pct`, `interpolation`) are filled from the model."""
    data_config = model.data_config or {}
    from_model = {
        "image_size": int(model.image_size[0]),  # the size the model was built for
        "class_names": model.class_names,
        "num_classes": model.num_classes,
        "crop_pct": data_config.get("crop_pct"),  # timm's evaluation preprocessing of the model
        "interpolation": data_config.get("interpolation"),
    }
    node = cfg.data.dataset
    fill = {k: v for k, v in from_model.items() if k in node and node[k] is None and v is not None}
    return instantiate(cfg.datamodule, dataset=instantiate(node, **fill))


def check_target(target: str, datamodule: AttributionDataModule, data_name: str) -> None:
    """Refuse, before any map, a `target` that is unknown or that would give no map: `label` on data without
    class labels (every target all zero: 0 maps, and metrics that cannot compute)."""
    if target not in TARGETS:
        raise ValueError(f"target='{target}' is not supported; allowed: {list(TARGETS)}")
    if target == "label" and not datamodule.has_labels:
        raise ValueError(
            f"target=label needs class labels, but data={data_name} ({type(datamodule.dataset).__name__}) "
            f"has no labels, so no image would get a map; use target=pred to explain the model's top class"
        )


def check_images(datamodule: AttributionDataModule) -> None:
    """Refuse a run with no image to evaluate (every selected file unreadable, or an empty shard): it would
    end with NaN metrics."""
    if not datamodule.indices:
        size = len(datamodule.dataset)  # type: ignore[arg-type]
        raise ValueError(
            f"no image to evaluate: {datamodule!r} selects none of the dataset's {size} samples (unreadable files, "
            f"if any, are named above)"
        )


def check_data_fits_model(
    datamodule: AttributionDataModule,
    model: ViTClassifier,
    target: str,
    metrics: dict[str, AttributionMetric],
    data_name: str,
) -> None:
    """Refuse, before any map, data the model cannot be scored on: labels beyond the model's head
    (`target=label`), a top class beyond the classes the masks cover (`target=pred` with mask metrics; they
    failed in the pointing games at a batch), or images of another size than a fixed-size model takes (it
    failed at the first batch). Fewer data classes than the head is fine (e.g. data=synthetic on an
    ImageNet backbone): the labels name the head's first classes."""
    classes, head = datamodule.num_classes, model.num_classes
    if classes is not None and head is not None:
        if target == "label" and classes > head:
            raise ValueError(
                f"data={data_name} has {classes} classes but model '{model.name}' has {head}: target=label would "
                f"explain classes the head does not have; use a model with a {classes}-class head (a new random "
                f"one: model.num_classes={classes} model.reset_head=true)"
            )
        masked = [name for name, metric in metrics.items() if metric.requires_masks]
        if target == "pred" and masked and head > classes:
            raise ValueError(
                f"target=pred explains the top class of model '{model.name}' (one of {head}), but the masks of "
                f"data={data_name} cover {classes} classes, so metrics {masked} would find no mask for most; "
                f"use target=label, or metric=faithfulness"
            )
    sample = datamodule.dataset[datamodule.indices[0]]
    if sample is not None:
        model.grid_size(sample["image"])  # raises for a size a fixed-size model does not take


def build_metrics(
    cfg: DictConfig, datamodule: AttributionDataModule, model: ViTClassifier
) -> dict[str, AttributionMetric]:
    """Instantiate the metric group; a metric that needs masks the data lacks, or that cannot score the model
    (e.g. token dropping on a model that cannot lose tokens), fails here, before any map."""
    metrics: dict[str, AttributionMetric] = {str(name): instantiate(node) for name, node in cfg.items()}
    needs_masks = [name for name, m in metrics.items() if m.requires_masks]
    if needs_masks and datamodule.indices:
        sample = datamodule.dataset[datamodule.indices[0]]
        if sample is not None and "masks" not in sample and "segmentation" not in sample:
            raise ValueError(
                f"metrics {needs_masks} need ground-truth masks, but dataset "
                f"{type(datamodule.dataset).__name__} has none; use metric=faithfulness"
            )
    for metric in metrics.values():
        metric.check_model(model)
    return metrics


def build_callbacks(cfg: DictConfig | None) -> list[L.Callback]:
    """Instantiate the callbacks group (`{name: callback config}`; a null entry is skipped)."""
    return [instantiate(node) for node in (cfg or {}).values() if node is not None]


def run_name() -> str:
    """The run's name: its command-line overrides (Hydra's override_dirname), or 'default'."""
    try:
        return HydraConfig.get().job.override_dirname or "default"
    except ValueError:  # composed outside a Hydra app (tests, notebooks)
        return "default"


def build_loggers(
    cfg: DictConfig,
    output_dir: Path,
    config: dict,
    identity: dict[str, Any] | None = None,
    wandb_id: str | None = None,
) -> list[Logger]:
    """Instantiate the logger group; the W&B run is named after the overrides and carries the composed config
    plus `identity` (`caap.loggers.dashboard_config`: method name, layer range).

    In a multirun every job's W&B run joins one group (unique per sweep, `caap.sweep.sweep_group`) and its
    config has the job's overrides under `overrides` (`{key: value}`) and its place under `sweep`.
    `wandb_id` continues an earlier W&B run (a resumed run, see `caap.resume`).
    """
    loggers: list[Logger] = []
    for node in (cfg or {}).values():
        extra: dict[str, Any] = {}
        if node.get("_target_", "").endswith("WandbLogger"):
            position, group = job_position(), sweep_group()
            sweep = (
                None if position is None else {"group": group, "job": position[0], "num_jobs": position[1]}
            )
            run_config = {**config, **(identity or {}), "overrides": job_overrides(), "sweep": sweep}
            extra = wandb_init_arguments(node, run_config, run_name(), group, wandb_id)
            (output_dir / "wandb").mkdir(parents=True, exist_ok=True)
        loggers.append(
            instantiate(node, _partial_=True)(**extra)
        )  # `config` clashes with instantiate's own arg
    return loggers


def print_summary(
    results: dict[str, float], metrics: dict[str, AttributionMetric], facts: dict[str, Any]
) -> None:
    """The metric table (value and 95% bootstrap CI from `facts["ci"]`) and where the run's outputs are."""
    console = Console()
    table = Table(title=f"{facts['method']} on {facts['data']} ({facts['num_maps']} maps)")
    intervals = facts.get("ci") or {}
    level = (facts.get("bootstrap") or {}).get("level", 0.95)
    table.add_column("metric")
    table.add_column(f"value [{level:.0%} CI]" if intervals else "value", justify="right")
    table.add_column("better", justify="center")
    for name, value in results.items():
        better = "higher" if higher_is_better(name, metrics) else "lower"
        table.add_row(name, format_value(value, intervals.get(name)), better)
    console.print(table)
    # soft_wrap: paths stay on one line (rich would fold them at the terminal width), so they can be copied
    console.print(f"outputs: {facts['output_dir']}", soft_wrap=True)
    if facts.get("wandb_dir"):
        console.print(
            f"W&B run ({facts['wandb_mode']}): {facts['wandb_dir']}  (upload: wandb sync {facts['wandb_dir']})",
            soft_wrap=True,
        )


def run_info(
    cfg: DictConfig,
    model: ViTClassifier,
    datamodule: AttributionDataModule,
    selection: LayerSelection | None,
    resumed: int,
    started: float,
) -> RunInfo:
    """The facts metrics.json records (method, model, data, images, layer choice, resumed maps) and what the
    output callbacks need (class names, the map-file prefix of a resumed run)."""
    facts: dict[str, Any] = {
        "method": cfg.method.get("_target_", "?").rsplit(".", 1)[-1],
        "model": cfg.model.name,
        "data": cfg.data.name,
        "num_images": len(datamodule.indices),
        "output_dir": str(cfg.output_dir),
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
    if cfg.get("resume"):
        facts["resumed_maps"] = resumed
    class_names = model.class_names or datamodule.class_names
    prefix = session_prefix(cfg.output_dir) if resumed else ""
    return RunInfo(facts, None if class_names is None else list(class_names), prefix, started)


def with_saved_layer_choice(cfg: DictConfig, output_dir: Path) -> DictConfig:
    """`cfg` as the finished run in `output_dir` recorded it: under `layers=auto` with the range it chose."""
    auto = cfg.get("layers")
    saved = (
        LayerSelection.load(output_dir) if auto is not None and auto.get("select_by") is not None else None
    )
    return cfg if saved is None else saved.applied_to(cfg)


def finish_wandb(failed: bool) -> None:
    """Finish the W&B run of this process, if one was started (marked failed when the run raised)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Compute and score attribution maps as `cfg` says; returns `{metric name: value}`.

    With `cfg.resume` set (the run folder), a finished run of the same config returns its stored metrics and an
    unfinished one continues where it was killed; another config or a folder that holds no run is refused
    (see `caap.resume`). With `layers=auto` the layer range is chosen on
    calibration images first (see `caap.layer_selection`).
    """
    started, output_dir, resuming = time.perf_counter(), Path(cfg.output_dir), bool(cfg.get("resume"))
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ValueError(f"seed must be an integer; got {cfg.seed!r}")
    if resuming:
        check_resume_folder(cfg.resume)
        if (done := finished_metrics(output_dir)) is not None:
            check_same_config(output_dir, with_saved_layer_choice(cfg, output_dir))
            print(f"{job_label() or 'run'}: finished earlier, skipped ({output_dir})", flush=True)
            return done["metrics"]
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir.mkdir(parents=True, exist_ok=True)
    model: ViTClassifier = instantiate(cfg.model)
    method: AttributionMethod = instantiate(cfg.method)
    method.setup(model)  # e.g. a layer range the model does not have fails before any data is read
    callbacks = build_callbacks(cfg.get("callbacks"))  # bad callback options fail before any map
    datamodule = build_datamodule(cfg, model)
    check_target(cfg.target, datamodule, cfg.data.name)
    check_images(datamodule)  # selects the readable images: no later stage meets an unreadable one
    metrics = build_metrics(cfg.metric, datamodule, model)
    check_data_fits_model(datamodule, model, cfg.target, metrics, cfg.data.name)
    method.prepare(datamodule.dataset)  # e.g. CAAP's dataset-mean neutral context
    selection = choose_layer_range(cfg, method, model, datamodule, resuming)
    record = cfg if selection is None else selection.applied_to(cfg)  # the config that ran
    if resuming:
        check_same_config(output_dir, record)
    OmegaConf.save(record, output_dir / "config.yaml", resolve=True)
    config: dict = OmegaConf.to_container(record, resolve=True)  # type: ignore[assignment]
    identity = dashboard_config(method_choice() or method.name, method.layer_range(model))
    loggers = build_loggers(
        cfg.logger, output_dir, config, identity, previous_wandb_id(output_dir) if resuming else None
    )
    failed = True
    try:
        if selection is not None:
            log_selection(selection, loggers)
        stored = stored_maps(output_dir) if resuming else {}
        if stored:
            log.info("resuming %s: %d maps already written", output_dir, len(stored))
        info = run_info(cfg, model, datamodule, selection, len(stored), started)
        module = AttributionModule(model, method, metrics, target=cfg.target, run=info)
        module.stored_maps = stored
        trainer: L.Trainer = instantiate(
            cfg.trainer, logger=loggers or False, callbacks=callbacks,
            default_root_dir=str(output_dir),
        )  # fmt: skip
        trainer.test(module, datamodule=datamodule, verbose=False)
        failed = False
    finally:
        finish_wandb(failed)
    written = finished_metrics(output_dir) or {
        "metrics": module.results,
        "num_maps": module.num_maps,
        **info.facts,
    }
    print_summary(written["metrics"], metrics, written)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return written["metrics"]
