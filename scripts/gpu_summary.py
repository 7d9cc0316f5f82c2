"""Collect the figures of `scripts/gpu_check.sh` into one JSON: steps, engine speed, end-to-end loops, metrics
against Quantus, LibraGrad's cost, `layers=auto`, and the issue's goals with whether each was met.

Usage: python scripts/gpu_summary.py WORK_DIR OUT_JSON
(WORK_DIR holds steps.tsv, env.json, the benchmarks' JSON files and the run folders e2e_*/ and layers_auto/.)
Missing inputs (a step skipped, failed or out of time) leave their entries out; the summary is always written.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

#: The issue's goals: engine images/s on ViT-B/16 bf16 at start=4, end-to-end loop / engine raw rate at the
#: same start, our patch-deletion curves / Quantus RegionPerturbation's on the same work.
GOALS = {"engine_images_per_s_start4": 100.0, "e2e_loop_vs_engine": 0.8, "metrics_vs_quantus": 3.0}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def steps(work: Path) -> dict[str, dict[str, Any]]:
    """`steps.tsv` rows `name, rc (or skipped / no_time), seconds, limit` as `{name: {...}}`."""
    out: dict[str, dict[str, Any]] = {}
    path = work / "steps.tsv"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        name, rc, seconds, limit = [*line.split("\t"), "", "", "", ""][:4]
        status = rc if rc in ("skipped", "no_time") else ("ok" if rc == "0" else f"failed (rc={rc})")
        out[name] = {"status": status, "seconds": int(seconds or 0), "limit_s": int(limit or 0)}
    return out


def engine_rows(rows: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """caap_speed rows as `{"<method>@start<s>": {images_per_s, peak_mb, mfu, ...}}`."""
    keep = ("images", "chunk", "seconds", "warmup_seconds", "images_per_s", "peak_mb", "chunk_est_mb", "mfu")
    out: dict[str, dict[str, Any]] = {}
    for row in rows or []:
        out[f"{row['method']}@start{row['start']}"] = {k: row[k] for k in keep if k in row}
    return out


def run_folder(folder: Path) -> dict[str, Any] | None:
    """An end-to-end run's rates and values from its metrics.json (None when the run did not finish)."""
    written = read_json(folder / "metrics.json")
    if not written:
        return None
    loop = written.get("loop", {})
    out = {
        "num_images": written.get("num_images"),
        "num_maps": written.get("num_maps"),
        "run_seconds": written.get("seconds"),
        "run_images_per_second": written.get("images_per_second"),
        "loop_seconds": loop.get("seconds"),
        "loop_images_per_second": loop.get("images_per_second"),
        "loop_images_per_second_after_first_batch": loop.get("after_first_batch_images_per_second"),
        "metrics": written.get("metrics"),
    }
    if "layers_auto" in written:
        out["layers_auto"] = written["layers_auto"]
    return out


def ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b or math.isnan(a):
        return None
    return a / b


def summarise(work: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {"env": read_json(work / "env.json"), "steps": steps(work)}
    engine = engine_rows(read_json(work / "caap_speed.json"))
    summary["caap_speed"] = engine
    for name in sorted(p.name for p in work.glob("e2e_*") if p.is_dir()):
        summary[name] = run_folder(work / name)
    summary["layers_auto"] = run_folder(work / "layers_auto")
    summary["metric_quantus"] = read_json(work / "metric_quantus.json")
    summary["libragrad"] = {
        p.stem.removeprefix("libragrad_"): read_json(p) for p in sorted(work.glob("libragrad_*.json"))
    }
    raw = engine.get("engine@start4", {}).get("images_per_s")
    loop = (summary.get("e2e_default") or {}).get("loop_images_per_second_after_first_batch")
    quantus = (summary["metric_quantus"] or {}).get("speedup_vs_quantus")
    values = {
        "engine_images_per_s_start4": raw,
        "e2e_loop_vs_engine": ratio(loop, raw),
        "metrics_vs_quantus": quantus,
    }
    summary["goals"] = {
        name: {"value": value, "target": GOALS[name], "met": None if value is None else value >= GOALS[name]}
        for name, value in values.items()
    }
    compiled = engine.get("engine_compiled@start4", {}).get("images_per_s")
    summary["compile_speedup_start4"] = ratio(compiled, raw)
    return summary


def main() -> None:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    summary = summarise(work)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({"goals": summary["goals"], "steps": summary["steps"]}, indent=2))


if __name__ == "__main__":
    main()
