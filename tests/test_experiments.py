"""The experiment presets of conf/experiment expand into the intended job lists (composed, nothing run)."""

from __future__ import annotations

from typing import Any

import yaml
from hydra import initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig

from caap.config import register_schemas
from caap.methods.libragrad import PRESETS
from caap.models.layers import all_layer_ranges, resolve_layer_range
from caap.paths import CONF_DIR
from caap.references import IMAGE_KINDS, build_reference


def sweep_jobs(*overrides: str, compose: bool = True) -> tuple[list[list[str]], list[DictConfig]]:
    """The job overrides the configured sweeper launches for `python -m caap -m *overrides`, and (`compose`)
    each job's composed config: what Hydra's multirun does up to the launcher (about 0.15 s a job)."""
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        cfg = loader.load_configuration("config", list(overrides), run_mode=RunMode.MULTIRUN)
        context = HydraContext(config_loader=loader, callbacks=Callbacks(cfg))
        sweeper = Plugins.instance().instantiate_sweeper(
            config=cfg, hydra_context=context, task_function=lambda _: None
        )
        arguments = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
        arguments += list(cfg.hydra.overrides.task)
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
        jobs = [job for batch in sweeper.split_arguments(parsed, None) for job in batch]
        return jobs, [loader.load_sweep_config(cfg, job) for job in jobs] if compose else []


def compose_job(job: list[str]) -> DictConfig:
    """One job's composed config, as the launcher composes it."""
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return loader.load_configuration("config", job, run_mode=RunMode.MULTIRUN)


def values(job: list[str]) -> dict[str, str]:
    return dict(o.lstrip("+").split("=", 1) for o in job)


def method_options() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


def choice(cfg: DictConfig, group: str) -> Any:
    return cfg.hydra.runtime.choices[group]


def test_layer_sweep_is_every_valid_range_of_the_model() -> None:
    jobs, _ = sweep_jobs("experiment=layer_sweep", compose=False)
    assert len(jobs) == 28  # the 6-block FashionGrid ViT: positions 0..6
    ranges = [(int(values(j)["layers.start"]), int(values(j)["layers.stop"])) for j in jobs]
    assert ranges == all_layer_ranges(6)
    assert all(resolve_layer_range(s, e, 6) == (s, e) for s, e in ranges)
    for job in (jobs[0], jobs[-1]):  # a job composes to CAAP over its range
        cfg = compose_job(job)
        assert choice(cfg, "method") == "caap" and cfg.hydra.mode.name == "MULTIRUN"
        assert (cfg.method.start, cfg.method.stop) == (
            int(values(job)["layers.start"]),
            int(values(job)["layers.stop"]),
        )
    # the depth comes from the composed model, and other sweeps multiply with the generated ranges
    jobs, _ = sweep_jobs(
        "experiment=layer_sweep", "model=vit_small_random", "method.mode=hold,inject", compose=False
    )
    assert len(jobs) == 2 * len(all_layer_ranges(12)) == 182
    pairs = [values(job) for job in jobs]
    assert {(v["method.mode"], int(v["layers.start"]), int(v["layers.stop"])) for v in pairs} == {
        (m, s, e) for m in ("hold", "inject") for s, e in all_layer_ranges(12)
    }


def test_caap_vs_baselines_is_every_method_on_the_same_images() -> None:
    rest = ["data.limit=8", "experiment=caap_vs_baselines"]
    jobs, _ = sweep_jobs("experiment=caap_vs_baselines", "data.limit=8", compose=False)
    assert sorted(values(j)["method"] for j in jobs) == method_options()
    # the jobs differ in the method only: same images, metrics and seed
    assert all(sorted(j) == sorted([f"method={values(j)['method']}", *rest]) for j in jobs)


def test_neutral_sweep_covers_every_file_free_neutral_context() -> None:
    _, cfgs = sweep_jobs("experiment=neutral_sweep")
    kinds = [c.method.neutral.kind for c in cfgs]
    assert sorted(kinds) == sorted(k for k in IMAGE_KINDS if k != "image")  # `image` needs a file
    for cfg in cfgs:
        assert choice(cfg, "method") == "caap"
        assert build_reference(dict(cfg.method.neutral)).kind == cfg.method.neutral.kind


def test_libragrad_ablation_is_every_gradient_method_times_every_preset() -> None:
    jobs, _ = sweep_jobs("experiment=libragrad_ablation", compose=False)
    # the gradient family: the method files that define `libragrad` themselves (not presets of another file)
    family = []
    for name in method_options():
        node = yaml.safe_load((CONF_DIR / "method" / f"{name}.yaml").read_text())
        if "libragrad" in node and "defaults" not in node:
            family.append(name)
    presets = {"false", *PRESETS}
    assert {(values(j)["method"], values(j)["method.libragrad"].lower()) for j in jobs} == {
        (m, p) for m in family for p in presets
    }
    assert len(jobs) == len(family) * len(presets)
    # each job composes (a preset value the config accepts); checked on the jobs of one method
    _, cfgs = sweep_jobs("experiment=libragrad_ablation", "method=genatt")
    assert sorted(str(c.method.libragrad).lower() for c in cfgs) == sorted(presets)
