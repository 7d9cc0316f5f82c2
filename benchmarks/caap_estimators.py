"""CAAP estimators against exact CAAP: cost, wall time, fidelity of the maps and the metric values they give.

For each estimator setting (`method.estimator` and its parameters) on the same images and (image, class) pairs
as exact CAAP, in one run:

- cost in forward-pass equivalents per image (the method's `cost`: one sequence through all L blocks = 1, a
  backward = 2 forwards) and wall time, both relative to exact;
- fidelity against the exact maps: Spearman per map (mean and worst), overlap of the top-10% patches, and the
  mean absolute error relative to the exact map's range (max - min), averaged over maps;
- MIF / LIF / SRG (prob) and grid pointing (when the data has cell masks) of the estimated maps, with the
  difference to the exact maps' value and a paired bootstrap 95% CI of that difference (resampling pairs).

Timing is interleaved: every batch runs every setting in turn, so a drifting background load hits them alike.
With `--screen-top-k`, `layers=auto` (select_by SRG prob on the last `--calibration-images` images) runs once
with every range exact and once per k with `layers.screen_top_k=k`: wall and CPU seconds (process time, the
steadier figure on a shared machine with one thread), speed-ups, the chosen range, and where the exact best
range ranked in the screening.

The model and data come from the project's config (`--overrides`, Hydra syntax), so the benchmark reruns on any
shipped model, e.g. `--overrides model=<deep model> data=<its data>`.

Examples:
    python benchmarks/caap_estimators.py --images 64
    python benchmarks/caap_estimators.py --images 16 --settings exact gradient screened:screen_fraction=0.25
    python benchmarks/caap_estimators.py --images 64 --screen-top-k 1 3 5 --out outputs/estimators.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from caap.batch import AttributionBatch, select_targets
from caap.config import compose_config
from caap.data.collate import collate_skip_none
from caap.layer_selection import calibration_indices, select_layer_range
from caap.methods.caap import CAAP
from caap.metrics import LIF, MIF, SRG, GridPointingGame
from caap.metrics.functional.sanity import spearman_per_map
from caap.run import build_datamodule

DEFAULT_SETTINGS = [
    "exact",
    "gradient",
    "screened:screen_fraction=0.05",
    "screened:screen_fraction=0.1",
    "screened:screen_fraction=0.25",
    "screened:screen_fraction=0.5",
    "adaptive:adaptive_window=2,adaptive_refine=0.125",
    "adaptive:adaptive_window=2,adaptive_refine=0.25",
    "adaptive:adaptive_window=2,adaptive_refine=0.5",
    "adaptive:adaptive_window=4,adaptive_refine=0.25",
    "adaptive:adaptive_window=4,adaptive_refine=0.5",
]


def parse_setting(text: str) -> dict[str, Any]:
    """`estimator[:key=value,...]` -> CAAP keyword arguments (values are numbers)."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {"estimator": name}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        options[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    return options


def label(setting: dict[str, Any]) -> str:
    """`estimator[,key=value...]` for the table."""
    return ",".join([setting["estimator"], *(f"{k}={v}" for k, v in setting.items() if k != "estimator")])


def top_overlap(estimate: Tensor, exact: Tensor, share: float = 0.1) -> Tensor:
    """Per map `[P]`: the fraction of the exact map's top `ceil(share * N)` patches that are in the estimate's."""
    flat_e, flat_x = estimate.flatten(1), exact.flatten(1)
    k = max(1, math.ceil(share * flat_x.shape[1]))
    top_e = torch.zeros_like(flat_e, dtype=torch.bool).scatter_(1, flat_e.topk(k, 1).indices, True)
    top_x = torch.zeros_like(flat_x, dtype=torch.bool).scatter_(1, flat_x.topk(k, 1).indices, True)
    return (top_e & top_x).sum(1).float() / k


def relative_mae(estimate: Tensor, exact: Tensor) -> Tensor:
    """Per map `[P]`: mean |estimate - exact| over patches / (max - min of the exact map)."""
    flat_e, flat_x = estimate.flatten(1), exact.flatten(1)
    span = (flat_x.amax(1) - flat_x.amin(1)).clamp_min(1e-12)
    return (flat_e - flat_x).abs().mean(1) / span


