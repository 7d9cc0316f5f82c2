"""Sweeps: which job of how many is running, and each job's identity (W&B group, name, overrides).

Hydra's launchers (basic, `hydra/launcher=parallel` (joblib), `slurm` and `submitit_local` (submitit)) run each
job of a multirun in this process or in another one; `JobProgress` (a Hydra callback, see conf/config.yaml)
counts the jobs once when the multirun starts, stores the count in the sweep folder (`sweep.json`) so that jobs
in other processes or on other nodes read it, and prints `[job k/N] overrides` when each job starts.
A sweeper that expands its own values (e.g. a generated layer sweep) calls `write_sweep_size` before its first batch
(which runs after `on_multirun_start`) to give the true count.
"""

from __future__ import annotations

import json
import logging
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


def write_sweep_size(sweep_dir: str | Path, num_jobs: int) -> None:
    """Record the number of jobs of the sweep in `sweep_dir/sweep.json` (read by every job)."""
    folder = Path(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SWEEP_FILE).write_text(json.dumps({"num_jobs": int(num_jobs)}))


def read_sweep_size(sweep_dir: str | Path) -> int | None:
    """The number of jobs recorded by `write_sweep_size`, or None when unknown."""
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        return int(json.loads(path.read_text())["num_jobs"])
    except (OSError, ValueError, KeyError):
        return None


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
    """The W&B group of a multirun job: its sweep folder relative to `outputs/multirun` when under it
    (`2026-11-27/03-15-00`), else the folder's name; None outside a multirun."""
    hydra_cfg = hydra_cfg if hydra_cfg is not None else _hydra_or_none()
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(str(hydra_cfg.sweep.dir))
    parts = sweep_dir.parts
    if "multirun" in parts:
        rest = parts[len(parts) - parts[::-1].index("multirun") :]
        if rest:
            return "/".join(rest)
    return sweep_dir.name


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
    """Hydra callback: counts the jobs of a multirun (`sweep.json`) and prints `[job k/N] overrides` per job."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
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
