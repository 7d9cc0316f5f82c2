"""Run CAAP over every (start, stop) layer range of a model, plus baselines, and print one Markdown table.

    python scripts/layer_range_table.py data.limit=64            # extra args are Hydra overrides for every run
    python scripts/layer_range_table.py --mode hold --baselines random input_x_gradient -- data.limit=64
    python scripts/layer_range_table.py --ranges default --baselines random 'gradient;method.libragrad=true' -- data.limit=48

Each run is `caap.run.evaluate` on the composed config (CSV logger, no media), written under
outputs/layer_table/<name>/; the table lists every metric with the best value per column marked by `*`.
The sweep tooling of the project (Hydra multirun, reports, heatmaps) builds on the same run folders.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from caap.config import register_schemas
from caap.paths import CONF_DIR, REPO_ROOT
from caap.run import evaluate


def compose_run(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", default="hold", choices=["hold", "inject"])
    parser.add_argument("--baselines", nargs="*", default=["random", "input_x_gradient"])
    parser.add_argument(
        "--ranges",
        choices=["all", "default", "none"],
        default="all",
        help="CAAP layer ranges: every (start, stop) pair, only conf/layers/default, or none",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "layer_table")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    register_schemas()
    common = ["logger=csv", "media_images=0", "trainer.enable_progress_bar=false", *args.overrides]
    depth = instantiate(compose_run(common).model).depth

    # a baseline is a method option, optionally with overrides after `;` (e.g. `gradient;method.libragrad=true`)
    runs: list[tuple[str, list[str]]] = [
        (b, [f"method={b.split(';')[0]}", *b.split(";")[1:]]) for b in args.baselines
    ]
    if args.ranges == "default":
        runs.append(("caap[default]", ["method=caap"]))
    for start in range(depth + 1) if args.ranges == "all" else ():
        for stop in range(start + 1, depth + 2):
            stop_arg = "null" if stop == depth + 1 else str(stop)
            runs.append(
                (
                    f"caap[{start}:{stop}]",
                    [
                        "method=caap",
                        f"method.mode={args.mode}",
                        f"layers.start={start}",
                        f"layers.stop={stop_arg}",
                    ],
                )
            )
    rows: dict[str, dict[str, float]] = {}
    for name, overrides in runs:
        out = args.out / "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
        cfg = compose_run([*common, *overrides, f"output_dir={out}"])
        rows[name] = evaluate(cfg)
        print(f"{name}: {json.dumps(rows[name])}", flush=True)

    metrics = list(next(iter(rows.values())))
    lower_better = {"deletion", "mif", "completeness"}  # the metrics whose lower values are better
    best = {
        m: (min if m in lower_better else max)(r[m] for r in rows.values() if r[m] == r[m]) for m in metrics
    }
    print(
        "\n| run | "
        + " | ".join(f"{m} ({'lower' if m in lower_better else 'higher'})" for m in metrics)
        + " |"
    )
    print("|---|" + "---|" * len(metrics))
    for name, r in rows.items():
        cells = [f"{r[m]:.4f}{'*' if r[m] == best[m] else ''}" for m in metrics]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
