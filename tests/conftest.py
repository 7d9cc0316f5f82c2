"""Shared fixtures: composing the Hydra config offline, small models and batches."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from caap.config import register_schemas
from caap.paths import CONF_DIR

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# timm downloads missing pretrained weights when online: the suite never does (test_weights fakes the hub).
# Set before huggingface_hub is imported: it reads the variable once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`make test` runs one worker per core) each worker computes on one thread.
torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else min(2, torch.get_num_threads()))


@pytest.fixture
def compose_cfg(tmp_path) -> Callable[..., DictConfig]:
    """Compose conf/config.yaml with overrides, writing outputs under the test's tmp_path."""
    register_schemas()

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=[f"output_dir={tmp_path / 'run'}", *overrides])

    return _compose


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest (and without oversubscription next to other jobs) on one intra-op thread; use
    with `pytestmark = pytest.mark.usefixtures("one_torch_thread")` in a test module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
