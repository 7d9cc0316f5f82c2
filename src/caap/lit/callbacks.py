"""Callbacks of the attribution loop (the `callbacks` config group): the map writer, sample images for reports,
W&B media, and the run's output files (`metrics.json` last, see `caap.run`)."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from safetensors.torch import save_file

from caap.batch import AttributionBatch
from caap.lit.media import overlay_panel
from caap.lit.module import AttributionModule
from caap.maps_io import write_maps
from caap.metrics.base import higher_is_better
from caap.resume import FINISHED_KEY

log = logging.getLogger(__name__)


def wandb_logger(trainer: L.Trainer) -> WandbLogger | None:
    """The trainer's W&B logger, or None."""
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


class MapWriter(L.Callback):
    """Writes each test batch's maps to `folder/{prefix}r{rank}_b{batch:06d}.safetensors` (see `caap.maps_io`).

    Maps the module read from a resumed run's files (`outputs["stored"]`) are not written again; a resumed run
    writes with its own prefix (`AttributionModule.run.map_prefix`, see `caap.resume`).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not outputs:
            return
        attribution: AttributionBatch = outputs["batch"]
        new = ~outputs["stored"] if outputs.get("stored") is not None else None
        if new is not None and not new.any():
            return
        index, classes, maps = attribution.index, attribution.classes, attribution.maps
        if new is not None:
            index, classes, maps = index[new], classes[new], maps[new]
        assert isinstance(pl_module, AttributionModule)
        prefix = pl_module.run.map_prefix
        path = self.folder / f"{prefix}r{trainer.global_rank}_b{batch_idx:06d}.safetensors"
        write_maps(path, index, classes, maps)


def per_sample_rows(module: AttributionModule, class_names: list[str] | None) -> list[dict[str, Any]]:
    """One row per (image, class) with every metric's value, from the module's de-duplicated per-sample values."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for name, (index, cls, values) in module.per_sample.items():
        for i, c, v in zip(index.tolist(), cls.tolist(), values.tolist(), strict=True):
            row = rows.setdefault((i, c), {"index": i, "class": c})
            if class_names is not None and 0 <= c < len(class_names):
                row["class_name"] = class_names[c]
            row[name] = v
    return [rows[k] for k in sorted(rows)]


def curve_payload(module: AttributionModule) -> dict[str, dict[str, list[float]]]:
    """curves.json: `{metric: {"x": [K], "y": [K], "low": [K], "high": [K]}}`, the mean curve of each curve
    metric and its pointwise bootstrap band (`low` / `high` absent where the metric gives no band)."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, (x, y) in module.curves.items():
        out[name] = {"x": x.tolist(), "y": y.tolist()}
        if name in module.curve_bands:
            low, high = module.curve_bands[name]
            out[name].update(low=low.tolist(), high=high.tolist())
    return out


def interval_payload(module: AttributionModule) -> dict[str, list[float]]:
    """metrics.json's `ci`: `{result: [low, high]}` for each result with a bootstrap interval."""
    return {name: [low, high] for name, (low, high) in module.intervals.items() if name in module.results}


