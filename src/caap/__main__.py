"""`python -m caap` (and the `caap` console script): the Hydra app around `caap.run.evaluate`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from caap.config import register_schemas
from caap.paths import CONF_DIR

register_schemas()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float]:
    """Compose the config, evaluate, return the metrics (Hydra's multirun collects them)."""
    from caap.run import evaluate  # imported here so `--help` and `--cfg job` stay fast

    return evaluate(cfg)


if __name__ == "__main__":
    main()
