"""Cascading-randomisation sanity check (Adebayo et al. 2018) per method: one Markdown table of the mean Spearman
correlation with the original maps at each stage (head, then blocks L-1..0, cumulative).

    python scripts/sanity_table.py -- data.limit=32
    python scripts/sanity_table.py --methods caap input_x_gradient random 'gradient;method.libragrad=true' -- data.limit=32
    python scripts/sanity_table.py --ssim -- data.limit=16          # SSIM per stage instead of Spearman

Each run is `caap.run.evaluate` with `metric=sanity` (CSV logger, no media) under outputs/sanity_table/<name>/.
A method whose maps depend on the learned weights has correlations that fall along the cascade; the random
baseline sits near 0 throughout (its maps never depended on the model).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from caap.config import compose_config
from caap.paths import REPO_ROOT
from caap.run import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="*", default=["caap", "input_x_gradient", "random"])
    parser.add_argument("--ssim", action="store_true", help="tabulate SSIM instead of Spearman")
    parser.add_argument(
        "--independent", action="store_true", help="independent randomisation (one stage at a time)"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "sanity_table")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    common = ["metric=sanity", "logger=csv", "media_images=0", "trainer.enable_progress_bar=false"]
    if args.independent:
        common.append("metric.sanity.cumulative=false")
    rows: dict[str, dict[str, float]] = {}
    for method in args.methods:
        name, *extra = method.split(";")
        out = args.out / "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in method)
        cfg = compose_config([*common, f"method={name}", *extra, *args.overrides, f"output_dir={out}"])
        rows[method] = evaluate(cfg)
        print(f"{method}: {json.dumps(rows[method])}", flush=True)

    prefix = "sanity/ssim/" if args.ssim else "sanity/"
    stages = [
        k[len(prefix) :]
        for k in next(iter(rows.values()))
        if k.startswith(prefix) and "/" not in k[len(prefix) :]
    ]
    kind = "SSIM" if args.ssim else "Spearman"
    how = "independent, one stage at a time" if args.independent else "cascading: cumulative, top first"
    print(f"\nMean {kind} with the original map after model randomisation ({how})\n")
    print("| method | " + " | ".join(stages) + " |" + ("" if args.ssim else " mean over randomised stages |"))
    print("|---|" + "---|" * (len(stages) + (0 if args.ssim else 1)))
    for method, r in rows.items():
        cells = " | ".join(f"{r[prefix + s]:+.3f}" for s in stages)
        print(f"| {method} | {cells} |" + ("" if args.ssim else f" {r['sanity']:+.3f} |"))


if __name__ == "__main__":
    main()
