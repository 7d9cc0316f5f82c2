"""`layers=auto`: choose the method's layer range on calibration images by a metric, then evaluate on others.

CAAP (Izadi et al., arXiv 2603.13652) leaves the layer range to the user; `layers=auto` scores every range the
method offers (`AttributionMethod.layer_ranges`) on a calibration split with a chosen metric (`layers.select_by`,
any `AttributionMetric` config; its `higher_is_better` says which way is better) and keeps the best. The
calibration images are the last `layers.calibration_images` readable images of the dataset; they are removed
from the evaluated images, so calibration and evaluation never share an image. The maps of every range come from
the method's `range_maps` (CAAP shares the work that ranges share, see `caap.methods.patching`). With
`layers.screen_top_k = k`, every range is first scored on the method's cheap estimated maps
(`estimated_range_maps`: CAAP's gradient estimate) and only the k best are scored on exact maps.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.progress import Progress
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from caap.batch import AttributionBatch, select_targets
from caap.data import AttributionDataModule
from caap.data.collate import collate_skip_none
from caap.methods.base import AttributionMethod
from caap.metrics.base import AttributionMetric
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

    def applied_to(self, cfg: DictConfig) -> DictConfig:
        """A copy of `cfg` with `layers.start/stop` set to this range: the record of what ran (config.yaml, the
        W&B config, resume's config check); the method configs read the range by interpolation."""
        record = copy.deepcopy(cfg)
        with open_dict(record):
            record.layers.start = self.start
            record.layers.stop = self.stop
        return record


def calibration_indices(
    dataset_size: int, num_images: int, readable: Callable[[int], bool] | None = None
) -> list[int]:
    """The calibration images: the last `num_images` indices of the dataset (of those `readable` accepts, asked
    from the end; every index when None), in increasing order."""
    if not 0 < num_images < dataset_size:
        raise ValueError(
            f"layers.calibration_images={num_images} must be between 1 and the dataset size minus one "
            f"({dataset_size - 1}), so that images are left to evaluate on"
        )
    if readable is None:
        return list(range(dataset_size - num_images, dataset_size))
    chosen: list[int] = []
    for index in reversed(range(dataset_size)):
        if len(chosen) == num_images:
            break
        if readable(index):
            chosen.append(index)
    return chosen[::-1]


def _device(cfg: DictConfig) -> torch.device:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    use_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if use_cuda else "cpu")


#: Lightning's mixed-precision settings and the autocast dtype each runs the test loop in.
_AUTOCAST = {
    "bf16-mixed": torch.bfloat16,
    "bf16": torch.bfloat16,
    "16-mixed": torch.float16,
    "16": torch.float16,
}


