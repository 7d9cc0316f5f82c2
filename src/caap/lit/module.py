"""`AttributionModule`: the Lightning test loop that computes maps for each (image, target class) and scores them."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from caap.batch import AttributionBatch
from caap.methods.base import AttributionMethod
from caap.metrics.base import AttributionMetric
from caap.models.vit import ViTClassifier

log = logging.getLogger(__name__)
TARGETS = ("label", "pred")


class AttributionModule(L.LightningModule):
    """Runs `method` on every test batch and updates `metrics`.

    Targets: `label` explains every class present in an image (one map per image and class, from the multi-hot
    `target`), `pred` the model's top class. Each test step returns `{"batch": AttributionBatch}` for the
    callbacks (map writer, media). At the end of the epoch the metrics are computed across ranks into
    `self.results` (`{name: value}`) and `self.per_sample` (`{name: (index [M], class [M], value [M])}`).
    Run with `Trainer(inference_mode=False)`: gradient methods need autograd.
    """

    def __init__(
        self,
        model: ViTClassifier,
        method: AttributionMethod,
        metrics: dict[str, AttributionMetric],
        target: str = "label",
    ) -> None:
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target='{target}' is not supported; allowed: {list(TARGETS)}")
        self.model = model
        self.method = method
        self.metrics = nn.ModuleDict(metrics)
        self.target = target
        self.results: dict[str, float] = {}
        self.per_sample: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.curves: dict[str, tuple[Tensor, Tensor]] = {}  # curve metrics: (x [K], mean curve [K])
        self.num_maps = 0
        self.model.requires_grad_(False)  # gradients flow to inputs only; parameters never need them
        # maps of a resumed run, `{(index, class): [gh, gw]}`: those pairs are read, not recomputed (caap.resume)
        self.stored_maps: dict[tuple[int, int], Tensor] = {}
        for metric in metrics.values():  # metrics that re-run the method (sanity checks) get the run's method
            if getattr(metric, "requires_method", False) and getattr(metric, "method", None) is None:
                metric.method = method

    def compute_maps(self, images: Tensor, classes: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Maps `[P, gh, gw]` of `images [P, 3, H, W]` for `classes [P]`, and which were stored `[P]` (bool).

        Pairs `(index, class)` found in `stored_maps` are read from there; the method runs on the others only.
        """
        if not self.stored_maps:  # not resuming: no host round-trip for the keys
            return self.method(self.model, images, classes), torch.zeros(
                len(classes), dtype=torch.bool, device=images.device
            )
        keys = list(zip(index.tolist(), classes.tolist(), strict=True))
        stored = torch.tensor([k in self.stored_maps for k in keys], dtype=torch.bool, device=images.device)
        if not stored.any():
            return self.method(self.model, images, classes), stored
        first = self.stored_maps[keys[int(stored.nonzero()[0])]]
        maps = torch.empty(len(keys), *first.shape, dtype=torch.float32, device=images.device)
        rows = stored.nonzero().flatten().tolist()
        maps[stored] = torch.stack([self.stored_maps[keys[r]] for r in rows]).to(maps.device)
        if not stored.all():
            todo = ~stored
            maps[todo] = self.method(self.model, images[todo], classes[todo]).float()
        return maps, stored

    def select_targets(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """`(rows [P], classes [P])`: which image of the batch each map explains, and for which class."""
        images = batch["image"]
        if self.target == "pred":
            with torch.no_grad():
                classes = self.model(images).argmax(-1)
            return torch.arange(images.shape[0], device=images.device), classes
        labels = batch.get("target")
        if labels is None or labels.ndim != 2 or labels.shape[1] == 0:
            raise ValueError(
                "target=label needs labelled data, but this dataset has no labels; use target=pred"
            )
        rows, classes = (labels > 0).nonzero(as_tuple=True)
        return rows, classes

    def test_step(self, batch: dict[str, Any] | None, batch_idx: int) -> dict[str, AttributionBatch] | None:
        if batch is None:  # every sample of the batch was unreadable (already logged by the collate function)
            return None
        rows, classes = self.select_targets(batch)
        if rows.numel() == 0:
            return None
        images = batch["image"][rows]
        index = torch.as_tensor(batch["index"], device=images.device)[rows]
        maps, stored = self.compute_maps(images, classes, index)
        masks = batch.get("masks") or {}
        attribution = AttributionBatch(
            images=images,
            maps=maps.float(),
            classes=classes,
            index=index,
            labels=batch["target"][rows] if batch.get("target") is not None else None,
            cell_masks=masks["cell"][rows] if "cell" in masks else None,
            item_masks=masks["item"][rows] if "item" in masks else None,
            segmentation=batch["segmentation"][rows] if batch.get("segmentation") is not None else None,
        )
        with torch.no_grad():
            for metric in self.metrics.values():
                metric.update(attribution, self.model)
        self.num_maps += len(attribution)
        return {"batch": attribution, "stored": stored}

    def on_test_epoch_end(self) -> None:
        for name, metric in self.metrics.items():
            self.results[name] = float(metric.compute())
            with metric.sync_context():
                self.per_sample[name] = metric.per_sample()
                for key, value in getattr(metric, "extra_per_sample", dict)().items():
                    self.per_sample[f"{name}/{key}"] = value
                for key, value in getattr(metric, "extra_results", dict)().items():
                    self.results[f"{name}/{key}"] = float(value)
            if callable(getattr(metric, "curve", None)):  # a collective call: every rank makes it
                self.curves[name] = metric.curve()
        if self.results:
            self.log_dict({f"test/{k}": v for k, v in self.results.items()}, sync_dist=False)
