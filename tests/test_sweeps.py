"""Sweeps: launcher configs (parallel, SLURM, submitit local), job counting and naming, W&B groups per sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from caap.config import register_schemas
from caap.paths import CONF_DIR, REPO_ROOT
from caap.run import evaluate
from caap.sweep import (
    JobProgress,
    count_jobs,
    job_label,
    job_overrides,
    method_choice,
    read_sweep_size,
    sweep_group,
    sweep_id,
    write_sweep_size,
)
from test_run import read_wandb_records


def compose_hydra(*overrides: str) -> DictConfig:
    """The composed config with its `hydra` node (launcher, sweep folders), as a multirun job sees it."""
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_parallel_launcher_is_joblib_with_two_jobs() -> None:
    launcher = compose_hydra("hydra/launcher=parallel").hydra.launcher
    assert launcher._target_.endswith("joblib_launcher.JoblibLauncher")
    assert launcher.n_jobs == 2


def test_slurm_launcher_defaults_and_partition_from_env(monkeypatch) -> None:
    monkeypatch.delenv("SLURM_PARTITION", raising=False)
    monkeypatch.setenv("CAAP_SLURM_PARTITION", "gpu-a100")
    launcher = compose_hydra("hydra/launcher=slurm").hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu-a100"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.cpus_per_task == 8 and launcher.mem_gb == 64 and launcher.timeout_min == 240
    # inside an allocation SLURM_PARTITION is the fallback; with neither, the cluster's default (no --partition)
    monkeypatch.delenv("CAAP_SLURM_PARTITION")
    monkeypatch.setenv("SLURM_PARTITION", "batch")
    assert compose_hydra("hydra/launcher=slurm").hydra.launcher.partition == "batch"
    monkeypatch.delenv("SLURM_PARTITION")
    assert compose_hydra("hydra/launcher=slurm").hydra.launcher.partition is None
    # every default can be changed on the command line
    gpus = compose_hydra("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4").hydra.launcher
    assert gpus.gpus_per_node == 4


def test_submitit_local_launcher_composes() -> None:
    cfg = compose_hydra("hydra/launcher=submitit_local", "hydra.sweep.dir=/tmp/sweep")
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert cfg.hydra.launcher.submitit_folder == "/tmp/sweep/.submitit/%j"


def test_count_jobs_is_the_product_of_the_sweeps() -> None:
    assert count_jobs(["a=1,2", "b=x,y,z", "c=5"]) == 6
    assert count_jobs(["method=caap"]) == 1
    assert count_jobs(["a=range(0,4)"]) == 4
    assert count_jobs([]) == 1


def _as_multirun_job(cfg: DictConfig, sweep_dir: Path, num: int, overrides: list[str]) -> DictConfig:
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.num = num
        cfg.hydra.sweep.dir = str(sweep_dir)
        cfg.hydra.overrides.task = overrides
        cfg.hydra.job.override_dirname = ",".join(o for o in overrides if not o.startswith("logger"))
    return cfg


def test_job_identity_and_label(tmp_path) -> None:
    overrides = ["method=random", "layers.start=1", "logger=wandb", "resume=x"]
    sweep_dir = tmp_path / "outputs" / "multirun" / "2026-11-27" / "03-15-00"
    cfg = _as_multirun_job(compose_hydra(*overrides), sweep_dir, 2, overrides)
    assert job_overrides(cfg.hydra) == {"method": "random", "layers.start": 1}
    assert sweep_group(cfg.hydra) == f"2026-11-27/03-15-00-{sweep_id(sweep_dir)}"
    assert method_choice(cfg.hydra) == "random"
    assert job_label(cfg.hydra) == "[job 3/?] method=random layers.start=1 logger=wandb resume=x"
    write_sweep_size(sweep_dir, 4)
    assert job_label(cfg.hydra).startswith("[job 3/4] ")
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.RUN
    assert sweep_group(cfg.hydra) is None and job_label(cfg.hydra) == ""


def test_sweep_groups_are_unique_per_sweep_and_shared_by_its_jobs(tmp_path) -> None:
    """Two sweeps into folders of the same name, or into the same folder one after the other, get different
    W&B groups; every job of one sweep (and its resumption) gets the same one; the job count is kept."""
    overrides = ["method=random"]
    progress = JobProgress()

    def start(sweep_dir: Path, *extra: str) -> DictConfig:
        cfg = compose_hydra(*overrides, *extra, f"hydra.sweep.dir={sweep_dir}")
        progress.on_multirun_start(cfg)
        return cfg

    def group(sweep_dir: Path, num: int) -> str | None:
        return sweep_group(_as_multirun_job(compose_hydra(*overrides), sweep_dir, num, overrides).hydra)

    first, second = tmp_path / "a" / "multirun" / "sweep", tmp_path / "b" / "multirun" / "sweep"
    start(first)
    start(second)
    assert group(first, 0) == group(first, 1) and group(first, 0).startswith("sweep-")
    assert group(first, 0) != group(second, 0)
    assert read_sweep_size(first) == 1
    before = group(first, 0)
    write_sweep_size(first, 5)  # a sweeper that counts its own jobs keeps the id
    assert group(first, 0) == before and read_sweep_size(first) == 5
    start(first, f"resume={first}")  # resume= continues the sweep: the same group
    assert group(first, 0) == before
    start(first)  # the same folder again without resume=: a new sweep, a new group
    assert group(first, 0) != before


def test_method_choice_is_the_method_option() -> None:
    cfg = compose_hydra("method=libragrad_fullgrad_plus")
    assert method_choice(cfg.hydra) == "libragrad_fullgrad_plus"
    assert method_choice() is None  # outside a Hydra app (the run falls back to the method's name)


def _wandb_identity(run_folder: Path) -> tuple[str, str, dict]:
    """(group, name, config) of the offline W&B run in `run_folder/wandb`."""
    (run_dir,) = (run_folder / "wandb").glob("offline-run-*")
    records = read_wandb_records(run_dir)
    (run,) = [r.run for r in records if r.HasField("run")]
    config = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.HasField("config")
        for item in r.config.update
    }
    config.update({item.key: json.loads(item.value_json) for item in run.config.update})
    return run.run_group, run.display_name, config


def test_multirun_job_is_a_wandb_run_in_the_sweep_group(tmp_path) -> None:
    overrides = [
        "data=synthetic",
        "data.limit=2",
        "model.pretrained=false",
        "method=random",
        "metric=localisation",
        "media_images=0",
    ]
    sweep_dir = tmp_path / "multirun" / "my-sweep"
    out = sweep_dir / "0_run"
    cfg = _as_multirun_job(compose_hydra(*overrides, f"output_dir={out}"), sweep_dir, 0, overrides)
    write_sweep_size(sweep_dir, 2)
    HydraConfig.instance().set_config(cfg)
    try:
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        evaluate(task)
    finally:
        HydraConfig.instance().cfg = None
    group, name, config = _wandb_identity(out)
    assert group == f"my-sweep-{sweep_id(sweep_dir)}"
    assert name == ",".join(overrides)
    assert config["overrides"] == {
        "data": "synthetic",
        "data.limit": 2,
        "model.pretrained": False,
        "method": "random",
        "metric": "localisation",
        "media_images": 0,
    }
    assert config["sweep"] == {"group": group, "job": 1, "num_jobs": 2}
    assert (config["method_name"], config["layer_range"]) == ("random", None)
    assert config["method"]["_target_"] == "caap.methods.RandomAttribution"


@pytest.mark.slow
def test_two_job_sweep_through_submitit_local(tmp_path) -> None:
    """`-m hydra/launcher=submitit_local`: two jobs in subprocesses, each a W&B run of the sweep's group."""
    sweep_dir = tmp_path / "multirun" / "two"
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    args = [
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep_dir}",
        "data=synthetic",
        "data.limit=2",
        "model.pretrained=false",
        "metric=localisation",
        "media_images=0",
        "method=random,gradient",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "caap", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((sweep_dir / "sweep.json").read_text()) == {"num_jobs": 2}
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"]
    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*_log.out"))
    for k, method in ((1, "random"), (2, "gradient")):
        assert f"[job {k}/2] " in logs and f"method={method}" in logs
    names = set()
    for job in jobs:
        written = json.loads((job / "metrics.json").read_text())
        assert "grid_pointing" in written["metrics"] and written["finished"]
        group, name, config = _wandb_identity(job)
        assert group == f"two-{sweep_id(sweep_dir)}"
        assert job.name.split("_", 1)[1] == name  # the W&B name is the job folder's override_dirname
        names.add(config["overrides"]["method"])
    assert names == {"random", "gradient"}
