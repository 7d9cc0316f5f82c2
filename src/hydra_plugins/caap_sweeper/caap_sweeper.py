"""`hydra/sweeper=caap`: Hydra's basic sweeper plus generated sweeps that depend on the composed config.

A parameter `layers=all_pairs` (in `hydra.sweeper.params`, as `experiment=layer_sweep` sets it) becomes one
job per valid CAAP layer range `(layers.start, layers.stop)` of the model the job composes, from
`caap.models.layers.all_layer_ranges(depth)`: 28 jobs for the 6-block FashionGrid ViT, 91 for ViT-B/16. The
depth is read from each job's composed model config (`caap.models.model_depth`, a weightless meta-device
build), so a sweep over several models gets each model's own ranges. Everything else (comma lists, `range()`,
`glob()`, `max_batch_size`, the launcher) is the basic sweeper's.

Hydra's sweeper plugins that could generate values (Ax, Optuna, Nevergrad) search a fixed space; none
derives a grid from the composed config, hence this small subclass.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Override

log = logging.getLogger(__name__)

#: `{key: {value: generator}}`: a parameter `key=value` expands into the job overrides that
#: `generator(job_config)` returns (one list of override strings per generated job).
GENERATED: dict[str, dict[str, Callable[[Any], list[list[str]]]]] = {}


def layer_pairs(job_config: Any) -> list[list[str]]:
    """`[["layers.start=S", "layers.stop=E"], ...]`: every valid CAAP range of the job's model."""
    from caap.models import model_depth
    from caap.models.layers import all_layer_ranges

    depth = model_depth(job_config.model)
    return [[f"layers.start={start}", f"layers.stop={stop}"] for start, stop in all_layer_ranges(depth)]


GENERATED["layers"] = {"all_pairs": layer_pairs}


@dataclass
class CaapSweeperConf:
    """Same keys as Hydra's basic sweeper: `params` ({key: sweep}) and `max_batch_size`.

    (No `from __future__ import annotations` in this module: Hydra's plugin scan loads it outside
    `sys.modules`, where dataclasses cannot resolve string annotations.)"""

    _target_: str = "hydra_plugins.caap_sweeper.caap_sweeper.CaapSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] = field(default_factory=dict)  # {} (not None): `+hydra.sweeper.params.k=v` works


ConfigStore.instance().store(group="hydra/sweeper", name="caap", node=CaapSweeperConf, provider="caap")


def _generator(override: Override) -> Callable[[Any], list[list[str]]] | None:
    if override.is_sweep_override() or override.package is not None:
        return None
    value = override.value()
    if not isinstance(value, str):
        return None
    return GENERATED.get(override.get_key_element(), {}).get(value)


class CaapSweeper(BasicSweeper):
    """The basic sweeper, with the parameters of `GENERATED` (e.g. `layers=all_pairs`) expanded per job."""

    def split_arguments(  # type: ignore[override]  # an instance method: expansion composes job configs
        self, overrides: list[Override], max_batch_size: int | None
    ) -> list[list[list[str]]]:
        """The jobs of the sweep in batches of at most `max_batch_size`, generated parameters expanded."""
        generated = [(o, g) for o in overrides if (g := _generator(o)) is not None]
        plain = [o for o in overrides if _generator(o) is None]
        jobs = BasicSweeper.split_arguments(plain, None)[0]
        for override, generator in generated:
            jobs = [
                [*job, *extra] for job in jobs for extra in generator(self._compose(job, override.input_line))
            ]
            log.info(f"caap sweeper: {override.input_line} -> {len(jobs)} jobs")
        if max_batch_size is None:
            return [jobs]
        return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size))

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        """The next batch of jobs; before the first, the true job count goes to the sweep folder for
        `[job k/N]` (`caap.sweep.JobProgress` cannot count generated values itself)."""
        if self.batch_index == 0 and self.overrides is not None and self.config is not None:
            from caap.sweep import write_sweep_size

            write_sweep_size(self.config.hydra.sweep.dir, sum(len(batch) for batch in self.overrides))
        return super().get_job_batch()

    def _compose(self, job: list[str], what: str | None) -> Any:
        """The composed config of one job (before its generated overrides)."""
        assert self.hydra_context is not None and self.config is not None
        try:
            return self.hydra_context.config_loader.load_sweep_config(self.config, list(job))
        except Exception as err:
            raise ValueError(f"caap sweeper: cannot compose the job {job} to expand '{what}': {err}") from err


__all__ = ["GENERATED", "CaapSweeper", "CaapSweeperConf", "layer_pairs"]
