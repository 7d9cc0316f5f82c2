"""`python -m caap.report [DIR ...]`: tables and one HTML page for run or multirun folders (default: the latest)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from caap.report.build import build_report
from caap.report.runs import latest_run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m caap.report", description=__doc__)
    parser.add_argument(
        "dir",
        nargs="*",
        type=Path,
        help="run or multirun folders, reported together (default: the newest under outputs/)",
    )
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: DIR/report)")
    parser.add_argument(
        "--outputs", type=Path, default=Path("outputs"), help="where to look for the newest run"
    )
    parser.add_argument("--rank-by", default=None, help="metric that picks each method's run for the gallery")
    parser.add_argument("--gallery-maps", type=int, default=6, help="(image, class) rows of the map gallery")
    parser.add_argument("--no-wandb", action="store_true", help="do not log a W&B summary run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("WANDB_SILENT", "true")
    source = args.dir or [latest_run_dir(args.outputs)]
    paths = build_report(source, args.out, args.rank_by, not args.no_wandb, args.gallery_maps)
    print((paths["md"]).read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
