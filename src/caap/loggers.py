"""W&B for evaluation runs: the `WandbLogger` and what its run carries for a dashboard.

`WandbLogger` is Lightning's W&B logger, minus the `anonymous=None` it always hands to `wandb.init` (wandb
deprecated the setting and warns whenever it is passed, even as None, so every run printed it).

`wandb_init_arguments` gives each job run what a dashboard filters, groups and overlays on: `job_type`
(`eval`; the report run of `caap.report` is `report`), the sweep's group (unique per sweep, see
`caap.sweep.sweep_group`) and in its config the short method name (`method_name`, the `method=` option) and
the layer range (`layer_range`, `"start:stop"` over residual positions, for methods that have one). What the
run logs at its end (values, CIs, directions, curves, per-image table) is `caap.lit.callbacks.WandbMedia`.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

#: `job_type` of the W&B run of one evaluation (the report's summary run is "report")
EVAL_JOB_TYPE = "eval"


class WandbLogger(LightningWandbLogger):
    """Lightning's `WandbLogger` (same arguments) without the deprecated `anonymous` key when it is unset."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # Lightning passes None unless anonymous=True
            self._wandb_init.pop("anonymous", None)


def dashboard_config(method_name: str, layer_range: tuple[int, int] | None) -> dict[str, Any]:
    """The config keys a dashboard filters and groups runs by: `method_name` (e.g. `caap`, `gradient`,
    `libragrad_fullgrad_plus`) and `layer_range` (`"0:2"`, None for a method without one)."""
    return {
        "method_name": method_name,
        "layer_range": None if layer_range is None else f"{layer_range[0]}:{layer_range[1]}",
    }


def wandb_init_arguments(
    node: Any,
    config: dict[str, Any],
    name: str,
    group: str | None,
    wandb_id: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for the logger config `node` (a `WandbLogger` entry of the logger group): the run's
    `config`, `name` and `group` where the node leaves them null, `job_type` `eval` unless the node sets one,
    and `id` / `resume` to continue the W&B run `wandb_id` (a resumed run, see `caap.resume`)."""
    extra: dict[str, Any] = {"config": config}
    if node.get("name") is None:
        extra["name"] = name
    if node.get("group") is None and group is not None:
        extra["group"] = group
    if node.get("job_type") is None:
        extra["job_type"] = EVAL_JOB_TYPE
    if wandb_id is not None and node.get("id") is None:
        extra.update(id=wandb_id, resume="allow")
    return extra
