"""CAAP maps per second on the CPU for real-size backbones with random weights (ViT-S/16 and ViT-B/16 AugReg).

For each model, in one run (each timing the best of `--repeats`, after a warm-up call except for CAAP, whose
hundreds of passes warm up by themselves): a plain forward pass of the images (the baseline), CAAP (conf/method/caap.yaml
defaults: layers 0:2, black neutral, score delta) and a LibraGrad gradient map. Reported: maps/s, and the cost
of one CAAP map in forward-pass equivalents next to what the engine should cost, `N * (L - start) / L`
partial passes (N patches, L blocks), less with the CLS-only last block.

Example:
    PYTHONPATH=src python benchmarks/backbone_caap_cpu.py --models vit_small_augreg vit_base_augreg --images 1
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
from hydra.utils import instantiate

from caap.config import compose_config
from caap.methods import CAAP
from caap.methods.gradient import Gradient


def build(config: str):
    """The conf/model option with random weights (model.pretrained=false), as a run would build it."""
    cfg = compose_config([f"model={config}", "model.pretrained=false", "output_dir=/tmp/x"])
    return instantiate(cfg.model)


def best_time(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["vit_small_augreg", "vit_base_augreg"])
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for config in args.models:
        model = build(config)
        side = model.image_size[0]
        images = torch.rand(args.images, 3, side, side)
        target = torch.zeros(args.images, dtype=torch.long)
        caap = CAAP(start=args.start, stop=args.stop)
        caap.setup(model)
        grad = Gradient(libragrad="full")

        def forward(model=model, images=images) -> None:
            with torch.no_grad():
                model(images)

        t_fwd = best_time(forward, args.repeats)
        t_caap = best_time(partial(caap, model, images, target), args.repeats, warmup=False)  # N passes: warm
        t_grad = best_time(partial(grad, model, images, target), args.repeats)
        gh, gw = model.grid_size(images)
        n, depth = gh * gw, model.depth
        row = {
            "model": config,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "tokens": n + model.num_prefix_tokens,
            "forward_images_per_s": round(args.images / t_fwd, 2),
            "caap_maps_per_s": round(args.images / t_caap, 4),
            "libragrad_maps_per_s": round(args.images / t_grad, 2),
            "caap_cost_in_forwards": round(t_caap / t_fwd, 1),
            "caap_expected_forwards": round(n * (depth - args.start) / depth, 1),
            "libragrad_cost_in_forwards": round(t_grad / t_fwd, 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(
        f"{'model':20s} {'fwd img/s':>10s} {'CAAP maps/s':>12s} {'x forward':>10s} {'expected':>9s} {'LibraGrad maps/s':>17s}"
    )
    for r in rows:
        print(
            f"{r['model']:20s} {r['forward_images_per_s']:10.2f} {r['caap_maps_per_s']:12.4f} "
            f"{r['caap_cost_in_forwards']:10.1f} {r['caap_expected_forwards']:9.1f} {r['libragrad_maps_per_s']:17.2f}"
        )


if __name__ == "__main__":
    main()
