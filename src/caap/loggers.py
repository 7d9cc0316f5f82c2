"""`WandbLogger`: Lightning's W&B logger, minus the `anonymous=None` it always hands to `wandb.init`.

wandb deprecated the `anonymous` setting and warns whenever it is passed, even as None ("wandb: WARNING The
anonymous setting has no effect..."), so every run printed it; leaving the key out keeps wandb's default.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    """Lightning's `WandbLogger` (same arguments) without the deprecated `anonymous` key when it is unset."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # Lightning passes None unless anonymous=True
            self._wandb_init.pop("anonymous", None)
