"""The real Hydra app as a user runs it: `python -m caap ...` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from caap.paths import REPO_ROOT


def run_app(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "caap", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_app_runs_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_app(
        "data=synthetic", "data.limit=4", "model.pretrained=false", "media_images=1", f"hydra.run.dir={out}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "grid_pointing" in proc.stdout and f"outputs: {out}" in proc.stdout
    assert "wandb sync" in proc.stdout
    written = json.loads((out / "metrics.json").read_text())
    assert set(written["metrics"]) == {
        "mif",
        "lif",
        "srg",
        "grid_pointing",
        "energy_pointing",
        "class_discrimination",
    }
    assert (out / ".hydra" / "config.yaml").exists() and (out / "caap.log").exists()
    # no third-party noise, and the W&B path on one line (it is copied into `wandb sync`)
    assert "LeafSpec" not in proc.stderr and "anonymous setting" not in proc.stderr, proc.stderr[-2000:]
    wandb_dir = next((out / "wandb").glob("offline-run-*"))
    assert f"W&B run (offline): {wandb_dir}  (upload: wandb sync {wandb_dir})\n" in proc.stdout


def test_help_lists_the_option_groups_without_the_internal_schemas() -> None:
    proc = run_app("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups = proc.stdout.split("Config groups", 1)[1].split("Composed config", 1)[0]
    assert "method: attention_rollout, attnlrp, caap," in groups and "\nmodel: " in groups
    assert "schema" not in groups and "hydra" not in groups


def test_app_cfg_job_and_bad_override(tmp_path: Path) -> None:
    proc = run_app("--cfg", "job")
    assert proc.returncode == 0 and "_target_: caap.models.build_model" in proc.stdout
    bad = run_app("layers.start=abc")
    assert bad.returncode != 0
    assert "layers.start" in bad.stderr and "Integer" in bad.stderr


def test_resume_of_a_missing_folder_is_refused_before_hydra_writes_there(tmp_path: Path) -> None:
    """Hydra creates the run (or sweep) folder before the job starts: a mistyped resume= path is refused
    first, so that no folder appears there (a run and a sweep)."""
    missing = tmp_path / "typo"
    for sweep in ([], ["-m", "method=random,gradient"]):
        proc = run_app(*sweep, "data=synthetic", "model.pretrained=false", f"resume={missing}", cwd=tmp_path)
        assert proc.returncode != 0
        assert f"resume={missing} does not exist" in proc.stderr, proc.stderr[-2000:]
        assert not missing.exists()
        assert "Traceback" not in proc.stderr
