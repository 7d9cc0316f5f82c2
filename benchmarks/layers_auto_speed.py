"""`layers=auto` landscape speed: CAAP maps for every layer range, shared work vs one CAAP call per range.

`CAAP.range_maps` runs the source pass, the neutral prefixes and the unpatched neutral logits once for all
ranges, then the patched runs of each start as one trunk with a branch per stop; the baseline calls `CAAP(start, stop).attribute` for
each range (a source and neutral pass per range). Same model, same images, one run, interleaved, best of
`--repeats`; prints seconds and the baseline/shared ratio, and checks the maps agree.

Example:
    python benchmarks/layers_auto_speed.py --images 32 --repeats 2
"""

from __future__ import annotations

import argparse
import time

import torch

from caap.data import FashionGrid
from caap.methods.caap import CAAP
from caap.models import build_model
from caap.models.layers import all_layer_ranges


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model("vit_fashiongrid_patch7_56", pretrained=True, multilabel=True).eval()
    data = FashionGrid(split="test", size=10000, seed=0)
    samples = [data[len(data) - 1 - i] for i in range(args.images)]
    images = torch.stack([s["image"] for s in samples])
    target = torch.stack([s["target"] for s in samples]).argmax(-1)
    ranges = all_layer_ranges(model.depth)
    method = CAAP(score="delta")

    def shared() -> dict:
        return dict(method.range_maps(model, images, target, ranges))

    def per_range() -> dict:
        return {
            (s, e): CAAP(start=s, stop=e, score="delta").attribute(model, images, target) for s, e in ranges
        }

    best = {"shared": float("inf"), "per_range": float("inf")}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in (("shared", shared), ("per_range", per_range)):
            t0 = time.perf_counter()
            outputs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    worst = max((outputs["shared"][r] - outputs["per_range"][r]).abs().max().item() for r in ranges)
    print(
        f"{len(ranges)} ranges x {args.images} images, {torch.get_num_threads()} threads (best of {args.repeats})"
    )
    print(f"  shared work (range_maps): {best['shared']:.2f} s")
    print(f"  one CAAP call per range : {best['per_range']:.2f} s")
    print(f"  ratio per-range / shared: {best['per_range'] / best['shared']:.2f}x   max |diff| {worst:.2e}")


if __name__ == "__main__":
    main()
