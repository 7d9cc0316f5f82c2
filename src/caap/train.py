"""`python -m caap.train`: the Lightning recipe that trains the FashionGrid ViT multi-label and exports it.

Trains `vit_fashiongrid_patch7_56` on FashionGrid train grids with binary cross-entropy, validates on the val
split, measures mAP (macro average precision over the 10 classes) on the test split, and writes the weights as
safetensors with a model card JSON (config, epochs, seed, test mAP, per-class AP). With `export=true` the two
files replace the ones shipped in `caap/assets/`. Config: conf/train.yaml.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.classification import MultilabelAveragePrecision

from caap.data import FashionGrid
from caap.models import build_model
from caap.models.fashiongrid import FASHIONGRID_CARD, FASHIONGRID_MODEL, FASHIONGRID_WEIGHTS
from caap.paths import CONF_DIR

log = logging.getLogger(__name__)


class MultiLabelTrainer(L.LightningModule):
    """BCE training of a `ViTClassifier` on multi-hot targets, AdamW with linear warm-up and cosine decay."""

    def __init__(
        self, model: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int
    ):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.val_ap = MultilabelAveragePrecision(num_labels=model.num_classes, average="macro")
        self.test_ap = MultilabelAveragePrecision(num_labels=model.num_classes, average=None)

    def training_step(self, batch: dict, _: int) -> Tensor:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            self.model(batch["image"]), batch["target"]
        )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, _: int) -> None:
        self.val_ap.update(self.model(batch["image"]).sigmoid(), batch["target"].long())
        self.log("val/mAP", self.val_ap, prog_bar=True)

    def test_step(self, batch: dict, _: int) -> None:
        self.test_ap.update(self.model(batch["image"]).sigmoid(), batch["target"].long())

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim <= 1 or "pos_embed" in n]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )

        def schedule(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train(cfg: DictConfig) -> dict:
    """Train, test and export the FashionGrid model; returns the model card as a dict."""
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(cfg.threads) if cfg.threads else None
    model = build_model(name=FASHIONGRID_MODEL, pretrained=False, multilabel=True)
    grids = dict(root=cfg.data_root, seed=cfg.seed)
    loaders = {
        split: DataLoader(
            FashionGrid(split=split, size=cfg[f"{split}_size"], **grids),
            batch_size=cfg.batch_size,
            shuffle=split == "train",
            num_workers=cfg.num_workers,
            persistent_workers=cfg.num_workers > 0,
        )
        for split in ("train", "val", "test")
    }
    total_steps = cfg.epochs * len(loaders["train"])
    module = MultiLabelTrainer(
        model, cfg.lr, cfg.weight_decay, int(cfg.warmup_frac * total_steps), total_steps
    )
    out = Path(cfg.output_dir)
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator="auto",
        devices=1,
        precision=cfg.precision,
        default_root_dir=out,
        val_check_interval=cfg.val_check_interval,
        logger=L.pytorch.loggers.CSVLogger(out, name="train"),
        enable_checkpointing=False,
        gradient_clip_val=1.0,
    )
    model.train()  # build_model returns eval mode; Lightning keeps each module's mode as it finds it
    trainer.fit(module, loaders["train"], loaders["val"])
    model.eval()
    trainer.test(module, loaders["test"])
    per_class = module.test_ap.compute().tolist()
    classes = list(FashionGrid.classes)
    card = {
        "model": FASHIONGRID_MODEL,
        "task": "multi-label classification of FashionGrid 2x2 grids (sigmoid outputs)",
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "train_grids_per_epoch": cfg.train_size,
        "test_grids": cfg.test_size,
        "test_mAP": sum(per_class) / len(per_class),
        "test_AP_per_class": dict(zip(classes, per_class, strict=True)),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "architecture": model.model.pretrained_cfg.get("architecture", FASHIONGRID_MODEL),
    }
    weights = {k: v.detach().cpu().contiguous() for k, v in model.model.state_dict().items()}
    save_file(weights, out / FASHIONGRID_WEIGHTS.name, metadata={"format": "pt"})
    (out / FASHIONGRID_CARD.name).write_text(json.dumps(card, indent=2))
    if cfg.export:
        save_file(weights, FASHIONGRID_WEIGHTS, metadata={"format": "pt"})
        FASHIONGRID_CARD.write_text(json.dumps(card, indent=2))
        log.info("exported weights to %s", FASHIONGRID_WEIGHTS)
    log.info("test mAP %.4f per class %s", card["test_mAP"], card["test_AP_per_class"])
    return card


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