class RunOutputs(L.Callback):
    """On global rank 0: `per_image.csv` and `curves.json` at the end of the test, then `metrics.json`.

    `metrics.json` holds the final values, each result's `higher_is_better`, each result's bootstrap CI
    (`ci`: `{result: [low, high]}`, results without per-pair values absent) and how it was drawn
    (`bootstrap`: resamples, seed, level, interval kind, resampled unit; see `caap.stats`), the run facts
    (`AttributionModule.run.facts`), `seconds` since the run started, `images_per_second`, the test loop's own
    rate (`loop`: its seconds and images/s from the first batch to the metrics' compute, and images/s after the
    first batch, which pays for worker start-up and kernel selection), the W&B run's folder, mode and group when
    W&B logs, and `"finished": true`. It is written once, in `teardown`, after every callback's
    `on_test_end` (so after the other outputs, whatever the callbacks' order): a resumed run skips only runs
    that got here (`caap.resume`). A test that raised never reaches `teardown`.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.num_maps: int | None = None  # set when the test ended
        self.loop = LoopClock()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.loop.start()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.loop.batch_done(0 if batch is None else len(batch["index"]))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.loop.stop()  # after the metrics' compute (the module's on_test_epoch_end)
        if trainer.global_rank != 0:
            return
        assert isinstance(pl_module, AttributionModule)
        self.folder.mkdir(parents=True, exist_ok=True)
        rows = per_sample_rows(pl_module, pl_module.run.class_names)
        if pl_module.curves:
            (self.folder / "curves.json").write_text(json.dumps(curve_payload(pl_module)))
        if rows:
            fields = list(dict.fromkeys(k for row in rows for k in row))
            with open(self.folder / "per_image.csv", "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
        self.num_maps = len(rows)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.num_maps is None or trainer.global_rank != 0:
            return
        assert isinstance(pl_module, AttributionModule)
        facts, metrics = pl_module.run.facts, pl_module.scored_metrics
        seconds = time.perf_counter() - pl_module.run.started
        payload: dict[str, Any] = {
            "metrics": pl_module.results,
            "num_maps": self.num_maps,
            **facts,
            "higher_is_better": {name: higher_is_better(name, metrics) for name in pl_module.results},
            "ci": interval_payload(pl_module),
            "bootstrap": pl_module.run.bootstrap.record(),
            "seconds": seconds,
            "images_per_second": facts.get("num_images", 0) / seconds,
            "loop": self.loop.record(),
        }
        logger = wandb_logger(trainer)
        if logger is not None:
            run = logger.experiment
            payload.update(
                wandb_dir=str(Path(run.dir).parent), wandb_mode=run.settings.mode, wandb_group=run.group
            )
            run.summary.update({"seconds": seconds, "num_maps": self.num_maps})
        payload[FINISHED_KEY] = True  # written last: see caap.resume
        (self.folder / "metrics.json").write_text(json.dumps(payload, indent=2))
        self.num_maps = None


class LoopClock:
    """Wall time of the test loop on this rank: from its start, after its first batch, to its end (after the
    metrics' compute), and the images it saw (the rank's own; the metrics of `RunOutputs` come from rank 0)."""

    def __init__(self) -> None:
        self.start(math.nan)

    def start(self, now: float | None = None) -> None:
        self.started = time.perf_counter() if now is None else now
        self.first = self.ended = math.nan
        self.images = self.first_images = 0

    def batch_done(self, images: int) -> None:
        if self.images == 0 and images:
            _synchronize()
            self.first, self.first_images = time.perf_counter(), images
        self.images += images

    def stop(self) -> None:
        _synchronize()
        self.ended = time.perf_counter()

    def record(self) -> dict[str, float]:
        """`{seconds, images, images_per_second, after_first_batch_images_per_second}` (NaN when unknown)."""
        seconds = self.ended - self.started
        rest = self.ended - self.first
        return {
            "seconds": seconds,
            "images": self.images,
            "images_per_second": self.images / seconds if seconds > 0 else math.nan,
            "after_first_batch_images_per_second": (self.images - self.first_images) / rest
            if rest > 0 and self.images > self.first_images  # NaN: a single batch
            else math.nan,
        }


def _synchronize() -> None:
    """Wait for the GPU's queued work, so that a wall-clock time covers it (twice per run: no cost)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def count_option(value: int, option: str) -> int:
    """`value` if it is a whole number >= 0 (0 turns the output off); a ValueError naming `option` otherwise (a
    negative count was taken silently as 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{option} must be a whole number >= 0 (0 turns it off); got {value!r}")
    return value


class SampleImages(L.Callback):
    """Writes the first `num_images` evaluated images (rank 0) to `folder/images.safetensors` and the ground
    truth of their (image, class) pairs to `folder/masks.safetensors`, for the gallery of reports.

    Images are named by dataset index, `[3, H, W]` uint8 (pixel space, as the method saw them); 56 px
    FashionGrid images take 9 KB each, 224 px ones 150 KB. Masks are named `<index>_<class>`, `[H, W]` uint8
    (1 inside): the target's cell where the data has cells (FashionGrid), else its item or segment mask; none
    for data without masks. `caap.report` draws its map gallery over them, the masks outlined.
    """

    def __init__(self, folder: str | Path, num_images: int = 8) -> None:
        self.path = Path(folder) / "images.safetensors"
        self.masks_path = Path(folder) / "masks.safetensors"
        self.num_images = count_option(num_images, "report_images")
        self.images: dict[str, Any] = {}
        self.masks: dict[str, Any] = {}

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # an image's rows (one per class) share its batch: once full, later batches hold no kept image
        if not outputs or trainer.global_rank != 0 or len(self.images) >= self.num_images:
            return
        attribution: AttributionBatch = outputs["batch"]
        kept = []
        for p, index in enumerate(attribution.index.tolist()):
            key = str(int(index))
            if key not in self.images and len(self.images) < self.num_images:
                image = attribution.images[p].detach().float().clamp(0, 1).mul(255).round()
                self.images[key] = image.to(torch.uint8).cpu().contiguous()
            if key in self.images:
                kept.append((p, key))
        kind = "cell" if attribution.has_masks("cell") else "item"
        truth = attribution.target_masks(kind)  # None: data without masks
        if truth is None:
            return
        for p, key in kept:
            mask = truth[p].detach().to(torch.uint8).cpu().contiguous()
            self.masks[f"{key}_{int(attribution.classes[p])}"] = mask

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        if self.images:
            save_file(self.images, str(self.path))
        if self.masks:
            save_file(self.masks, str(self.masks_path))


class WandbMedia(L.Callback):
    """Logs to W&B (global rank 0) what a dashboard compares runs on: each result with its bootstrap CI in the
    run summary (`test/<name>`, `test/<name>/ci_low`, `.../ci_high`), each result's direction in the config
    (`higher_is_better`: `{name: bool}`), each mean curve as a table `curves/<name>_table` (`x`, `y`, and the
    band `low`, `high` where the metric has one) with a line plot `curves/<name>` (the same key in every run,
    so the dashboard overlays runs), the per-image table `per_image` (the first `max_table_rows` rows by
    (index, class); the summary says `per_image_total_rows` and `per_image_capped`), and overlays of the first
    `num_images` maps (`maps`). The run's identity (method name, layer range, group, job type) is set when it
    starts (`caap.loggers`)."""

    def __init__(self, num_images: int = 16, max_table_rows: int = 10_000) -> None:
        self.num_images = count_option(num_images, "media_images")
        self.max_table_rows = count_option(max_table_rows, "callbacks.wandb_media.max_table_rows")
        self.panels: list[tuple[Any, str]] = []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not outputs or trainer.global_rank != 0 or len(self.panels) >= self.num_images:
            return
        if wandb_logger(trainer) is None:
            return
        assert isinstance(pl_module, AttributionModule)
        names = pl_module.run.class_names
        attribution: AttributionBatch = outputs["batch"]
        cells = attribution.target_masks("cell")
        for p in range(min(len(attribution), self.num_images - len(self.panels))):
            picture = overlay_panel(
                attribution.images[p], attribution.maps[p], None if cells is None else cells[p]
            )
            cls = int(attribution.classes[p])
            name = names[cls] if names and cls < len(names) else str(cls)
            self.panels.append((picture, f"index {int(attribution.index[p])}, class {name}"))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = wandb_logger(trainer)
        if logger is None or trainer.global_rank != 0:
            return
        import wandb

        assert isinstance(pl_module, AttributionModule)
        run = logger.experiment
        payload: dict[str, Any] = {}
        if self.panels:
            payload["maps"] = [wandb.Image(pic, caption=cap) for pic, cap in self.panels]
        rows = per_sample_rows(pl_module, pl_module.run.class_names)
        if rows:
            columns: list[Any] = list(dict.fromkeys(k for row in rows for k in row))
            kept = rows[: self.max_table_rows]
            payload["per_image"] = wandb.Table(
                columns=columns, data=[[r.get(c) for c in columns] for r in kept]
            )
            run.summary.update({"per_image_total_rows": len(rows), "per_image_capped": len(kept) < len(rows)})
            if len(kept) < len(rows):
                log.warning(
                    "W&B per_image table: the first %d of %d rows (per_image.csv holds all)",
                    len(kept),
                    len(rows),
                )
        payload.update(curve_plots(pl_module))
        directions = {n: higher_is_better(n, pl_module.scored_metrics) for n in pl_module.results}
        run.config.update({"higher_is_better": directions}, allow_val_change=True)
        for name, value in pl_module.results.items():
            run.summary[f"test/{name}"] = value
        for name, (low, high) in interval_payload(pl_module).items():
            run.summary[f"test/{name}/ci_low"] = low
            run.summary[f"test/{name}/ci_high"] = high
        if payload:
            run.log(payload)


def curve_plots(module: AttributionModule) -> dict[str, Any]:
    """`{curves/<name>: line plot}` of each mean curve (`wandb.plot.line` over a table of `x`, `y`, `low`,
    `high` (the band, where the metric has one), logged as `curves/<name>_table`)."""
    import wandb

    plots: dict[str, Any] = {}
    for name, curve in curve_payload(module).items():
        columns = [c for c in ("x", "y", "low", "high") if c in curve]
        table = wandb.Table(
            columns=list[str | int](columns),
            data=[list(row) for row in zip(*(curve[c] for c in columns), strict=True)],
        )
        better = "higher" if higher_is_better(name, module.scored_metrics) else "lower"
        title = f"{name}: mean curve with 95% band (area: {better} is better)"
        plots[f"curves/{name}"] = wandb.plot.line(table, "x", "y", title=title)
    return plots
