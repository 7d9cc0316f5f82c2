"""Locations the package relies on: the Hydra config folder (conf/ at the repository root)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
