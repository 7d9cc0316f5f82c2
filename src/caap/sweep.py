"""Sweeps: which job of how many is running, and each job's identity (W&B group, name, overrides).

Hydra's launchers (basic, `hydra/launcher=parallel` (joblib), `slurm` and `submitit_local` (submitit)) run each
job of a multirun in this process or in another one; `JobProgress` (a Hydra callback, see conf/config.yaml)
counts the jobs once when the multirun starts, stores the count in the sweep folder (`sweep.json`) so that jobs
in other processes or on other nodes read it, and prints `[job k/N] overrides` when each job starts.
A sweeper that expands its own values (e.g. a generated layer sweep) calls `write_sweep_size` before its first batch
(which runs after `on_multirun_start`) to give the true count.

`sweep.json` also holds the sweep's `id`, drawn once when the multirun starts (kept when `resume=` continues
it): the W&B group is the sweep folder plus that id, so two sweeps into folders of the same name (or the same
folder twice) never share a group, while every job of one sweep, in any process or node, joins the same one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, cast

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
#: Keys that never name a job (where and how it runs, not what it computes); same as conf/config.yaml's
#: hydra.job.config.override_dirname.exclude_keys plus `resume`.
NON_IDENTITY_KEYS = ("trainer", "logger", "debug", "output_dir", "resume")


def count_jobs(overrides: list[str]) -> int:
    """The number of jobs of the basic sweeper's Cartesian product over `overrides` (`a=1,2 b=x,y,z` -> 6)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = OverridesParser.create().parse_overrides(overrides)
    (batch,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return len(batch)


def read_sweep_file(sweep_dir: str | Path) -> dict[str, Any]:
    """The contents of `sweep_dir/sweep.json` (`num_jobs`, `id`), {} when absent or unreadable."""
    try:
        written = json.loads((Path(sweep_dir) / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return written if isinstance(written, dict) else {}


def update_sweep_file(sweep_dir: str | Path, **entries: Any) -> None:
    """Set `entries` in `sweep_dir/sweep.json`, keeping its other entries."""
    folder = Path(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SWEEP_FILE).write_text(json.dumps({**read_sweep_file(folder), **entries}))


def write_sweep_size(sweep_dir: str | Path, num_jobs: int) -> None:
    """Record the number of jobs of the sweep in `sweep_dir/sweep.json` (read by every job)."""
    update_sweep_file(sweep_dir, num_jobs=int(num_jobs))


def read_sweep_size(sweep_dir: str | Path) -> int | None:
    """The number of jobs recorded by `write_sweep_size`, or None when unknown."""
    try:
        return int(read_sweep_file(sweep_dir)["num_jobs"])
    except (KeyError, TypeError, ValueError):
        return None


def start_sweep_id(sweep_dir: str | Path, resuming: bool = False) -> str:
    """Draw the sweep's id (8 hex digits of a hash of the folder's absolute path and the time) into
    sweep.json; a resumed sweep keeps the id it has. Returns the id."""
    if resuming and (kept := read_sweep_file(sweep_dir).get("id")):
        return str(kept)
    seed = f"{Path(sweep_dir).resolve()}|{time.time_ns()}"
    new = hashlib.sha1(seed.encode()).hexdigest()[:8]
    update_sweep_file(sweep_dir, id=new)
    return new


def sweep_id(sweep_dir: str | Path) -> str:
    """The sweep's id from sweep.json, else (a multirun started without `JobProgress`) 8 hex digits of a hash
    of the folder's absolute path."""
    written = read_sweep_file(sweep_dir).get("id")
    return str(written) if written else hashlib.sha1(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:8]


def job_overrides(hydra_cfg: DictConfig | None = None) -> dict[str, Any]:
    """The job's command-line overrides as `{key: value}` (values parsed: `layers.start=2` -> 2), without the
    keys that only say where or how it runs (`NON_IDENTITY_KEYS`)."""
    hydra_cfg = hydra_cfg if hydra_cfg is not None else _hydra_or_none()
    if hydra_cfg is None:
        return {}
    parsed = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    out: dict[str, Any] = {}
    for override in parsed:
        key = override.get_key_element()
        if key.split("@")[0].split(".")[0].lstrip("+~") in NON_IDENTITY_KEYS:
            continue
        value = override.value()
        out[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return out


def sweep_group(hydra_cfg: DictConfig | None = None) -> str | None:
    """The W&B group of a multirun job, unique per sweep: its sweep folder relative to `outputs/multirun` when
    under it (else the folder's name), a dash and the sweep's id (`2026-11-27/03-15-00-1a2b3c4d`, see
    `sweep_id`); None outside a multirun."""
    hydra_cfg = hydra_cfg if hydra_cfg is not None else _hydra_or_none()
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(str(hydra_cfg.sweep.dir))
    parts = sweep_dir.parts
    readable = sweep_dir.name
    if "multirun" in parts:
        rest = parts[len(parts) - parts[::-1].index("multirun") :]
        readable = "/".join(rest) or readable
    return f"{readable}-{sweep_id(sweep_dir)}"


def method_choice(hydra_cfg: DictConfig | None = None) -> str | None:
    """The job's `method=` option (`caap`, `libragrad_fullgrad_plus`), None outside a Hydra app."""
    hydra_cfg = hydra_cfg if hydra_cfg is not None else _hydra_or_none()
    if hydra_cfg is None:
        return None
    choice = (hydra_cfg.runtime.get("choices") or {}).get("method")
    return None if choice is None else str(choice)


def job_position(hydra_cfg: DictConfig | None = None) -> tuple[int, int | None] | None:
    """`(k, N)`: the 1-based number of this multirun job and the sweep's job count (None when unknown)."""
    hydra_cfg = hydra_cfg if hydra_cfg is not None else _hydra_or_none()
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return int(hydra_cfg.job.num) + 1, read_sweep_size(hydra_cfg.sweep.dir)


def job_label(hydra_cfg: DictConfig | None = None) -> str:
    """`[job k/N] overrides` for a multirun job (`[job k]` when N is unknown), '' otherwise."""
    hydra_cfg = hydra_cfg if hydra_cfg is not None else _hydra_or_none()
    position = job_position(hydra_cfg)
    if position is None or hydra_cfg is None:
        return ""
    k, n = position
    overrides = " ".join(str(o) for o in hydra_cfg.overrides.task) or "(no overrides)"
    return f"[job {k}/{n if n is not None else '?'}] {overrides}"


def _hydra_or_none() -> DictConfig | None:
    try:
        return cast(DictConfig, HydraConfig.get())  # hydra annotates its dataclass; the value is a DictConfig
    except ValueError:  # not inside a Hydra app (tests composing configs, notebooks)
        return None


class JobProgress(Callback):
    """Hydra callback: draws the sweep's id and counts its jobs (`sweep.json`), prints `[job k/N] overrides`
    when each job starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        start_sweep_id(config.hydra.sweep.dir, resuming=bool(config.get("resume")))
        overrides = list(config.hydra.overrides.task)
        params = config.hydra.sweeper.get("params") or {}
        overrides = [f"{k}={v}" for k, v in params.items()] + overrides
        try:
            num_jobs = count_jobs(overrides)
        except Exception as err:  # e.g. a sweeper-specific syntax: the sweeper may write the count itself
            log.debug("could not count the jobs of %s: %s", overrides, err)
            return
        # a sweeper that generates jobs (the caap sweeper's layers=all_pairs) overwrites it with the true count
        write_sweep_size(config.hydra.sweep.dir, num_jobs)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        label = job_label(config.hydra)
        if label:
            print(label, flush=True)
