"""`layers=auto`: choose CAAP's layer range (start, stop) on calibration images by a metric, then evaluate on others.

CAAP (Izadi et al., arXiv 2603.13652) leaves the layer range to the user; `layers=auto` scores every valid range
of the model (`caap.models.layers.all_layer_ranges`) on a calibration split with a chosen metric
(`layers.select_by`, any `AttributionMetric` config; its `higher_is_better` says which way is better) and keeps
the best. The calibration images are the last `layers.calibration_images` images of the dataset; they are
removed from the evaluated images, so calibration and evaluation never share an image.

The landscape is computed with the batched CAAP engine's pieces, sharing the work that ranges share: one
source pass per batch caches the patch tokens of every residual position, one neutral pass gives the neutral
`r_start` of every start and the unpatched neutral logits (the same for every range), and the patched runs of
the ranges with one start are computed as one trunk with a branch per stop (`_branching_scores`: hold-mode
runs of (s, e) and (s, e') agree through block e - 1), about half the block passes of one CAAP call per
range. `range_maps` equals `CAAP.attribute` run range by range (tested).
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
from rich.progress import Progress
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from caap.batch import AttributionBatch
from caap.data import AttributionDataModule
from caap.data.collate import collate_skip_none
from caap.methods.caap import (
    CAAP,
    _cast_images,
    _prefix_only_block,
    _prefix_only_supported,
    _score,
    group_rows_by_image,
    head_reads_prefix_only,
    patch_positions,
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


def _branching_scores(
    model: ViTClassifier,
    states: dict[int, Tensor],
    prefix: Tensor,
    targets: Tensor,
    masks: Tensor,
    start: int,
    stops: Sequence[int],
    method: CAAP,
    chunk_size: int,
    neutral_logits: Tensor,
) -> dict[int, Tensor]:
    """Scores `{stop: [B, K, n]}` of the patched runs of every range `(start, stop)`, `stop` in `stops`.

    The ranges of one start share their patched runs up to their first difference: in `hold` mode the runs of
    `(start, e)` and `(start, e')` with e < e' are the same through block e - 1, so one trunk run writes the
    source tokens at every position and, at each position e in `stops`, a branch finishes the run without
    writing (about half the block passes of running each range on its own). In `inject` mode (writes at
    `start` only) every stop gives the same run, computed once.
    """
    depth, p = model.depth, model.num_prefix_tokens
    batch, k = targets.shape
    n = masks.shape[0]
    fast = method.head_tokens_only and depth > start and head_reads_prefix_only(model)
    fast = fast and _prefix_only_supported(model.blocks[depth - 1])
    hold = method.mode == "hold"
    last = max(stops) if hold else start + 1
    write_at = {j for j in patch_positions(start, last, method.mode) if not (fast and j == depth)}
    nl = neutral_logits.float()
    neutral_t = None
    if method.score == "delta":
        neutral_t = (nl if nl.shape[0] == batch else nl.expand(batch, -1)).gather(1, targets)
    out = {e: torch.empty(batch * n, k, dtype=torch.float32, device=prefix.device) for e in stops}
    masks = masks.to(prefix.device)
    nb = prefix.shape[0]

    def block(j: int, x: Tensor) -> Tensor:
        return _prefix_only_block(model.blocks[j], x, p) if fast and j == depth - 1 else model.blocks[j](x)

    def finish(x: Tensor, j: int) -> Tensor:  # blocks j..L-1 without writing, then the head
        for i in range(j, depth):
            x = block(i, x)
        return model.head(x).float()

    for q0 in range(0, batch * n, max(1, int(chunk_size))):
        q1 = min(batch * n, q0 + int(chunk_size))
        q = torch.arange(q0, q1, device=prefix.device)
        b, w = q // n, q % n
        rows, patch = masks[w].nonzero(as_tuple=True)
        src_b, tok = b[rows], patch + p
        x = prefix.index_select(0, b if nb > 1 else torch.zeros_like(b))
        logits: dict[int, Tensor] = {}
        for j in range(start, depth + 1):
            if hold and j > start and j in out:
                logits[j] = finish(x, j)  # range (start, j): written at start..j-1 (x is not modified)
            if j in write_at and rows.numel():
                x.index_put_((rows, tok), states[j][src_b, patch].to(x.dtype))
            if j < depth:
                x = block(j, x)
        final = model.head(x).float()
        for e in out:
            if e not in logits:  # hold: stop = L + 1 (written through L); inject: every stop
                logits[e] = final
        for e, lg in logits.items():
            out[e][q0:q1] = _score(
                lg, targets[b], method.score, model.multilabel, None if neutral_t is None else neutral_t[b]
            )
    return {e: v.view(batch, n, k).permute(0, 2, 1) for e, v in out.items()}


def range_maps(
    method: CAAP,
    model: ViTClassifier,
    images: Tensor,
    target: Tensor,
    ranges: Sequence[tuple[int, int]],
) -> Iterator[tuple[tuple[int, int], Tensor]]:
    """CAAP maps `[B, gh, gw]` of `images [B, 3, H, W]` for `target [B]`, for each resolved range in `ranges`.

    Uses `method`'s mode, score, window, neutral context and chunking; equals `method.attribute` with
    `start, stop` set to each range. Shared between ranges: one source pass, one neutral pass (the neutral
    `r_start` of every start and the unpatched logits), and the patched runs of ranges with the same start
    up to where they differ (`_branching_scores`). Yields as each start is done: by start, then stop (the
    order of `all_layer_ranges`).
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
    # yield as each start is done (progress bars move), outside no_grad (it must not leak into the consumer)
    for start in starts:
        with torch.no_grad():
            stops = sorted({e for s, e in ranges if s == start})
            total: dict[int, Tensor] = {}
            for at, nl in zip(prefixes, logits, strict=True):
                scores = _branching_scores(
                    model, states, at[start], targets, masks, start, stops, method, chunk, nl
                )
                total = scores if not total else {e: total[e] + scores[e] for e in stops}
        for e in stops:
            m = (total[e] / len(prefixes))[inverse, slot][:, index]
            yield (start, e), m.view(images.shape[0], gh, gw)


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
    # rich, like Lightning's test bar (tqdm is not a dependency of caap)
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task(
            f"layers=auto: {len(ranges)} ranges x {len(calib)} images", total=len(loader) * len(ranges)
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
                    segmentation=batch["segmentation"][rows]
                    if batch.get("segmentation") is not None
                    else None,
                )
                with torch.no_grad():
                    metrics[(start, stop)].update(attribution, model)
                bar.advance(task)
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
