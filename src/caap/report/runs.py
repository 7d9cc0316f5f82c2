"""Reading run folders (the contract of `caap.run`) into `RunRecord`s for reports.

A run folder holds `metrics.json` (values, `higher_is_better`, bootstrap CIs, facts), `curves.json` (mean
curves of curve metrics with their bands), `per_image.csv` (every per-pair value), `config.yaml` (the
resolved config), `.hydra/` (Hydra's config, overrides and group choices), `maps/` (safetensors,
`caap.maps_io`), `images.safetensors` (a few evaluated images) and `masks.safetensors` (their ground truth).
A multirun folder holds one run folder per job (and `multirun.yaml`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from caap.models.layers import resolve_layer_range

log = logging.getLogger(__name__)

#: override keys that never tell runs apart in a label (paths, loggers, progress bars)
IGNORED_KEYS = ("hydra.", "output_dir", "logger", "trainer.enable_progress_bar", "experiment", "debug")


@dataclass
class PairValues:
    """A run's per-pair values (its `per_image.csv`): dataset `index [M]` and `cls [M]` sorted by (index,
    class), and `values` `{result: [M]}` (NaN where undefined or absent)."""

    index: np.ndarray
    cls: np.ndarray
    values: dict[str, np.ndarray]

    def same_pairs(self, other: PairValues) -> bool:
        """Whether both runs scored exactly the same (index, class) pairs."""
        return np.array_equal(self.index, other.index) and np.array_equal(self.cls, other.cls)


def _number(text: Any) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_pairs(folder: Path) -> PairValues | None:
    """The `PairValues` of `folder/per_image.csv`, or None for a run folder without one."""
    path = folder / "per_image.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = [c for c in (rows[0] if rows else {}) if c not in ("index", "class", "class_name")]
    index = np.array([int(r["index"]) for r in rows], dtype=np.int64)
    cls = np.array([int(r["class"]) for r in rows], dtype=np.int64)
    order = np.lexsort((cls, index))
    values = {c: np.array([_number(r.get(c)) for r in rows], dtype=np.float64)[order] for c in columns}
    return PairValues(index[order], cls[order], values)


@dataclass
class RunRecord:
    """One run folder: its metric values and what distinguishes it from the other runs of the report.

    Attributes:
        path: the run folder.
        method: the method option (`method=...` choice, e.g. `caap`), or the method class name.
        overrides: the run's command-line overrides (`.hydra/overrides.yaml`), `key=value` strings.
        config: the resolved config (`config.yaml`) as a dict.
        metrics: `{metric: value}`.
        higher_is_better: `{metric: bool}` (True where metrics.json does not say).
        curves: `{metric: (x [K], y [K])}` mean curves of curve metrics.
        ci: `{metric: (low, high)}` bootstrap CIs of the values (metrics.json `ci`; empty for older runs).
        curve_bands: `{metric: (low [K], high [K])}` pointwise bootstrap bands of the mean curves.
        pairs: the per-pair values (`per_image.csv`), None for a run folder without them.
        facts: the other entries of metrics.json (num_maps, seconds, ...).
        layer_range: CAAP's resolved `(start, stop)` over residual positions 0..L, else None.
        depth: the model's number of blocks L when known.
        label: a short unique name in the report (set by `label_runs`).
    """

    path: Path
    method: str
    overrides: list[str]
    config: dict[str, Any]
    metrics: dict[str, float]
    higher_is_better: dict[str, bool]
    curves: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    curve_bands: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    pairs: PairValues | None = None
    layer_range: tuple[int, int] | None = None
    depth: int | None = None
    label: str = ""

    @property
    def variant(self) -> str:
        """The label without the layer range: CAAP runs that differ only in their range share it."""
        return re.sub(r",?layers\.(start|stop)=[^,]*", "", self.label).strip(", ") or self.method


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _job_number(path: Path) -> tuple[int, str]:
    match = re.match(r"(\d+)", path.name)
    return (int(match.group(1)) if match else 1 << 30, path.name)


def _is_caap(config: dict[str, Any]) -> bool:
    return str((config.get("method") or {}).get("_target_", "")).endswith(".CAAP")


def _layer_range(config: dict[str, Any]) -> tuple[tuple[int, int] | None, int | None]:
    """CAAP's resolved range and the model depth, or (None, None) for other methods."""
    if not _is_caap(config):
        return None, None
    from caap.models import model_depth

    try:
        depth = model_depth(config["model"])
        method = config["method"]
        return resolve_layer_range(method["start"], method.get("stop"), depth), depth
    except (KeyError, ValueError, RuntimeError) as err:
        log.warning(f"cannot resolve the layer range of a CAAP run: {err}")
        return None, None


