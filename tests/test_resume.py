"""`resume=PATH`: a killed run continues where it stopped and ends equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caap.maps_io import load_maps
from caap.paths import REPO_ROOT
from caap.resume import config_differences, session_prefix
from caap.run import evaluate

COMMON = [
    "data=synthetic",
    "data.limit=6",
    "data.batch_size=2",
    "model=test_vit",
    "method=gradient",  # deterministic: a resumed run must reproduce the same maps
    "metric=localisation",  # per-image values without model passes (fast); the slow test uses deletion too
    "logger=csv",
    "media_images=0",
]


def keys_per_file(folder: Path) -> list[tuple[int, int]]:
    """Every (index, class) key of every map file, repeats included."""
    return [tuple(map(int, k.split("_"))) for f in folder.glob("*.safetensors") for k in load_file(str(f))]


def assert_same_results(resumed: Path, whole: Path) -> None:
    maps, reference = load_maps(resumed / "maps"), load_maps(whole / "maps")
    assert set(maps) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(maps[key], value, rtol=0, atol=0)
    keys = keys_per_file(resumed / "maps")
    assert len(keys) == len(set(keys)), "a map was written twice"
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (resumed, whole))
    assert got["metrics"] == want["metrics"] and got["num_maps"] == want["num_maps"]
    assert got["finished"] is True
    assert (resumed / "per_image.csv").read_text() == (whole / "per_image.csv").read_text()


def test_killed_run_resumes_to_the_uninterrupted_result(compose_cfg, tmp_path) -> None:
    whole = tmp_path / "whole"
    evaluate(compose_cfg(*COMMON, f"output_dir={whole}"))
    files = sorted((whole / "maps").glob("*.safetensors"))
    assert len(files) == 3
    # what a run killed during its third batch leaves: the config and the maps of the first two batches
    killed = tmp_path / "killed"
    (killed / "maps").mkdir(parents=True)
    shutil.copy(whole / "config.yaml", killed / "config.yaml")
    for f in files[:2]:
        shutil.copy(f, killed / "maps" / f.name)
    results = evaluate(compose_cfg(*COMMON, f"output_dir={killed}", f"resume={killed}"))
    assert_same_results(killed, whole)
    stored = sum(len(load_file(str(f))) for f in files[:2])
    assert json.loads((killed / "metrics.json").read_text())["resumed_maps"] == stored
    new_files = sorted(p.name for p in (killed / "maps").glob("resume1_*"))
    assert new_files == ["resume1_r0_b000002.safetensors"]  # only the missing batch was computed
    assert session_prefix(killed) == "resume2_"
    assert results == json.loads((whole / "metrics.json").read_text())["metrics"]


def test_finished_run_is_skipped(compose_cfg, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    first = evaluate(compose_cfg(*COMMON, f"output_dir={out}"))
    stamp = (out / "metrics.json").stat().st_mtime_ns
    again = evaluate(compose_cfg(*COMMON, f"output_dir={out}", f"resume={out}"))
    assert again == first
    assert (out / "metrics.json").stat().st_mtime_ns == stamp
    assert "finished earlier, skipped" in capsys.readouterr().out


def test_resume_refuses_a_run_of_another_config(compose_cfg, tmp_path) -> None:
    out = tmp_path / "run"
    (out / "maps").mkdir(parents=True)
    evaluate(compose_cfg(*COMMON, f"output_dir={out}"))
    (out / "metrics.json").unlink()  # killed before the end
    with pytest.raises(ValueError, match=r"method\._target_"):
        evaluate(compose_cfg(*COMMON, "method=input_x_gradient", f"output_dir={out}", f"resume={out}"))


def test_config_differences_ignore_where_and_how() -> None:
    a = {"method": {"start": 0}, "output_dir": "a", "trainer": {"devices": 1}, "data": {"num_workers": 0}}
    b = {"method": {"start": 1}, "output_dir": "b", "trainer": {"devices": 2}, "data": {"num_workers": 4}}
    assert config_differences(a, b) == ["method.start"]


@pytest.mark.slow
def test_real_kill_then_resume_equals_uninterrupted(compose_cfg, tmp_path) -> None:
    """`python -m caap` killed with SIGKILL after its first map file, then started again with resume=."""
    args = [*COMMON, "data.limit=24", "method=caap", "method.chunk_size=16", "metric=default"]
    whole = tmp_path / "whole"
    evaluate(compose_cfg(*args, f"output_dir={whole}"))
    run = tmp_path / "killed"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "caap", *args, f"resume={run}"]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while (
        not list((run / "maps").glob("*.safetensors")) and time.monotonic() < deadline and proc.poll() is None
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists(), "the run finished before it was killed"
    written = len(list((run / "maps").glob("*.safetensors")))
    assert 1 <= written < 12
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_results(run, whole)
    assert json.loads((run / "metrics.json").read_text())["resumed_maps"] > 0
