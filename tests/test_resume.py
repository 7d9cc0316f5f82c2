"""`resume=PATH`: a killed run continues where it stopped and ends equal to an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import Tensor

from caap.maps_io import load_maps, write_maps
from caap.methods import AttributionMethod
from caap.models import ViTClassifier
from caap.paths import REPO_ROOT
from caap.resume import config_differences, session_prefix
from caap.run import evaluate

COMMON = [
    "data=synthetic",
    "data.limit=6",
    "data.batch_size=2",
    "model=test_vit",
    "model.img_size=28",
    "data.dataset.image_size=28",
    "method=gradient",  # deterministic: a resumed run must reproduce the same maps
    "metric=localisation",  # per-image values without model passes (fast); the slow test uses deletion too
    "logger=csv",
    "media_images=0",
]


def keys_of(path: Path) -> list[tuple[int, int]]:
    """The (index, class) keys of one map file."""
    return [tuple(map(int, k.split("_"))) for k in load_file(str(path))]


def keys_per_file(folder: Path) -> list[tuple[int, int]]:
    """Every (index, class) key of every map file, repeats included."""
    return [key for f in folder.glob("*.safetensors") for key in keys_of(f)]


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


class FreshMapsEveryCall(AttributionMethod):
    """A test double whose maps no two calls share: call k (numbered over every instance and run of the
    session) gives row r the patch ramp `0..n-1` rolled by `3k + r`, plus `100k`. A map read back from a stored
    file keeps the value of the call that wrote it; a recomputed one gets a new value. `calls` records
    `(k, rows)` of every call."""

    calls: ClassVar[list[tuple[int, int]]] = []

    def __init__(self, **_: object) -> None:  # the `random` config's `seed` is not used
        pass

    @staticmethod
    def expected(call: int, row: int, gh: int, gw: int) -> Tensor:
        """The map `[gh, gw]` that call number `call` gives its row `row`."""
        ramp = torch.arange(gh * gw, dtype=torch.float32).roll(3 * call + row)
        return (ramp + 100 * call).view(gh, gw)

    def attribute(self, model: ViTClassifier, images: Tensor, target: Tensor) -> Tensor:
        call = len(self.calls) + 1
        self.calls.append((call, int(images.shape[0])))
        gh, gw = model.grid_size(images)
        return torch.stack([self.expected(call, r, gh, gw) for r in range(images.shape[0])])


def per_image_rows(folder: Path) -> dict[tuple[int, int], dict[str, str]]:
    with open(folder / "per_image.csv") as fh:
        return {(int(r["index"]), int(r["class"])): r for r in csv.DictReader(fh)}


def test_resume_reads_stored_maps_back_and_computes_only_the_missing_pairs(compose_cfg, tmp_path) -> None:
    """A stored map is read, not recomputed: with maps that change on every call, the resumed run keeps the
    stored values, calls the method only for the missing pairs (a whole missing batch, and the missing rows
    of a partly stored one), places each new map on its own (index, class), and scores the stored ones."""
    args = [*COMMON, "method=random", "method._target_=test_resume.FreshMapsEveryCall"]
    before = len(FreshMapsEveryCall.calls)
    whole = tmp_path / "whole"
    evaluate(compose_cfg(*args, f"output_dir={whole}"))
    # synthetic images 0..5 hold 4, 3, 4, 3, 2, 3 classes: batches of 2 images give 7, 7 and 5 maps
    assert [rows for _, rows in FreshMapsEveryCall.calls[before:]] == [7, 7, 5]
    reference = load_maps(whole / "maps")
    batches = [sorted(k for k in reference if k[0] in pair) for pair in ((0, 1), (2, 3), (4, 5))]
    # killed during batch 2 (a partly written batch, as a run killed between two DDP ranks' files leaves):
    # batch 0 stored whole, batch 1 missing, 2 of the 5 maps of batch 2 stored
    killed = tmp_path / "killed"
    (killed / "maps").mkdir(parents=True)
    shutil.copy(whole / "config.yaml", killed / "config.yaml")
    shutil.copy(whole / "maps" / "r0_b000000.safetensors", killed / "maps" / "r0_b000000.safetensors")
    partial = [batches[2][0], batches[2][3]]
    write_maps(
        killed / "maps" / "r0_b000002.safetensors",
        torch.tensor([k[0] for k in partial]),
        torch.tensor([k[1] for k in partial]),
        torch.stack([reference[k] for k in partial]),
    )
    stored = set(batches[0]) | set(partial)

    before = len(FreshMapsEveryCall.calls)
    evaluate(compose_cfg(*args, f"output_dir={killed}", f"resume={killed}"))
    resumed_calls = FreshMapsEveryCall.calls[before:]
    assert [rows for _, rows in resumed_calls] == [7, 3]  # batch 1, then the 3 missing maps of batch 2
    maps = load_maps(killed / "maps")
    assert set(maps) == set(reference)
    for key in stored:
        torch.testing.assert_close(maps[key], reference[key], rtol=0, atol=0)
    # the new maps, in batch order (rows of the image-major (index, class) order within a batch)
    missing = [*batches[1], *(k for k in batches[2] if k not in stored)]
    calls = [resumed_calls[0][0]] * 7 + [resumed_calls[1][0]] * 3
    rows = [*range(7), *range(3)]
    for key, call, row in zip(missing, calls, rows, strict=True):
        torch.testing.assert_close(maps[key], FreshMapsEveryCall.expected(call, row, 4, 4), rtol=0, atol=0)
    # only the new maps are written, each once, in files of this continuation
    new = {f.name: sorted(keys_of(f)) for f in (killed / "maps").glob("resume1_*")}
    assert new == {
        "resume1_r0_b000001.safetensors": batches[1],
        "resume1_r0_b000002.safetensors": sorted(missing[7:]),
    }
    # the stored maps are scored: their per-image values equal the uninterrupted run's
    got, want = per_image_rows(killed), per_image_rows(whole)
    assert set(got) == set(want)
    for key in stored:
        assert got[key] == want[key], key
    assert json.loads((killed / "metrics.json").read_text())["resumed_maps"] == len(stored)


def test_finished_run_is_skipped(compose_cfg, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    OmegaConf.save(compose_cfg(*COMMON, f"output_dir={out}"), out / "config.yaml", resolve=True)
    finished = {"metrics": {"grid_pointing": 0.5}, "num_maps": 3, "finished": True}
    (out / "metrics.json").write_text(json.dumps(finished))
    stamp = (out / "metrics.json").stat().st_mtime_ns
    again = evaluate(compose_cfg(*COMMON, f"output_dir={out}", f"resume={out}"))
    assert again == {"grid_pointing": 0.5}
    assert (out / "metrics.json").stat().st_mtime_ns == stamp and sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "metrics.json",
    ]
    assert "finished earlier, skipped" in capsys.readouterr().out
    # a metrics.json without the finished mark (killed while writing its outputs) is not skipped
    (out / "metrics.json").write_text(json.dumps({**finished, "finished": False}))
    evaluate(compose_cfg(*COMMON, f"output_dir={out}", f"resume={out}"))
    assert json.loads((out / "metrics.json").read_text())["finished"] is True
    assert (out / "maps").is_dir()


def test_resume_refuses_a_run_of_another_config(compose_cfg, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    OmegaConf.save(compose_cfg(*COMMON, f"output_dir={out}"), out / "config.yaml", resolve=True)
    with pytest.raises(ValueError, match=r"method\._target_"):
        evaluate(compose_cfg(*COMMON, "method=input_x_gradient", f"output_dir={out}", f"resume={out}"))
    assert not (out / "maps").exists()


def test_finished_run_of_another_config_is_refused(compose_cfg, tmp_path, capsys) -> None:
    """A finished run resumed with other overrides is refused with the keys that differ, as an unfinished one
    is (it used to print "finished earlier, skipped" and return the old run's metrics as the new config's)."""
    out = tmp_path / "run"
    results = evaluate(compose_cfg(*COMMON, f"output_dir={out}"))
    written = (out / "metrics.json").read_text()
    with pytest.raises(ValueError, match=r"different config \(method\._target_: .*Gradient.* -> .*Random"):
        evaluate(compose_cfg(*COMMON, "method=random", f"output_dir={out}", f"resume={out}"))
    with pytest.raises(ValueError, match=r"data\.limit: 6 -> 4"):
        evaluate(compose_cfg(*COMMON, "data.limit=4", f"output_dir={out}", f"resume={out}"))
    assert (out / "metrics.json").read_text() == written
    assert "skipped" not in capsys.readouterr().out
    # the same config (where and how it runs may change) is skipped and returns the stored metrics
    again = evaluate(compose_cfg(*COMMON, "data.num_workers=1", f"output_dir={out}", f"resume={out}"))
    assert again == results and "finished earlier, skipped" in capsys.readouterr().out


def test_finished_layers_auto_run_with_the_same_config_is_skipped(compose_cfg, tmp_path, capsys) -> None:
    """Under layers=auto the stored config holds the chosen range: the comparison applies the saved choice."""
    args = [*COMMON, "method=caap", "layers=auto", "layers.calibration_images=2", "metric=localisation"]
    out = tmp_path / "run"
    results = evaluate(compose_cfg(*args, f"output_dir={out}"))
    assert evaluate(compose_cfg(*args, f"output_dir={out}", f"resume={out}")) == results
    assert "finished earlier, skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"layers\.calibration_images: 2 -> 3"):
        evaluate(compose_cfg(*args, "layers.calibration_images=3", f"output_dir={out}", f"resume={out}"))


def test_resume_needs_an_existing_run_folder(compose_cfg, tmp_path) -> None:
    """resume= names a run (or sweep) folder written before: a missing path (a typo) or a folder that holds
    no run is refused before anything is written, instead of silently starting a new run there."""
    missing = tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match=rf"resume={missing} does not exist.*config\.yaml"):
        evaluate(compose_cfg(*COMMON, f"output_dir={missing}", f"resume={missing}"))
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"resume={empty} holds no caap run.*config\.yaml"):
        evaluate(compose_cfg(*COMMON, f"output_dir={empty}", f"resume={empty}"))
    assert list(empty.iterdir()) == []
    # a job of a resumed sweep whose folder was never written starts there (the sweep folder exists)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("{}\n")
    evaluate(compose_cfg(*COMMON, f"output_dir={sweep / '0_method-gradient'}", f"resume={sweep}"))
    assert json.loads((sweep / "0_method-gradient" / "metrics.json").read_text())["finished"] is True


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
    start = [sys.executable, "-m", "caap", *args, f"hydra.run.dir={run}"]  # resume= needs an existing run
    proc = subprocess.Popen(
        start, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
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
