"""The GPU scripts run once per GPU session, unattended: their commands must compose and their summary must
survive missing steps. (`DRY_RUN=1 scripts/gpu_check.sh` runs every command on the CPU; this file is the fast
part: shell syntax, the overrides they pass, and the summary.)"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from caap.config import register_schemas
from caap.paths import CONF_DIR, REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"
_spec = importlib.util.spec_from_file_location("gpu_summary", SCRIPTS / "gpu_summary.py")
assert _spec is not None and _spec.loader is not None
gpu_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_summary)


@pytest.mark.parametrize("name", ["gpu_check.sh", "gpu_train_fashionscenes.sh", "gpu_env.sh"])
def test_scripts_parse(name: str) -> None:
    subprocess.run(["bash", "-n", str(SCRIPTS / name)], check=True)


def e2e_runs() -> list[tuple[str, list[str]]]:
    """The `e2e NAME IMAGES BATCH LOGGER OVERRIDES...` lines of gpu_check.sh as the overrides `python -m caap`
    gets (the e2e function's fixed ones first, the GPU model of a real run)."""
    text = (SCRIPTS / "gpu_check.sh").read_text().replace("\\\n", " ")
    runs = []
    for line in text.splitlines():
        if not line.startswith("e2e "):
            continue
        _, name, images, batch, logger, *overrides = shlex.split(line)
        images = "8" if images.startswith("$") else images
        logger = "wandb" if logger.startswith("$") else logger
        fixed = ["trainer=gpu_bf16", "model=vit_base_augreg", "model.pretrained=false", "data=synthetic"]
        fixed += [f"data.dataset.size={images}", f"data.batch_size={batch}", f"logger={logger}"]
        runs.append((name, fixed + overrides))
    return runs


def test_gpu_check_runs_compose() -> None:
    runs = dict(e2e_runs())
    assert set(runs) == {"e2e_default", "e2e_faithfulness", "layers_auto", "e2e_compile"}
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfgs = {name: compose("config", overrides=overrides) for name, overrides in runs.items()}
    default = cfgs["e2e_default"]
    assert default.trainer.accelerator == "gpu" and default.trainer.precision == "bf16-mixed"
    assert default.data.num_workers > 0 and default.layers.start == 4 and default.layers.stop is None
    assert default.model.name.startswith("vit_base_patch16_224") and default.model.pretrained is False
    assert cfgs["e2e_compile"].method.compile is True and default.method.compile is False
    assert "pixel_deletion" in cfgs["e2e_faithfulness"].metric
    assert cfgs["layers_auto"].layers.calibration_images == 16 and cfgs["layers_auto"].layers.select_by


def test_gpu_train_overrides_compose() -> None:
    """Every override the training script passes exists in conf/train_fashionscenes.yaml (a typo would only
    show on the GPU)."""
    text = (SCRIPTS / "gpu_train_fashionscenes.sh").read_text()
    keys = [
        k for k in re.findall(r"(?:^|\s)([a-z_]+)=\"\$", text, re.M) if k != "root"
    ]  # root: a shell variable
    assert {"train_size", "batch_size", "lr", "num_workers", "max_time", "output_dir"} <= set(keys)
    fixed = ["precision=bf16-mixed", "half=true", "export=false"]
    assert all(o in text for o in fixed) and "data_root=$root" in text
    overrides = [f"{k}=1" for k in keys if k not in ("max_time", "output_dir")]
    overrides += ["max_time=00:00:04:30", "output_dir=/tmp/x", *fixed, "data_root=/tmp/fmnist"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train_fashionscenes", overrides=overrides)
    assert cfg.max_time == "00:00:04:30" and cfg.dataset.root == "/tmp/fmnist" and cfg.half is True


def test_summary_reads_the_figures_and_judges_the_goals(tmp_path: Path) -> None:
    (tmp_path / "steps.tsv").write_text(
        "caap_speed\t0\t80\t170\npytest_gpu\t1\t30\t150\ne2e_compile\tno_time\t0\t0\n"
    )
    rows = [
        {"method": "engine", "start": 4, "images": 64, "images_per_s": 120.0, "peak_mb": 900.0, "mfu": 0.5},
        {"method": "engine_compiled", "start": 4, "images": 64, "images_per_s": 150.0},
        {"method": "captum", "start": 4, "images": 64, "images_per_s": 40.0},
    ]
    (tmp_path / "caap_speed.json").write_text(json.dumps(rows))
    (tmp_path / "e2e_default").mkdir()
    loop = {
        "seconds": 6.0,
        "images": 512,
        "images_per_second": 85.0,
        "after_first_batch_images_per_second": 90.0,
    }
    (tmp_path / "e2e_default" / "metrics.json").write_text(
        json.dumps(
            {"num_images": 512, "seconds": 20.0, "images_per_second": 25.6, "loop": loop, "metrics": {}}
        )
    )
    (tmp_path / "metric_quantus.json").write_text(json.dumps({"speedup_vs_quantus": 2.5}))
    summary = gpu_summary.summarise(tmp_path)
    assert summary["steps"]["caap_speed"] == {"status": "ok", "seconds": 80, "limit_s": 170}
    assert summary["steps"]["pytest_gpu"]["status"] == "failed (rc=1)"
    assert summary["steps"]["e2e_compile"]["status"] == "no_time"
    goals = summary["goals"]
    assert goals["engine_images_per_s_start4"] == {"value": 120.0, "target": 100.0, "met": True}
    assert (
        goals["e2e_loop_vs_engine"]["value"] == pytest.approx(0.75)
        and goals["e2e_loop_vs_engine"]["met"] is False
    )
    assert goals["metrics_vs_quantus"]["met"] is False
    assert summary["compile_speedup_start4"] == pytest.approx(1.25)
    assert summary["e2e_default"]["loop_images_per_second"] == 85.0 and summary["layers_auto"] is None
    empty = gpu_summary.summarise(tmp_path / "missing")  # nothing ran: still a summary, goals unknown
    assert all(g["met"] is None for g in empty["goals"].values())
