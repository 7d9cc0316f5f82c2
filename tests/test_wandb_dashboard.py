"""W&B that a dashboard can use, checked by decoding the offline `.wandb` files: a sweep job's run carries its
job type, its sweep's group, the short method name, the layer range, each metric's direction, its values with
CIs, its mean curves as tables with line plots and the (capped) per-image table; the report run joins its
group."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from caap.loggers import dashboard_config
from caap.methods import RandomAttribution
from caap.report import load_runs
from caap.report.wandb_summary import log_summary
from caap.run import evaluate
from caap.sweep import sweep_id, write_sweep_size
from test_run import read_wandb_records
from test_sweeps import _as_multirun_job, compose_hydra

OVERRIDES = [
    "model=test_vit",
    "data=synthetic",
    "data.limit=4",
    "method=caap",
    "layers.start=1",
    "layers.stop=3",
    "media_images=0",
    "callbacks.wandb_media.max_table_rows=3",
]


def decode(run_dir: Path) -> dict[str, Any]:
    """The offline run's `run` record, `config` (`{key: value}`, nested keys joined by '/'), `history` and
    `summary` (media flattened by wandb: `{key: {field: value}}`)."""
    records = read_wandb_records(run_dir)
    (run,) = [r.run for r in records if r.HasField("run")]
    out: dict[str, Any] = {"run": run, "config": {}, "history": {}, "summary": {}}
    updates = [("config", item) for item in run.config.update]
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "config":
            updates += [("config", item) for item in r.config.update]
        elif kind == "history":
            updates += [("history", item) for item in r.history.item]
        elif kind == "summary":
            updates += [("summary", item) for item in r.summary.update]
    for where, item in updates:
        keys = [item.key] if item.key else list(item.nested_key)
        value = json.loads(item.value_json)
        if where != "config" and len(keys) == 2:  # a logged table or image: {key: {field: value}}
            out[where].setdefault(keys[0], {})[keys[1]] = value
        else:
            out[where]["/".join(keys)] = value
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """One CAAP job of a multirun with the W&B logger (Hydra's job config set, as `python -m caap -m` runs
    it)."""
    sweep_dir = tmp_path_factory.mktemp("outputs") / "multirun" / "2026-12-07" / "10-00-00"
    out = sweep_dir / "0_caap"
    cfg = _as_multirun_job(compose_hydra(*OVERRIDES, f"output_dir={out}"), sweep_dir, 0, OVERRIDES)
    write_sweep_size(sweep_dir, 1)
    HydraConfig.instance().set_config(cfg)
    try:
        evaluate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    finally:
        HydraConfig.instance().cfg = None
    return out


def test_job_run_has_the_identity_a_dashboard_filters_on(job: Path) -> None:
    (run_dir,) = (job / "wandb").glob("offline-run-*")
    logged = decode(run_dir)
    run, config = logged["run"], logged["config"]
    written = json.loads((job / "metrics.json").read_text())
    assert run.job_type == "eval"
    group = f"2026-12-07/10-00-00-{sweep_id(job.parent)}"  # the sweep folder plus the sweep's id
    assert run.run_group == group == written["wandb_group"]
    assert config["method_name"] == "caap" and config["layer_range"] == "1:3"
    assert config["higher_is_better"] == written["higher_is_better"]
    assert set(config["higher_is_better"].values()) == {True, False}


def test_job_run_logs_values_cis_and_curve_plots(job: Path) -> None:
    (run_dir,) = (job / "wandb").glob("offline-run-*")
    logged = decode(run_dir)
    written = json.loads((job / "metrics.json").read_text())
    summary = logged["summary"]
    for name, value in written["metrics"].items():
        assert summary[f"test/{name}"] == pytest.approx(value, rel=1e-9)
        low, high = written["ci"][name]
        assert (summary[f"test/{name}/ci_low"], summary[f"test/{name}/ci_high"]) == pytest.approx((low, high))
    curves = json.loads((job / "curves.json").read_text())
    assert {"mif", "lif", "srg"} <= set(curves)
    for name, curve in curves.items():
        entry = logged["history"][f"curves/{name}_table"]
        assert entry["_type"] == "table-file"
        table = json.loads((run_dir / "files" / entry["path"]).read_text())
        assert table["columns"] == ["x", "y", "low", "high"]
        columns = list(zip(*table["data"], strict=True))
        for k, field in enumerate(table["columns"]):
            assert list(columns[k]) == pytest.approx(curve[field]), (name, field)
        # the line plot: a wandb/line chart of x, y over that table, the same key in every run (overlaid)
        chart = logged["config"][f"_wandb/visualize/curves/{name}"]["panel_config"]
        assert chart["panelDefId"] == "wandb/line/v0"
        assert chart["fieldSettings"] == {"x": "x", "y": "y", "stroke": None}
        query = json.dumps(chart["userQuery"])
        assert f'"value": "curves/{name}_table"' in query


def test_per_image_table_is_capped_with_a_note(job: Path) -> None:
    (run_dir,) = (job / "wandb").glob("offline-run-*")
    logged = decode(run_dir)
    with open(job / "per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) > 3
    entry = logged["history"]["per_image"]
    table = json.loads((run_dir / "files" / entry["path"]).read_text())
    assert [(r[0], r[1]) for r in table["data"]] == [(int(r["index"]), int(r["class"])) for r in rows[:3]]
    assert logged["summary"]["per_image_total_rows"] == len(rows)
    assert logged["summary"]["per_image_capped"] is True


def test_dashboard_config_of_a_method_without_a_layer_range() -> None:
    assert RandomAttribution().layer_range(None) is None  # type: ignore[arg-type]
    assert dashboard_config("random", None) == {"method_name": "random", "layer_range": None}
    assert dashboard_config("caap", (0, 2))["layer_range"] == "0:2"


def test_report_run_joins_the_group_of_the_runs_it_summarises(job: Path, tmp_path: Path) -> None:
    records = load_runs(job.parent)
    run_dir = log_summary(records, job.parent, tmp_path, {})
    run = decode(run_dir)["run"]
    assert run.job_type == "report"
    assert run.run_group == json.loads((job / "metrics.json").read_text())["wandb_group"]
