"""`AttributionModule`: the Lightning test loop that computes maps for each (image, target class) and scores them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from caap.batch import TARGETS, AttributionBatch, select_targets
from caap.methods.base import AttributionMethod
from caap.metrics.base import AttributionMetric
from caap.models.vit import ViTClassifier
from caap.stats import DEFAULT_SETTINGS, BootstrapSettings, mean_interval

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    """What the output callbacks record about a run besides its maps and metric values.

    facts: run facts for metrics.json (method, model, data, number of images, output folder, ...);
    class_names: names of the classes (per_image.csv, W&B captions), or None;
    map_prefix: file-name prefix of the map files this session writes (a resumed run's, see `caap.resume`);
    started: `time.perf_counter()` when the run started (metrics.json's `seconds`);
    bootstrap: how the confidence intervals of the results and the bands of the curves are drawn.
    """

    facts: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    map_prefix: str = ""
    started: float = field(default_factory=time.perf_counter)
    bootstrap: BootstrapSettings = DEFAULT_SETTINGS


class AttributionModule(L.LightningModule):
    """Runs `method` on every test batch and updates `metrics`.

    Targets: `label` explains every class present in an image (one map per image and class, from the multi-hot
    `target`), `pred` the model's top class. Each test step returns `{"batch": AttributionBatch, "stored": [P]}`
    for the callbacks (map writer, media). At the end of the epoch the metrics are computed across ranks into
    `self.results` (`{name: value}`), `self.per_sample` (`{name: (index [M], class [M], value [M])}`) and
    `self.curves` (`{name: (x [K], mean curve [K])}` of curve metrics), with the bootstrap CI of each result
    that has per-pair values in `self.intervals` (`{name: (low, high)}`, images resampled, see `caap.stats`)
    and the pointwise band of each mean curve in `self.curve_bands` (`{name: (low [K], high [K])}`). `run`
    carries what the output callbacks record. Run with `Trainer(inference_mode=False)`: gradient methods need autograd.
    """

    def __init__(
        self,
        model: ViTClassifier,
        method: AttributionMethod,
        metrics: dict[str, AttributionMetric],
        target: str = "label",
        run: RunInfo | None = None,
    ) -> None:
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target='{target}' is not supported; allowed: {list(TARGETS)}")
        self.model = model
        self.method = method
        self.metrics = nn.ModuleDict(metrics)
        self.target = target
        self.run = run or RunInfo()
        self.results: dict[str, float] = {}
        self.per_sample: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.curves: dict[str, tuple[Tensor, Tensor]] = {}
        self.intervals: dict[str, tuple[float, float]] = {}
        self.curve_bands: dict[str, tuple[Tensor, Tensor]] = {}
        self.num_maps = 0
        self.model.requires_grad_(False)  # gradients flow to inputs only; parameters never need them
        # maps of a resumed run, `{(index, class): [gh, gw]}`: those pairs are read, not recomputed (caap.resume)
        self.stored_maps: dict[tuple[int, int], Tensor] = {}
        for metric in metrics.values():  # metrics that re-run the method (sanity checks) get the run's method
            if metric.requires_method and metric.method is None:
                metric.method = method

    @property
    def scored_metrics(self) -> dict[str, AttributionMetric]:
        """The metrics by name (`self.metrics` is their `nn.ModuleDict`, so that they follow the device)."""
        return {name: metric for name, metric in self.metrics.items()}  # type: ignore[misc]

    def compute_maps(self, images: Tensor, classes: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Maps `[P, gh, gw]` of `images [P, 3, H, W]` for `classes [P]`, and which were stored `[P]` (bool).

        Pairs `(index, class)` found in `stored_maps` are read from there; the method runs on the others only.
        """
        if not self.stored_maps:  # not resuming: no host round-trip for the keys
            return self.method(self.model, images, classes, index), torch.zeros(
                len(classes), dtype=torch.bool, device=images.device
            )
        keys = list(zip(index.tolist(), classes.tolist(), strict=True))
        stored = torch.tensor([k in self.stored_maps for k in keys], dtype=torch.bool, device=images.device)
        if not stored.any():
            return self.method(self.model, images, classes, index), stored
        first = self.stored_maps[keys[int(stored.nonzero()[0])]]
        maps = torch.empty(len(keys), *first.shape, dtype=torch.float32, device=images.device)
        rows = stored.nonzero().flatten().tolist()
        maps[stored] = torch.stack([self.stored_maps[keys[r]] for r in rows]).to(maps.device)
        if not stored.all():
            todo = ~stored
            maps[todo] = self.method(self.model, images[todo], classes[todo], index[todo]).float()
        return maps, stored

    def test_step(self, batch: dict[str, Any] | None, batch_idx: int) -> dict[str, Any] | None:
        if batch is None:  # every sample of the batch was unreadable (already logged by the collate function)
            return None
        rows, classes = select_targets(batch, self.target, self.model)
        if rows.numel() == 0:
            return None
        index = torch.as_tensor(batch["index"], device=batch["image"].device)[rows]
        maps, stored = self.compute_maps(batch["image"][rows], classes, index)
        attribution = AttributionBatch.from_data(batch, rows, classes, maps)
        with torch.no_grad():
            for metric in self.scored_metrics.values():
                metric.update(attribution, self.model)
        self.num_maps += len(attribution)
        return {"batch": attribution, "stored": stored}

    def on_test_epoch_end(self) -> None:
        settings = self.run.bootstrap
        for name, metric in self.scored_metrics.items():
            self.results[name] = float(metric.compute())
            with metric.sync_context():
                self.per_sample[name] = metric.per_sample()
                self.intervals[name] = metric.confidence_interval(settings)
                extra = metric.extra_per_sample()
                for key, samples in extra.items():
                    self.per_sample[f"{name}/{key}"] = samples
                for key, value in metric.extra_results().items():
                    self.results[f"{name}/{key}"] = float(value)
                    if key in extra:  # a per-stage mean of per-pair values (e.g. sanity stages)
                        index, _, values = extra[key]
                        self.intervals[f"{name}/{key}"] = mean_interval(
                            values.cpu().numpy(), index.cpu().numpy(), settings
                        )
            curve = metric.curve()  # collective calls: every rank makes them
            if curve is not None:
                self.curves[name] = curve
                band = metric.curve_band(settings)
                if band is not None:
                    self.curve_bands[name] = band
        if self.results and self.trainer.is_global_zero:
            # the values are already global (torchmetrics gathered every rank): they go to the loggers once,
            # from rank zero, not through `self.log`, whose epoch-level values under DDP must be reduced again
            # (sync_dist) or draw Lightning's "recommended to use sync_dist=True" warning per key
            for logger in self.loggers:
                logger.log_metrics({f"test/{k}": v for k, v in self.results.items()}, step=self.global_step)
