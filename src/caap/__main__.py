"""`python -m caap` (and the `caap` console script): the Hydra app around `caap.run.evaluate`."""

from __future__ import annotations

import sys
import warnings

import hydra
from omegaconf import DictConfig

from caap.config import register_schemas
from caap.paths import CONF_DIR

register_schemas()
# Lightning 2.6's own pytree helper still builds torch's deprecated LeafSpec on every batch; the warning is
# about Lightning's code, not caap's or the user's (DDP workers re-run this module and get the filter too).
warnings.filterwarnings(
    "ignore",
    message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    category=FutureWarning,
    module=r"lightning\.pytorch\.utilities\._pytree",
)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> dict[str, float]:
    """Compose the config, evaluate, return the metrics (Hydra's multirun collects them)."""
    from caap.run import evaluate  # imported here so `--help` and `--cfg job` stay fast

    return evaluate(cfg)


def main() -> None:
    """The Hydra app, after refusing a `resume=` path that holds no run: Hydra would create the folder first
    (it is the run folder), so a typo would start a new run there."""
    from caap.resume import check_resume_arguments

    try:
        check_resume_arguments(sys.argv[1:])
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"Error: {err}")
    app()


if __name__ == "__main__":
    main()
