"""`collate_skip_none`: batch dict samples, dropping the None a dataset returns for an unreadable file."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch.utils.data import default_collate

log = logging.getLogger(__name__)


def collate_skip_none(samples: Sequence[Any | None]) -> Any | None:
    """Collate the non-None samples with torch's `default_collate`; None when every sample was None.

    For dict samples `{image [3, H, W], target [C], index int, masks {"cell", "item": [C, H, W]}, path str}` the
    batch is `{image [B, 3, H, W], target [B, C], index [B] long, masks {"cell", "item": [B, C, H, W]},
    path list[str]}` with B the number of samples kept. Skipped samples are logged as a warning.
    """
    kept = [s for s in samples if s is not None]
    skipped = len(samples) - len(kept)
    if skipped:
        log.warning("collate_skip_none: skipped %d of %d samples (unreadable)", skipped, len(samples))
    if not kept:
        return None
    return default_collate(kept)