def paired_bootstrap(diff: Tensor, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile CI of the mean of per-pair differences `diff` `[P]` (NaN pairs dropped)."""
    diff = diff[torch.isfinite(diff)].double()
    if diff.numel() < 2:
        return float("nan"), float("nan")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(diff.numel(), (resamples, diff.numel()), generator=gen)
    means = diff[idx].mean(1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


def nanmean(x: Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else float("nan")


def metric_values(batch: AttributionBatch, model: Any, has_cells: bool) -> dict[str, Tensor]:
    """Per-pair MIF / LIF / SRG (prob) and GridPG `[P]` of the batch's maps."""
    metrics: dict[str, Any] = {"MIF": MIF(score="prob"), "LIF": LIF(score="prob"), "SRG": SRG(score="prob")}
    if has_cells:
        metrics["GridPG"] = GridPointingGame()
    with torch.no_grad():
        return {name: m.score(batch, model).double().cpu() for name, m in metrics.items()}


def run_estimators(args: argparse.Namespace, cfg: Any, model: Any, datamodule: Any) -> list[dict[str, Any]]:
    settings = [parse_setting(s) for s in args.settings]
    if settings[0]["estimator"] != "exact" or len(settings[0]) > 1:
        settings.insert(0, {"estimator": "exact"})
    methods = [instantiate(cfg.method, **s) for s in settings]
    for m in methods:
        m.setup(model)
    indices = datamodule.indices[: args.images]
    loader = DataLoader(
        Subset(datamodule.dataset, indices),
        batch_size=args.batch_size,
        collate_fn=collate_skip_none,
    )
    seconds = [0.0] * len(methods)
    maps: list[list[Tensor]] = [[] for _ in methods]
    values: list[dict[str, list[Tensor]]] = [{} for _ in methods]
    images = 0
    has_cells = False
    for batch in loader:
        if batch is None:
            continue
        rows, classes = select_targets(batch, cfg.target, model)
        images += batch["image"].shape[0]
        has_cells = "cell" in (batch.get("masks") or {})
        for i, method in enumerate(methods):
            t0 = time.perf_counter()
            got = method(model, batch["image"][rows], classes)
            seconds[i] += time.perf_counter() - t0
            maps[i].append(got)
            pairs = AttributionBatch.from_data(batch, rows, classes, got)
            for name, v in metric_values(pairs, model, has_cells).items():
                values[i].setdefault(name, []).append(v)
        print(f"  {images}/{len(indices)} images", flush=True)
    exact_maps = torch.cat(maps[0])
    exact_values = {k: torch.cat(v) for k, v in values[0].items()}
    exact_cost = methods[0].cost.forward_equivalents
    results = []
    for i, (setting, method) in enumerate(zip(settings, methods, strict=True)):
        est = torch.cat(maps[i])
        vals = {k: torch.cat(v) for k, v in values[i].items()}
        spearman = spearman_per_map(est, exact_maps)
        row: dict[str, Any] = {
            "setting": label(setting),
            "fwd_per_image": method.cost.forward_equivalents / images,
            "cost_vs_exact": method.cost.forward_equivalents / exact_cost,
            "seconds": seconds[i],
            "time_vs_exact": seconds[i] / seconds[0],
            "spearman_mean": nanmean(spearman),
            "spearman_worst": float(spearman[torch.isfinite(spearman)].min()),
            "top10_overlap": float(top_overlap(est, exact_maps).mean()),
            "rel_mae": float(relative_mae(est, exact_maps).mean()),
        }
        for name, v in vals.items():
            diff = v - exact_values[name]
            low, high = paired_bootstrap(diff)
            row[name] = nanmean(v)
            row[f"{name}_diff"] = nanmean(diff)
            row[f"{name}_ci"] = (low, high)
        results.append(row)
    print(
        f"\n{images} images, {exact_maps.shape[0]} maps (target={cfg.target}), model {model.name}, "
        f"range {methods[0].layer_range(model)}, mode {methods[0].mode}, score {methods[0].score}, "
        f"{torch.get_num_threads()} threads"
    )
    print_table(results, [k for k in exact_values])
    return results


def print_table(results: Sequence[dict[str, Any]], metric_names: Sequence[str]) -> None:
    head = (
        "| setting | fwd/img | cost vs exact | time vs exact | Spearman mean | worst | top-10% | MAE/range |"
    )
    for name in metric_names:
        head += f" {name} (diff [95% CI]) |"
    print(head)
    print("|" + "---|" * (8 + len(metric_names)))
    for r in results:
        line = (
            f"| {r['setting']} | {r['fwd_per_image']:.2f} | {r['cost_vs_exact']:.3f} | {r['time_vs_exact']:.3f} | "
            f"{r['spearman_mean']:.3f} | {r['spearman_worst']:.3f} | {r['top10_overlap']:.3f} | {r['rel_mae']:.3f} |"
        )
        for name in metric_names:
            low, high = r[f"{name}_ci"]
            if r["setting"] == "exact":
                line += f" {r[name]:.4f} |"
            else:
                line += f" {r[name]:.4f} ({r[f'{name}_diff']:+.4f} [{low:+.4f}, {high:+.4f}]) |"
        print(line)


def run_layer_screening(args: argparse.Namespace, overrides: list[str], model: Any) -> list[dict[str, Any]]:
    """`layers=auto` with every range exact, then with `layers.screen_top_k=k` for each k."""
    rows: list[dict[str, Any]] = []
    full, full_cpu = None, 0.0
    for k in [None, *args.screen_top_k]:
        cfg = compose_config(
            [
                *overrides,
                "layers=auto",
                f"layers.calibration_images={args.calibration_images}",
                f"layers.screen_top_k={'null' if k is None else k}",
            ]
        )
        method = instantiate(cfg.method)
        dataset = build_datamodule(cfg, model).dataset
        calib = calibration_indices(len(dataset), args.calibration_images)
        cpu0 = time.process_time()
        sel = select_layer_range(cfg, method, model, dataset, calib, progress=False)
        cpu = time.process_time() - cpu0
        if full is None:
            full, full_cpu = sel, cpu
        row: dict[str, Any] = {
            "screen_top_k": k,
            "seconds": sel.seconds,
            "speedup": full.seconds / sel.seconds,
            "cpu_seconds": cpu,
            "cpu_speedup": full_cpu / cpu,
            "chosen": (sel.start, sel.stop),
            "value": sel.value,
            "same_choice": (sel.start, sel.stop) == (full.start, full.stop),
        }
        if k is not None:
            sign = -1.0 if full.higher_is_better else 1.0
            screened = sorted(sel.landscape, key=lambda r: sign * r["screened"])
            exact = sorted(full.landscape, key=lambda r: sign * r["value"])
            best = (exact[0]["start"], exact[0]["stop"])
            row["exact_best_screened_rank"] = 1 + [(r["start"], r["stop"]) for r in screened].index(best)
        rows.append(row)
    assert full is not None
    print(
        f"\nlayers=auto ({full.metric}, {args.calibration_images} calibration images, {len(full.landscape)} ranges)"
    )
    print(
        "| screen_top_k | seconds | speed-up | CPU seconds | CPU speed-up | chosen (start, stop) | value | "
        "same choice | exact best's screened rank |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k = "all exact" if r["screen_top_k"] is None else r["screen_top_k"]
        print(
            f"| {k} | {r['seconds']:.1f} | {r['speedup']:.2f}x | {r['cpu_seconds']:.1f} | {r['cpu_speedup']:.2f}x | "
            f"{r['chosen']} | {r['value']:.4f} | {r['same_choice']} | {r.get('exact_best_screened_rank', '')} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64, help="evaluated images (0: only --screen-top-k)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="estimator[:key=value,...]")
    parser.add_argument(
        "--overrides",
        nargs="*",
        default=["model=fashiongrid", "data=fashiongrid"],
        help="Hydra overrides of conf/config.yaml: model, data, layers, method.* (the exact reference)",
    )
    parser.add_argument("--screen-top-k", type=int, nargs="*", default=[], help="layers=auto screening ks")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    cfg = compose_config(overrides)
    model = instantiate(cfg.model).eval()
    datamodule = build_datamodule(cfg, model)
    if not isinstance(instantiate(cfg.method), CAAP):
        raise SystemExit("method must be CAAP (method=caap)")
    out: dict[str, Any] = {"overrides": overrides, "images": args.images}
    if args.images > 0:  # --images 0: only the layers=auto screening
        out["estimators"] = run_estimators(args, cfg, model, datamodule)
    if args.screen_top_k:
        out["layers_auto"] = run_layer_screening(args, overrides, model)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
