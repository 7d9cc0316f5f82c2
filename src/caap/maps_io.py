"""Reading and writing attribution maps: safetensors files keyed by dataset index and target class.

Layout of a run's `maps/` folder: one file per (rank, batch), `r{rank}_b{batch:06d}.safetensors`, each holding
tensors named `"{index}_{class}"` of shape `[gh, gw]` (float32). Under DDP several ranks write into the same
folder; `load_maps` merges them and keeps one map per key (the DDP sampler of caap never pads, but files
written by padded samplers or resumed runs may repeat keys; the first one read wins).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


def map_key(index: int, cls: int) -> str:
    """The tensor name of the map of image `index` for class `cls`."""
    return f"{int(index)}_{int(cls)}"


def parse_map_key(key: str) -> tuple[int, int]:
    """Inverse of `map_key`: `(index, class)`."""
    index, cls = key.split("_")
    return int(index), int(cls)


def write_maps(path: Path, index: Tensor, classes: Tensor, maps: Tensor) -> None:
    """Write maps `[P, gh, gw]` of images `index [P]` and classes `classes [P]` to one safetensors file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        map_key(i, c): m.detach().float().cpu().contiguous()
        for i, c, m in zip(index.tolist(), classes.tolist(), maps, strict=True)
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)  # atomic: a killed run never leaves a half-written file behind


def load_maps(folder: str | Path) -> dict[tuple[int, int], Tensor]:
    """All maps of a run's `maps/` folder as `{(index, class): [gh, gw]}`."""
    maps: dict[tuple[int, int], Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        for key, tensor in load_file(str(file)).items():
            maps.setdefault(parse_map_key(key), tensor)
    return maps


def stack_maps(maps: dict[tuple[int, int], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """`(index [M], class [M], maps [M, gh, gw])` sorted by key, from a `load_maps` dict."""
    keys = sorted(maps)
    index = torch.tensor([k[0] for k in keys], dtype=torch.long)
    classes = torch.tensor([k[1] for k in keys], dtype=torch.long)
    return index, classes, torch.stack([maps[k] for k in keys]) if keys else torch.zeros(0)
