"""`python -m caap` (and the `caap` console script): the Hydra app around `caap.run.evaluate`."""

from __future__ import annotations

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
def main(cfg: DictConfig) -> dict[str, float]:
    """Compose the config, evaluate, return the metrics (Hydra's multirun collects them)."""
    from caap.run import evaluate  # imported here so `--help` and `--cfg job` stay fast

    return evaluate(cfg)


if __name__ == "__main__":
    main()
