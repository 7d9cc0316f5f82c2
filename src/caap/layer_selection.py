"""`layers=auto`: choose CAAP's layer range (start, stop) on calibration images by a metric, then evaluate on others.

CAAP (Izadi et al., arXiv 2603.13652) leaves the layer range to the user; `layers=auto` scores every valid range
of the model (`caap.models.layers.all_layer_ranges`) on a calibration split with a chosen metric
(`layers.select_by`, any `AttributionMetric` config; its `higher_is_better` says which way is better) and keeps
the best. The calibration images are the last `layers.calibration_images` images of the dataset; they are
removed from the evaluated images, so calibration and evaluation never share an image.

The landscape is computed with the batched CAAP engine, sharing all the work that ranges share: one source
pass per batch caches the patch tokens of every residual position, one neutral pass gives the neutral `r_start`
of every start and the unpatched neutral logits (the same for every range), and then each range costs one
`patched_scores` call, the only part that differs between ranges. `range_maps` equals `CAAP.attribute` run
range by range (tested).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from caap.batch import AttributionBatch
from caap.data import AttributionDataModule
from caap.data.collate import collate_skip_none
from caap.methods.caap import (
    CAAP,
    _cast_images,
    group_rows_by_image,
    patch_positions,
    patched_scores,
    source_states,
    window_masks,
)
from caap.metrics.base import AttributionMetric
from caap.models.layers import all_layer_ranges
from caap.models.vit import ViTClassifier

log = logging.getLogger(__name__)
SELECTION_FILE = "layers_auto.json"


@dataclass
class LayerSelection:
    """The chosen range and the landscape it was chosen from (`landscape`: one dict per candidate range)."""

    start: int
    stop: int
    value: float
    metric: str
    higher_is_better: bool
    landscape: list[dict[str, float]] = field(default_factory=list)
    calibration_indices: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def save(self, folder: str | Path) -> Path:
        """Write `layers_auto.json` into `folder`; returns its path."""
        path = Path(folder) / SELECTION_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> LayerSelection | None:
        """The selection saved in `folder`, or None."""
        path = Path(folder) / SELECTION_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None


def range_maps(
    method: CAAP,
    model: ViTClassifier,
    images: Tensor,
    target: Tensor,
    ranges: Sequence[tuple[int, int]],
) -> Iterator[tuple[tuple[int, int], Tensor]]:
    """CAAP maps `[B, gh, gw]` of `images [B, 3, H, W]` for `target [B]`, for each resolved range in `ranges`.

    Uses `method`'s mode, score, window, neutral context and chunking; equals `method.attribute` with
    `start, stop` set to each range, with the source pass, the neutral prefixes and the unpatched neutral
    logits computed once for all ranges.
    """
    gh, gw = model.grid_size(images)
    masks, index = window_masks(gh, gw, method.window, images.device)
    with torch.no_grad():
        unique, targets, inverse, slot = group_rows_by_image(images, target)
        positions = sorted({j for s, e in ranges for j in patch_positions(s, e, method.mode)})
        states = source_states(model, unique, positions)
        starts = sorted({s for s, _ in ranges})
        neutral_images = method.neutral.images(unique, model)  # [S, 1 or B, 3, H, W]
        prefixes: list[dict[int, Tensor]] = []
        logits: list[Tensor] = []
        for imgs in neutral_images:
            x = model.embed(_cast_images(model, imgs))
            at: dict[int, Tensor] = {}
            for j in range(model.depth + 1):
                if j in starts:
                    at[j] = x
                if j < model.depth:
                    x = model.blocks[j](x)
            prefixes.append(at)
            logits.append(model.head(x).float())  # unpatched neutral logits: the same for every start
        chunk = method.chunk_for(model, unique)
        for start, stop in ranges:
            total: Tensor | None = None
            for at, nl in zip(prefixes, logits, strict=True):
                scores = patched_scores(
                    model,
                    states,
                    at[start],
                    targets,
                    masks,
                    start,
                    stop,
                    method.mode,
                    method.score,
                    chunk,
                    nl,
                    method.head_tokens_only,
                )
                total = scores if total is None else total + scores
            assert total is not None
            maps = (total / len(prefixes))[inverse, slot][:, index]
            yield (start, stop), maps.view(images.shape[0], gh, gw)


def calibration_indices(dataset_size: int, num_images: int) -> list[int]:
    """The calibration images: the last `num_images` indices of the dataset."""
    if not 0 < num_images < dataset_size:
        raise ValueError(
            f"layers.calibration_images={num_images} must be between 1 and the dataset size minus one "
            f"({dataset_size - 1}), so that images are left to evaluate on"
        )
    return list(range(dataset_size - num_images, dataset_size))


def _device(cfg: DictConfig) -> torch.device:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    use_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if use_cuda else "cpu")


def select_layer_range(
    cfg: DictConfig, model: ViTClassifier, datamodule: AttributionDataModule, progress: bool = True
) -> LayerSelection:
    """Score every layer range on the calibration images with `cfg.layers.select_by`; return the best.

    Also removes the calibration images from `datamodule`'s evaluated images.
    """
    from caap.lit.module import AttributionModule

    started = time.perf_counter()
    auto = cfg.layers
    method = instantiate(cfg.method)
    if not isinstance(method, CAAP):
        raise ValueError(
            f"layers=auto chooses CAAP's layer range, but method={cfg.method.get('_target_')} has none; "
            "use method=caap or another layers option"
        )
    method.setup(model)
    metric_template: AttributionMetric = instantiate(auto.select_by)
    name = metric_template.name
    dataset = datamodule.dataset
    calib = calibration_indices(len(dataset), int(auto.calibration_images))  # type: ignore[arg-type]
    datamodule.exclude(calib)
    if not datamodule.indices:
        raise ValueError(
            f"layers=auto: no images left to evaluate after setting aside the last {len(calib)} for calibration"
        )
    if hasattr(method, "prepare"):
        method.prepare(dataset)
    device = _device(cfg)
    model = model.to(device).eval()
    selector = AttributionModule(model, method, {}, target=cfg.target)
    ranges = all_layer_ranges(model.depth)
    metrics = {r: instantiate(auto.select_by).to(device) for r in ranges}
    loader = DataLoader(
        Subset(dataset, calib),  # type: ignore[arg-type]
        batch_size=int(auto.get("batch_size") or cfg.data.batch_size),
        collate_fn=collate_skip_none,
        num_workers=int(cfg.data.num_workers),
    )
    bar = tqdm(
        total=len(loader) * len(ranges),
        desc=f"layers=auto: {len(ranges)} ranges x {len(calib)} images",
        disable=not progress,
        unit="range",
    )
    for batch in loader:
        if batch is None:
            continue
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        rows, classes = selector.select_targets(batch)
        images = batch["image"][rows]
        masks = batch.get("masks") or {}
        for (start, stop), maps in range_maps(method, model, images, classes, ranges):
            attribution = AttributionBatch(
                images=images,
                maps=maps.float(),
                classes=classes,
                index=torch.as_tensor(batch["index"], device=device)[rows],
                labels=batch["target"][rows] if batch.get("target") is not None else None,
                cell_masks=masks["cell"][rows] if "cell" in masks else None,
                item_masks=masks["item"][rows] if "item" in masks else None,
                segmentation=batch["segmentation"][rows] if batch.get("segmentation") is not None else None,
            )
            with torch.no_grad():
                metrics[(start, stop)].update(attribution, model)
            bar.update(1)
    bar.close()
    landscape = [{"start": s, "stop": e, "value": float(metrics[(s, e)].compute())} for s, e in ranges]
    higher = bool(metric_template.higher_is_better)
    finite = [row for row in landscape if row["value"] == row["value"]]  # NaN: undefined on every image
    if not finite:
        raise ValueError(f"layers=auto: {name} is undefined for every range on the calibration images")
    best = (max if higher else min)(finite, key=lambda row: row["value"])  # ties: the first in sweep order
    selection = LayerSelection(
        start=int(best["start"]),
        stop=int(best["stop"]),
        value=best["value"],
        metric=name,
        higher_is_better=higher,
        landscape=landscape,
        calibration_indices=calib,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "layers=auto: chose start=%d stop=%d (%s %.4f, %s is better) from %d ranges on %d calibration images in %.1f s",
        selection.start, selection.stop, name, selection.value, "higher" if higher else "lower",
        len(ranges), len(calib), selection.seconds,
    )  # fmt: skip
    return selection


def apply_selection(cfg: DictConfig, selection: LayerSelection) -> None:
    """Set `cfg.layers.start/stop` to the chosen range (the method config reads them by interpolation)."""
    with open_dict(cfg):
        cfg.layers.start = selection.start
        cfg.layers.stop = selection.stop


def log_selection(selection: LayerSelection, loggers: Sequence[Any]) -> None:
    """The choice (W&B summary `layers/start`, `layers/stop`, `layers/value`) and the landscape (a W&B table)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            run = logger.experiment
            run.summary.update(
                {
                    "layers/start": selection.start,
                    "layers/stop": selection.stop,
                    f"layers/{selection.metric}": selection.value,
                    "layers/seconds": selection.seconds,
                }
            )
            table = wandb.Table(
                columns=["start", "stop", selection.metric],
                data=[[r["start"], r["stop"], r["value"]] for r in selection.landscape],
            )
            run.log({"layers/landscape": table})