def trainer_autocast(cfg: DictConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast the Trainer of `cfg` computes the maps in (`trainer.precision`), so that the calibration
    scores the ranges in the precision the run then maps in; a no-op for 32-true."""
    dtype = _AUTOCAST.get(str(cfg.trainer.get("precision", "32-true")))
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def choose_layer_range(
    cfg: DictConfig,
    method: AttributionMethod,
    model: ViTClassifier,
    datamodule: AttributionDataModule,
    resume: bool = False,
) -> LayerSelection | None:
    """Under `layers=auto` (a `layers.select_by` metric), the chosen range; None for a fixed range.

    The range saved in the run folder is reused when resuming, else it is chosen now and saved there. The
    calibration images leave `datamodule`'s evaluated images, and `method` maps at the chosen range from now on.
    """
    auto = cfg.get("layers")
    if auto is None or auto.get("select_by") is None:
        return None
    if not method.layer_ranges(model):
        raise ValueError(
            f"layers=auto chooses a layer range, but method={cfg.method.get('_target_')} has none; "
            "use method=caap or another layers option"
        )
    selection = LayerSelection.load(cfg.output_dir) if resume else None
    if selection is not None:
        calib = selection.calibration_indices
    else:
        size = len(datamodule.dataset)  # type: ignore[arg-type]
        calib = calibration_indices(size, int(auto.calibration_images), datamodule.readable)
    datamodule.exclude(calib)
    if not datamodule.indices:
        raise ValueError(
            f"layers=auto: no images left to evaluate after setting aside the last {len(calib)} for calibration"
        )
    if selection is None:
        selection = select_layer_range(cfg, method, model, datamodule.dataset, calib)
        selection.save(cfg.output_dir)
    method.use_layer_range(selection.start, selection.stop)
    return selection


def screen_top_k(auto: DictConfig, num_ranges: int) -> int | None:
    """`layers.screen_top_k` checked (an integer >= 1, or null = no screening); None when it would keep every
    range (screening would only add work)."""
    k = auto.get("screen_top_k")
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"layers.screen_top_k={k!r} must be an integer >= 1 or null (no screening)")
    return k if k < num_ranges else None


def _score_ranges(
    maps_of: Callable[..., Iterator[tuple[tuple[int, int], Tensor]]],
    select_by: Any,
    cfg: DictConfig,
    model: ViTClassifier,
    loader: DataLoader,
    ranges: Sequence[tuple[int, int]],
    device: torch.device,
    bar: Progress,
    label: str,
) -> dict[tuple[int, int], float]:
    """`select_by`'s value of the maps `maps_of(model, images, classes, ranges)` yields, per range."""
    metrics = {r: instantiate(select_by).to(device) for r in ranges}
    images = len(loader.dataset)  # type: ignore[arg-type]
    task = bar.add_task(f"{label}: {len(ranges)} ranges x {images} images", total=len(loader) * len(ranges))
    for batch in loader:
        if batch is None:
            continue
        batch = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
        rows, classes = select_targets(batch, cfg.target, model)
        with trainer_autocast(cfg, device):  # the run's precision (this loop is outside Lightning's)
            for r, maps in maps_of(model, batch["image"][rows], classes, ranges):
                with torch.no_grad():
                    metrics[r].update(AttributionBatch.from_data(batch, rows, classes, maps), model)
                bar.advance(task)
    return {r: float(metrics[r].compute()) for r in ranges}


def select_layer_range(
    cfg: DictConfig,
    method: AttributionMethod,
    model: ViTClassifier,
    dataset: Dataset,
    calib: Sequence[int],
    progress: bool = True,
) -> LayerSelection:
    """Score every range of `method.layer_ranges(model)` on the images `calib` of `dataset` with
    `cfg.layers.select_by`; return the best (ties: the first in `layer_ranges` order).

    With `layers.screen_top_k = k`, the ranges are first scored on `method.estimated_range_maps` and only the k
    best of them (ties: sweep order) on exact maps; the landscape's `value` is NaN for the others and every row
    has its `screened` value."""
    started = time.perf_counter()
    auto = cfg.layers
    metric_template: AttributionMetric = instantiate(auto.select_by)
    name = metric_template.name
    higher = bool(metric_template.higher_is_better)
    device = _device(cfg)
    model = model.to(device).eval()
    ranges = method.layer_ranges(model)
    top_k = screen_top_k(auto, len(ranges))
    loader = DataLoader(
        Subset(dataset, calib),
        batch_size=int(auto.get("batch_size") or cfg.data.batch_size),
        collate_fn=collate_skip_none,
        num_workers=int(cfg.data.num_workers),
        pin_memory=device.type == "cuda",  # with the non_blocking copies of `_score_ranges`
    )
    screened: dict[tuple[int, int], float] = {}
    exact_ranges = list(ranges)
    # rich, like Lightning's test bar (tqdm is not a dependency of caap)
    with Progress(disable=not progress, transient=False) as bar:
        if top_k is not None:
            screened = _score_ranges(
                method.estimated_range_maps, auto.select_by, cfg, model, loader, ranges, device, bar,
                "layers=auto screening",
            )  # fmt: skip
            sign = -1.0 if higher else 1.0  # sort best first; NaN (undefined) last; ties keep sweep order
            order = sorted(
                range(len(ranges)),
                key=lambda i: (screened[ranges[i]] != screened[ranges[i]], sign * screened[ranges[i]]),
            )
            exact_ranges = [ranges[i] for i in sorted(order[:top_k])]
        values = _score_ranges(
            method.range_maps, auto.select_by, cfg, model, loader, exact_ranges, device, bar, "layers=auto"
        )
    landscape = [
        {"start": s, "stop": e, "value": values.get((s, e), float("nan"))}
        | ({"screened": screened[(s, e)]} if screened else {})
        for s, e in ranges
    ]
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
        calibration_indices=list(calib),
        seconds=time.perf_counter() - started,
    )
    log.info(
        "layers=auto: chose start=%d stop=%d (%s %.4f, %s is better) from %d ranges (%s) on %d calibration "
        "images in %.1f s",
        selection.start, selection.stop, name, selection.value, "higher" if higher else "lower",
        len(ranges), f"{len(exact_ranges)} scored exactly after screening" if screened else "all exact",
        len(calib), selection.seconds,
    )  # fmt: skip
    return selection


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
