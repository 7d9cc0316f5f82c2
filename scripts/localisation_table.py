"""Localisation metrics (conf/metric/localisation.yaml) per method on FashionGrid: one Markdown table.

    python scripts/localisation_table.py -- data.limit=64
    python scripts/localisation_table.py --methods caap input_x_gradient random 'gradient;method.libragrad=true' -- data.limit=64

Each run is `caap.run.evaluate` with `metric=localisation` (CSV logger, no media) under
outputs/localisation_table/<name>/; the best value per column is marked by `*` (class discrimination: lowest).
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
    parser.add_argument("--methods", nargs="*", default=["caap", "input_x_gradient", "random"])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "localisation_table")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    register_schemas()
    common = ["metric=localisation", "logger=csv", "media_images=0", "trainer.enable_progress_bar=false"]
    rows: dict[str, dict[str, float]] = {}
    lower_better: set[str] = set()
    for method in args.methods:
        name, *extra = method.split(";")
        out = args.out / "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in method)
        cfg = compose_run([*common, f"method={name}", *extra, *args.overrides, f"output_dir={out}"])
        rows[method] = evaluate(cfg)
        lower_better |= {k for k, node in cfg.metric.items() if not instantiate(node).higher_is_better}
        print(f"{method}: {json.dumps(rows[method])}", flush=True)

    metrics = list(next(iter(rows.values())))
    best = {
        m: (min if m in lower_better else max)(r[m] for r in rows.values() if r[m] == r[m]) for m in metrics
    }
    print("\n| method | " + " | ".join(f"{m} ({'↓' if m in lower_better else '↑'})" for m in metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for method, r in rows.items():
        print(
            f"| {method} | "
            + " | ".join(f"{r[m]:.3f}{'*' if r[m] == best[m] else ''}" for m in metrics)
            + " |"
        )


if __name__ == "__main__":
    main()