def read_run(folder: Path) -> RunRecord:
    """The `RunRecord` of one run folder (one with a metrics.json)."""
    written = json.loads((folder / "metrics.json").read_text())
    config = _read_yaml(folder / "config.yaml") or _read_yaml(folder / ".hydra" / "config.yaml") or {}
    hydra = _read_yaml(folder / ".hydra" / "hydra.yaml") or {}
    choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    overrides = _read_yaml(folder / ".hydra" / "overrides.yaml") or []
    chosen = [o.split("=", 1)[1] for o in overrides if str(o).lstrip("+").startswith("method=")]
    method = choices.get("method") or (chosen[-1] if chosen else None)
    method = method or str((config.get("method") or {}).get("_target_", "?")).rsplit(".")[-1]
    metrics = {k: float(v) if v is not None else math.nan for k, v in written.pop("metrics", {}).items()}
    higher = {k: bool(written.get("higher_is_better", {}).get(k, True)) for k in metrics}
    written.pop("higher_is_better", None)
    ci = {k: (_number(v[0]), _number(v[1])) for k, v in (written.pop("ci", None) or {}).items()}
    curves_file = folder / "curves.json"
    stored = json.loads(curves_file.read_text()) if curves_file.is_file() else {}
    curves = {k: (v["x"], v["y"]) for k, v in stored.items()}
    bands = {k: (v["low"], v["high"]) for k, v in stored.items() if "low" in v and "high" in v}
    layer_range, depth = _layer_range(config)
    return RunRecord(
        path=folder,
        method=str(method),
        overrides=[str(o) for o in overrides],
        config=config,
        metrics=metrics,
        higher_is_better=higher,
        curves=curves,
        facts=written,
        ci=ci,
        curve_bands=bands,
        pairs=read_pairs(folder),
        layer_range=layer_range,
        depth=depth,
    )


def run_folders(folder: Path) -> list[Path]:
    """The run folders of a run (the folder itself) or a multirun (its job folders, in job order)."""
    folder = Path(folder)
    if (folder / "metrics.json").is_file():
        return [folder]
    found = [p.parent for p in folder.rglob("metrics.json") if "report" not in p.relative_to(folder).parts]
    return sorted(found, key=lambda p: (_job_number(p.relative_to(folder)), str(p)))


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def label_runs(records: list[RunRecord]) -> None:
    """Name each run by its method plus the overrides that differ between runs (`caap layers.start=0,...`)."""
    keyed = [{_key(o): o.lstrip("+~") for o in r.overrides} for r in records]
    keys = sorted({k for d in keyed for k in d if not k.startswith(IGNORED_KEYS) and k != "method"})
    varying = [k for k in keys if len({d.get(k) for d in keyed}) > 1]
    seen: dict[str, int] = {}
    for record, overrides in zip(records, keyed, strict=True):
        parts = [overrides[k] for k in varying if k in overrides]
        label = record.method + (" " + ",".join(parts) if parts else "")
        seen[label] = seen.get(label, 0) + 1
        record.label = label if seen[label] == 1 else f"{label} #{seen[label]}"


def load_runs(*folders: str | Path) -> list[RunRecord]:
    """Every run of one or more run / multirun folders (e.g. a layer sweep and a baseline sweep), labelled
    together; raises FileNotFoundError when a folder holds no run."""
    records = []
    for folder in folders:
        found = run_folders(Path(folder))
        if not found:
            raise FileNotFoundError(
                f"no run folders (with metrics.json) under {folder}; pass a run or multirun folder of caap"
            )
        records += [read_run(f) for f in found]
    label_runs(records)
    return records


def latest_run_dir(outputs: str | Path = "outputs") -> Path:
    """The newest run or multirun folder under `outputs/` (by the time its last metrics.json was written)."""
    newest: dict[Path, float] = {}
    for metrics in Path(outputs).rglob("metrics.json"):
        if "report" in metrics.parts:
            continue
        run = metrics.parent
        top = run.parent if (run.parent / "multirun.yaml").is_file() else run
        newest[top] = max(newest.get(top, 0.0), metrics.stat().st_mtime)
    if not newest:
        raise FileNotFoundError(f"no runs under {Path(outputs).resolve()}; run `make run` or a sweep first")
    return max(newest, key=newest.__getitem__)
