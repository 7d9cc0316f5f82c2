"""`caap.report`: tables with CIs and statistical marks, paired verdicts on real runs, figures, a self-contained page that Chromium renders with
every image loaded, and the W&B summary run; built from real run folders of `caap.run.evaluate`."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate

from caap.config import register_schemas
from caap.paths import CONF_DIR, REPO_ROOT
from caap.report import build_report, latest_run_dir, load_runs
from caap.report.table import report_statistics
from caap.report.wandb_summary import COMPARISONS_KEY, TABLE_KEY
from test_run import read_wandb_records

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
RUNS = [  # (folder, overrides): two CAAP layer ranges and the random floor, on the same two images
    ("0_layers.stop=1", ["method=caap", "layers.start=0", "layers.stop=1"]),
    ("1_layers.stop=2", ["method=caap", "layers.start=0", "layers.stop=2"]),
    ("2_method=random", ["method=random"]),
]
FAST = ["model=test_vit", "data=synthetic", "data.limit=2", "logger=csv", "media_images=0"]
LOCALISATION = ("grid_pointing", "energy_pointing", "class_discrimination")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A multirun-shaped folder of three real runs (evaluate + the overrides Hydra would have recorded)."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "multirun.yaml").write_text("{}\n")
    for folder, overrides in RUNS:
        run_into(root / folder, overrides)
    return root


def run_into(out: Path, overrides: list[str], base: list[str] = FAST) -> None:
    """`evaluate` with `base` and `overrides` into `out`, recording the overrides as Hydra would."""
    from hydra import compose, initialize_config_dir

    from caap.run import evaluate

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[*base, *overrides, "trainer.enable_progress_bar=false", f"output_dir='{out}'"],
        )
    evaluate(cfg)
    (out / ".hydra").mkdir()
    (out / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


@pytest.fixture(scope="module")
def report(sweep: Path, tmp_path_factory) -> dict[str, Path]:
    """The report of `sweep` (tables, page, W&B summary run), built once."""
    return build_report(sweep, tmp_path_factory.mktemp("report"), wandb=True)


def test_run_folders_hold_curves_and_directions(sweep: Path) -> None:
    folder = sweep / RUNS[0][0]
    written = json.loads((folder / "metrics.json").read_text())
    config = yaml.safe_load((folder / "config.yaml").read_text())
    metrics = {name: instantiate(node) for name, node in config["metric"].items()}
    assert written["higher_is_better"] == {n: m.higher_is_better for n, m in metrics.items()}
    assert set(written["higher_is_better"].values()) == {True, False}  # both directions in the default set
    curves = json.loads((folder / "curves.json").read_text())
    curve_metrics = {n for n, m in metrics.items() if m.curve() is not None}  # None: no curve
    assert curve_metrics and set(curves) == curve_metrics
    for name in curve_metrics:
        x, y = curves[name]["x"], curves[name]["y"]
        assert len(x) == len(y) and x == sorted(x)
        low, high = curves[name]["low"], curves[name]["high"]  # the pointwise bootstrap band of the mean
        assert len(low) == len(high) == len(y)
        assert all(lo <= v <= hi for lo, v, hi in zip(low, y, high, strict=True))
        assert any(lo < hi for lo, hi in zip(low, high, strict=True))
        # the metric's area of the mean curve is the mean per-image area (the metric's value: areas are linear)
        area = metrics[name].auc(torch.tensor([y], dtype=torch.float64))
        assert float(area) == pytest.approx(written["metrics"][name], rel=1e-6, abs=1e-9)
    assert (folder / "images.safetensors").is_file()


def test_report_tables_and_labels(sweep: Path, report: dict[str, Path]) -> None:
    records = load_runs(sweep)
    caap = [f"caap layers.start=0,layers.stop={stop}" for stop in (1, 2)]
    assert [r.label for r in records] == [*caap, "random"]
    assert [r.layer_range for r in records] == [(0, 1), (0, 2), None]
    assert latest_run_dir(sweep.parent) == sweep
    # several folders are labelled together (what differs across all of them)
    both = load_runs(sweep / RUNS[1][0], sweep / RUNS[2][0])
    assert [r.label for r in both] == ["caap layers.start=0,layers.stop=2", "random"]
    md = report["md"].read_text()
    for r in records:
        assert r.label in md
    stats = report_statistics(records)
    assert stats.groups == [[0, 1, 2]]  # the same images and classes: one comparable group
    for name in records[0].metrics:  # bold exactly where the paired tests say "best", with the value's CI
        for i, r in enumerate(records):
            low, high = r.ci[name]
            cell = f"{r.metrics[name]:.4f}** [{low:.3f}, {high:.3f}]"
            assert (f"**{cell}" in md) == (stats.mark(name, i) == "best"), (name, r.label)
    rows = list(csv.DictReader(report["csv"].open()))
    assert [r["layers_stop"] for r in rows] == ["1", "2", ""]


def test_html_page_is_self_contained_and_renders_in_chromium(report: dict[str, Path], tmp_path: Path) -> None:
    page = report["html"].read_text()
    assert "<img" in page and not re.search(r'src="(?!data:image/png;base64,)', page)  # no external files
    sections = [s for s in ("Layer ranges", "Curves", "Maps") if f"<h2>{s}</h2>" in page]
    assert sections == ["Layer ranges", "Curves", "Maps"]
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make setup installs Debian's chromium)")
    # the page plus a probe that, once everything loaded, writes how many <img> decoded (naturalWidth > 0)
    probe = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        " const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
        " document.body.setAttribute('data-images', ok + '/' + imgs.length); });</script>"
    )
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", probe + "</body>"))
    args = [CHROMIUM, "--headless", "--disable-gpu", "--dump-dom", "--virtual-time-budget=10000"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")
    proc = subprocess.run([*args, probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r'data-images="(\d+)/(\d+)"', proc.stdout)
    assert match, proc.stdout[:500]
    loaded, total = int(match.group(1)), int(match.group(2))
    assert total == page.count("<img") >= 3 and loaded == total


def test_a_rerun_with_identical_maps_differs_by_exactly_zero_and_ties(sweep: Path, tmp_path: Path) -> None:
    """The same run again (the same seed: the same random maps) against the sweep's: every metric's
    difference is exactly 0, p = 1, and the two are tied leaders, not a best and a runner-up."""
    run_into(tmp_path / "again", RUNS[2][1])
    records = load_runs(sweep / RUNS[2][0], tmp_path / "again")
    assert records[0].pairs is not None and records[0].pairs.same_pairs(records[1].pairs)
    stats = report_statistics(records)
    assert {c.metric for c in stats.comparisons} == set(records[0].metrics)
    for c in stats.comparisons:
        assert (c.result.difference, c.result.p_value, c.verdict) == (0.0, 1.0, "tied"), c.metric
        assert stats.marks[c.metric] == {0: "tied", 1: "tied"}


@pytest.mark.slow
def test_caap_is_significantly_better_than_random_on_srg(tmp_path: Path) -> None:
    """The shipped FashionGrid model, 32 grids (about 80 image-class pairs): CAAP against method=random."""
    fashion = ["data.limit=32", "logger=csv", "media_images=0", *(f"~metric.{m}" for m in LOCALISATION)]
    for method in ("caap", "random"):
        run_into(tmp_path / method, [f"method={method}", *fashion], base=[])
    records = load_runs(tmp_path / "caap", tmp_path / "random")
    stats = report_statistics(records)
    (srg,) = [c for c in stats.comparisons if c.metric == "srg"]
    assert (srg.leader, srg.verdict) == (0, "better") and srg.result.low > 0 and srg.p_holm < 0.05
    assert stats.marks["srg"] == {0: "best"}


def test_wandb_summary_run_holds_the_table(sweep: Path, report: dict[str, Path]) -> None:
    run_dir = report["wandb"]
    assert run_dir.name.startswith("offline-run-")
    # history items of logged media are flattened: nested_key = [key, field] -> value
    items: dict[str, dict] = {}
    decoded = read_wandb_records(run_dir)
    (run,) = [r.run for r in decoded if r.HasField("run")]
    assert run.job_type == "report"
    for rec in decoded:
        if rec.WhichOneof("record_type") == "history":
            for item in rec.history.item:
                if len(item.nested_key) == 2:
                    items.setdefault(item.nested_key[0], {})[item.nested_key[1]] = json.loads(item.value_json)
    assert items[TABLE_KEY]["_type"] == "table-file"
    assert any(k.startswith("report/layer_ranges/") for k in items)
    table = json.loads((run_dir / "files" / items[TABLE_KEY]["path"]).read_text())
    records = load_runs(sweep)
    assert [row[0] for row in table["data"]] == [r.label for r in records]
    name = next(iter(records[0].metrics))
    col = table["columns"].index(name)
    assert [row[col] for row in table["data"]] == pytest.approx([r.metrics[name] for r in records])
    low = table["columns"].index(f"{name}_ci_low")
    assert [row[low] for row in table["data"]] == pytest.approx([r.ci[name][0] for r in records])
    # the paired comparisons, as comparisons.csv has them
    comparisons = json.loads((run_dir / "files" / items[COMPARISONS_KEY]["path"]).read_text())
    written = list(csv.reader(report["comparisons"].open()))
    assert comparisons["columns"] == written[0] and len(comparisons["data"]) == len(written) - 1 > 0
    for logged, row in zip(comparisons["data"], written[1:], strict=True):
        assert logged[:4] == row[:4] and logged[9] == row[9]  # metric, pairs, leader, other; verdict
        assert logged[4] == pytest.approx(float(row[4]))  # difference


@pytest.mark.slow
def test_report_command_on_a_real_multirun(tmp_path: Path) -> None:
    """`python -m caap -m ...` then `python -m caap.report` (the default folder: the newest under outputs/)."""
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": str(REPO_ROOT / "src"),
    }
    sweep = subprocess.run(
        [
            sys.executable,
            "-m",
            "caap",
            "-m",
            "method=caap,random",
            *FAST,
            "hydra.sweep.dir=outputs/multirun/x/y",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    report = subprocess.run(
        [sys.executable, "-m", "caap.report"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    out = tmp_path / "outputs" / "multirun" / "x" / "y" / "report"
    assert {"report.md", "report.csv", "report.html", "wandb"} <= {p.name for p in out.iterdir()}
    assert "| caap |" in report.stdout and "| random |" in report.stdout
