"""`python -m caap.train`: the Lightning recipe that trains an embedded benchmark's ViT multi-label and exports it.

Trains `cfg.model` (a timm model name and keyword arguments) on `cfg.dataset` train images with binary
cross-entropy, validates on the val split, measures mAP (macro average precision over the classes) on the test
split, and writes the weights as safetensors (float16 with `half=true`, then tested again as reloaded) with a
model card JSON (config, command, epochs, seed, training time, test mAP, per-class AP). With `export=true` the
two files go to `caap/assets/` under `model.export_name`. Configs: conf/train.yaml (FashionGrid, the default)
and conf/train_fashionscenes.yaml (`python -m caap.train --config-name train_fashionscenes`).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, cast

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.classification import MultilabelAveragePrecision

from caap.models import build_model
from caap.models.embedded import ASSETS
from caap.models.vit import ViTClassifier
from caap.paths import CONF_DIR

log = logging.getLogger(__name__)


class MultiLabelTrainer(L.LightningModule):
    """BCE training of a `ViTClassifier` on multi-hot targets, AdamW with linear warm-up and cosine decay."""

    def __init__(
        self, model: ViTClassifier, lr: float, weight_decay: float, warmup_steps: int, total_steps: int
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
    """Train, test and export `cfg.model` on `cfg.dataset`; returns the model card as a dict."""
    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(cfg.threads) if cfg.threads else None
    kwargs = (
        cast(dict[str, Any], OmegaConf.to_container(cfg.model.kwargs, resolve=True))
        if cfg.model.get("kwargs")
        else None
    )
    model = build_model(name=cfg.model.name, pretrained=False, multilabel=True, kwargs=kwargs)
    datasets = {
        split: instantiate(cfg.dataset, split=split, size=cfg[f"{split}_size"], seed=cfg.seed)
        for split in ("train", "val", "test")
    }
    loaders = {
        split: DataLoader(
            data,
            batch_size=cfg.batch_size,
            shuffle=split == "train",
            num_workers=cfg.num_workers,
            persistent_workers=cfg.num_workers > 0,
            pin_memory=torch.cuda.is_available(),  # Lightning copies batches to the GPU non_blocking
        )
        for split, data in datasets.items()
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
        max_time=cfg.get("max_time"),
        logger=L.pytorch.loggers.CSVLogger(out, name="train"),
        enable_checkpointing=False,
        gradient_clip_val=1.0,
    )
    model.train()  # build_model returns eval mode; Lightning keeps each module's mode as it finds it
    started = time.perf_counter()
    trainer.fit(module, loaders["train"], loaders["val"])
    train_seconds = time.perf_counter() - started
    seen = min(cfg.epochs * cfg.train_size, trainer.global_step * cfg.batch_size)  # images trained on
    model.eval()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.model.state_dict().items()}
    card_extra = {}
    if cfg.half:  # store float16; what ships is what is tested
        card_extra["test_mAP_float32"] = measure_map(trainer, module, loaders["test"])[0]
        weights = {k: v.half() for k, v in weights.items()}
        model.model.load_state_dict({k: v.float() for k, v in weights.items()})
    test_mean, per_class = measure_map(trainer, module, loaders["test"])
    classes = list(getattr(datasets["test"], "classes", range(len(per_class))))
    name = cfg.model.export_name
    card = {
        "model": name,
        "task": cfg.task,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "train_images_per_epoch": cfg.train_size,
        "test_images": cfg.test_size,
        "test_mAP": test_mean,
        **card_extra,
        "test_AP_per_class": dict(zip(map(str, classes), per_class, strict=True)),
        "weights_dtype": "float16" if cfg.half else "float32",
        "train_seconds": round(train_seconds, 1),
        "train_steps": trainer.global_step,  # fewer than planned when max_time stopped the training
        "train_images_per_second": round(seen / train_seconds, 2),
        "device": device_description(trainer),
        "command": " ".join(["python -m caap.train", *sys.argv[1:]]),
        "config": card_config(cfg),
        "architecture": {"timm_model": cfg.model.name, **(kwargs or {})},
    }
    save_file(weights, out / f"{name}.safetensors", metadata={"format": "pt"})
    (out / f"{name}.json").write_text(json.dumps(card, indent=2))
    if cfg.export:
        save_file(weights, ASSETS / f"{name}.safetensors", metadata={"format": "pt"})
        (ASSETS / f"{name}.json").write_text(json.dumps(card, indent=2))
        log.info("exported weights to %s", ASSETS / f"{name}.safetensors")
    log.info("test mAP %.4f per class %s", card["test_mAP"], card["test_AP_per_class"])
    return card


MACHINE_KEYS = ("output_dir", "data_root")  # where this machine wrote and read: not part of the recipe


def card_config(cfg: DictConfig) -> dict[str, Any]:
    """The training config for the model card, without the paths of the machine that trained it."""
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return {str(k): v for k, v in config.items() if k not in MACHINE_KEYS}


def measure_map(
    trainer: L.Trainer, module: MultiLabelTrainer, loader: DataLoader
) -> tuple[float, list[float]]:
    """Macro mAP and per-class AP `[C]` of `module`'s model on `loader` (a fresh metric state per call)."""
    module.test_ap.reset()
    trainer.test(module, loader, verbose=False)
    per_class = module.test_ap.compute().tolist()
    return sum(per_class) / len(per_class), per_class


def device_description(trainer: L.Trainer) -> str:
    """What trained the model: the accelerator's name, or the CPU with its torch thread count."""
    root = trainer.strategy.root_device
    if root.type == "cuda":
        return torch.cuda.get_device_name(root)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
