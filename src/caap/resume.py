"""Resuming a killed run (`resume=PATH`): skip a finished run, and inside an unfinished one the written maps.

What a run leaves on disk when it is killed (see `caap.run`): `config.yaml` (written first), `maps/` with one
safetensors file per finished batch (written atomically, see `caap.maps_io`), and no `metrics.json` with
`"finished": true` (written last). So on `resume=PATH`:

* a folder whose `metrics.json` says finished is a finished job: its metrics are returned, nothing is run;
* otherwise the stored maps are loaded and the run goes over every image again, computing maps only for
  the (image, class) pairs without one; metrics are computed from all maps (stored ones included), in the
  same batches as an uninterrupted run, so the metrics and `per_image.csv` equal the uninterrupted ones;
  new maps go to files with a fresh prefix (`resume1_r0_b000003.safetensors`), so nothing is overwritten
  and no map is written twice.

`resume=` must name a folder written before (`check_resume_folder`): a run folder (its `config.yaml`) or a
sweep folder (Hydra's `multirun.yaml`; a job of it that never started starts in its own subfolder). A missing
path, usually a typo, is refused rather than started as a new run. A folder written with a different config
(other than where and how it runs), finished or not, is refused with the keys that differ, so that maps of
another method or model never mix into the results and a finished run never answers for another config.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from caap.maps_io import load_maps

#: Config keys that may change between a killed run and its continuation (where and how it runs, not what
#: it computes). `datamodule` only interpolates `data.*`, which is compared.
MAY_DIFFER = (
    "output_dir", "resume", "logger", "trainer", "callbacks", "media_images", "data.num_workers", "datamodule",
)  # fmt: skip
FINISHED_KEY = "finished"
#: What a folder written by caap holds from its start: a run's composed config, a sweep's Hydra record.
RUN_CONFIG, SWEEP_CONFIG = "config.yaml", "multirun.yaml"
FOLDER_CONTENT = (
    f"a run folder holds the {RUN_CONFIG} its run writes when it starts (maps/ as it runs, metrics.json once "
    f"finished); a sweep folder holds Hydra's {SWEEP_CONFIG}"
)


def check_resume_arguments(arguments: Sequence[str]) -> None:
    """`check_resume_folder` on a `resume=PATH` command-line override, if any: `python -m caap` calls it before
    Hydra creates the run folder, so that a mistyped path is refused rather than started as a new run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [a for a in arguments if re.match(r"\+{0,2}resume=", a)]
    for override in OverridesParser.create().parse_overrides(given):
        value = override.value()
        if isinstance(value, str) and value:
            check_resume_folder(value)


def check_resume_folder(resume: str | Path) -> None:
    """Refuse a `resume=` path that is not a run or sweep folder written before (FileNotFoundError when it
    does not exist, ValueError when it holds neither a run's config.yaml nor a sweep's multirun.yaml)."""
    path = Path(resume)
    start_new = (
        f"To start a new run in that folder, give hydra.run.dir={path} (hydra.sweep.dir= with -m) instead."
    )
    if not path.exists():
        raise FileNotFoundError(
            f"resume={path} does not exist. resume= continues a run or sweep started earlier: {FOLDER_CONTENT}. "
            f"{start_new}"
        )
    if not any((path / name).is_file() for name in (RUN_CONFIG, SWEEP_CONFIG)):
        raise ValueError(
            f"resume={path} holds no caap run or sweep: {FOLDER_CONTENT} (a run killed before writing its "
            f"{RUN_CONFIG} has nothing to resume). {start_new}"
        )


def finished_metrics(output_dir: str | Path) -> dict[str, Any] | None:
    """The `metrics.json` payload of a finished run in `output_dir`, or None when it did not finish."""
    path = Path(output_dir) / "metrics.json"
    try:
        written = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return written if written.get(FINISHED_KEY) else None


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_differences(stored: dict[Any, Any], current: dict[Any, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, ignoring `MAY_DIFFER` keys."""
    a, b = _flatten(stored), _flatten(current)

    def ignored(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in MAY_DIFFER)

    return sorted(k for k in set(a) | set(b) if not ignored(k) and a.get(k) != b.get(k))


def check_same_config(output_dir: str | Path, cfg: DictConfig) -> None:
    """Raise a ValueError naming the differing keys when `output_dir` holds a run of another config."""
    path = Path(output_dir) / RUN_CONFIG
    if not path.exists():
        return
    stored = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    current = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(stored, dict) and isinstance(current, dict)
    differ = config_differences(stored, current)
    if differ:
        shown = ", ".join(
            f"{k}: {_flatten(stored).get(k)!r} -> {_flatten(current).get(k)!r}" for k in differ[:8]
        )
        raise ValueError(
            f"resume={output_dir} holds a run of a different config ({shown}); resume it with the same "
            f"overrides, or start a new run without resume="
        )


def stored_maps(output_dir: str | Path) -> dict[tuple[int, int], Tensor]:
    """Maps already written in `output_dir/maps` as `{(index, class): [gh, gw]}` (empty for a new run)."""
    folder = Path(output_dir) / "maps"
    return load_maps(folder) if folder.is_dir() else {}


def session_prefix(output_dir: str | Path) -> str:
    """File-name prefix of the maps written by this continuation: `resume{n}_`, n one more than any before."""
    folder = Path(output_dir) / "maps"
    seen = [int(m.group(1)) for f in folder.glob("resume*_*") if (m := re.match(r"resume(\d+)_", f.name))]
    return f"resume{max(seen, default=0) + 1}_"


def previous_wandb_id(output_dir: str | Path) -> str | None:
    """The id of the W&B run a killed run started (`wandb/offline-run-<time>-<id>`), to continue it."""
    runs = sorted((Path(output_dir) / "wandb").glob("*-run-*-*"))
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None
