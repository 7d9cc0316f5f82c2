"""Where `build_model`'s weights come from, whether they fit the model, and messages that say what is wrong.

`model.weights=PATH` reads safetensors, a PyTorch checkpoint (`torch.load(weights_only=True)`: tensors only, never
code) or an original JAX `.npz` (AugReg / big_vision layout, loaded by timm's own npz loader);
`model.pretrained=true` downloads through timm and huggingface_hub as timm does, except under `HF_HUB_OFFLINE=1`,
where only the local Hugging Face cache is used. A checkpoint's head is never replaced silently: a different
`model.num_classes` is refused unless `model.reset_head=true` asks for a new random head.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

log = logging.getLogger(__name__)

NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")  # the layouts timm's npz loader reads
SHOWN_KEYS = 6  # keys listed per kind of difference in a "does not fit" message


@dataclass(frozen=True)
class WeightsSource:
    """The weights `build_model` loads: timm's `pretrained_cfg_overlay` that points at them (None: the model's
    own pretrained weights), the number of classes of their head (None: unknown, timm's pretrained config
    decides) and how messages name them."""

    overlay: dict[str, Any] | None
    head_classes: int | None
    description: str
    path: Path | None = None


def local_weights(path: Path, name: str) -> WeightsSource:
    """The checkpoint file `path` for model `name`, checked to be readable (see `checkpoint_shapes`) and with the
    size of its head read from it."""
    cfg = timm.get_pretrained_cfg(name)
    classifier = cfg.classifier if cfg is not None else "head"
    description = f"model.weights={path}"
    if path.suffix == ".npz":
        return WeightsSource(
            dict(file=str(path), custom_load=True), npz_head_classes(path), description, path
        )
    shapes = checkpoint_shapes(path)
    first = classifier[0] if isinstance(classifier, tuple | list) else classifier
    head = shapes.get(f"{first}.weight") if first else None
    classes = int(head[0]) if head is not None and len(head) == 2 else None
    return WeightsSource(dict(file=str(path)), classes, description, path)


def hub_weights(name: str) -> WeightsSource:
    """The pretrained weights of timm model `name` (its pretrained config: a shipped file or the Hugging Face
    Hub). Offline (`HF_HUB_OFFLINE=1`), weights missing from the local cache are refused here, with how to
    provide them; online, timm downloads them into the cache."""
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        require_cached_weights(name)
    cfg = timm.get_pretrained_cfg(name)
    classes = int(cfg.num_classes) if cfg is not None and cfg.num_classes is not None else None
    return WeightsSource(None, classes, f"the pretrained weights of '{name}'")


def classes_to_build(
    requested: int | None, source: WeightsSource | None, reset_head: bool
) -> tuple[int | None, bool]:
    """(the head size to build the timm model with, whether to replace its head after loading).

    The model is built with the weights' own head so that every tensor loads strictly; a different
    `model.num_classes` is an error unless `reset_head` is set, then the head is replaced after loading.
    `requested=None` follows the weights' head (a fine-tuned checkpoint keeps its classes).
    """
    if source is None or source.head_classes is None:
        return requested, reset_head and source is not None
    if requested is None or requested == source.head_classes:
        return source.head_classes, reset_head
    if not reset_head:
        raise ValueError(
            f"model.num_classes={requested} but the head of {source.description} has {source.head_classes} "
            f"classes: drop model.num_classes to use that head, or set model.reset_head=true to replace it by "
            f"a new random head of {requested} classes (recorded in the run's config.yaml)"
        )
    return source.head_classes, True


def new_random_head(model: Any, num_classes: int, source: WeightsSource) -> None:
    """Replace the classifier head of the timm `model` by a new random one of `num_classes` outputs (timm's
    `reset_classifier`; DeiT's distillation head too), saying so in the log."""
    log.warning(
        "model.reset_head=true: the head of %s is replaced by a new random head of %d classes",
        source.description,
        num_classes,
    )
    model.reset_classifier(num_classes)


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the safetensors or PyTorch checkpoint at `path`, as timm will load it
    (EMA weights first, `state_dict` / `model` wrappers unwrapped). Raises ValueError "not a valid safetensors /
    PyTorch checkpoint: <path>" for a file that is neither (random bytes, a truncated download, a pickle that
    needs more than tensors: pickles are read with `weights_only=True`)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # the header only: no tensor is read
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        else:
            state = timm.models.load_state_dict(str(path), weights_only=True)
            shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    except Exception as err:  # safetensors, zip, pickle and torch raise many types for a bad file
        raise ValueError(invalid_checkpoint_message(path, err)) from err
    if not shapes:
        raise ValueError(invalid_checkpoint_message(path, "it holds no tensors"))
    return shapes


def first_sentence(reason: object) -> str:
    """The first sentence of an error (readers' messages go on with advice that does not apply here, e.g.
    torch's "retry with weights_only=False"); the exception type when it has no text."""
    text = str(reason).strip()
    if not text:
        return type(reason).__name__
    line = text.splitlines()[0]
    return line.split(". ")[0].rstrip(".")


def invalid_checkpoint_message(path: Path, reason: object) -> str:
    """The message for a weights file that cannot be read, with the reader's reason."""
    return (
        f"not a valid safetensors / PyTorch checkpoint: {path} ({first_sentence(reason)}). model.weights takes "
        f"a .safetensors "
        f"file, a PyTorch state dict (read with torch.load(weights_only=True): tensors only) or an AugReg / "
        f"big_vision .npz"
    )


def npz_arrays(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every array in the `.npz` at `path`; ValueError naming the file when it is not one."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise ValueError("a single array, not an archive of named arrays")
            return {k: tuple(npz[k].shape) for k in npz.files}
    except Exception as err:
        raise ValueError(f"not a valid .npz checkpoint: {path} ({first_sentence(err)})") from err


def npz_prefix(arrays: Mapping[str, tuple[int, ...]], path: Path) -> str:
    """The key prefix of an AugReg / big_vision npz (`params/` ...), as timm's npz loader finds it."""
    for prefix in NPZ_PREFIXES:
        if f"{prefix}embedding/kernel" in arrays:
            return prefix
    raise ValueError(
        f"{path} is not an AugReg / big_vision ViT checkpoint: it has no 'embedding/kernel' array "
        f"(keys: {sorted(arrays)[:SHOWN_KEYS]})"
    )


def npz_head_classes(path: Path) -> int | None:
    """The number of classes of the head of the AugReg / big_vision `.npz` at `path` (None: headless)."""
    arrays = npz_arrays(path)
    bias = arrays.get(f"{npz_prefix(arrays, path)}head/bias")
    return int(bias[-1]) if bias else None


def npz_depth(path: Path) -> int:
    """The number of transformer blocks in the AugReg / big_vision `.npz` at `path`."""
    arrays = npz_arrays(path)
    prefix = npz_prefix(arrays, path)
    scanned = arrays.get(f"{prefix}Transformer/encoderblock/LayerNorm_0/scale")
    if scanned is not None:  # big_vision's scanned layout stacks the blocks on the first axis
        return int(scanned[0])
    pattern = re.compile(rf"^{re.escape(prefix)}Transformer/encoderblock_(\d+)/")
    return len({m.group(1) for k in arrays if (m := pattern.match(k))})


def check_npz_depth(model: torch.nn.Module, path: Path, name: str) -> None:
    """timm's npz loader fills the first blocks of a deeper checkpoint without a word: refuse a depth
    mismatch."""
    blocks = getattr(model, "blocks", None)
    depth = npz_depth(path)
    if blocks is not None and depth != len(blocks):
        raise ValueError(
            f"model.weights={path} does not fit '{name}': the checkpoint has {depth} transformer blocks, the "
            f"model {len(blocks)}"
        )


def fit_report(checkpoint: Mapping[str, tuple[int, ...]], model: Mapping[str, tuple[int, ...]]) -> str:
    """Which keys and shapes of a checkpoint differ from a model's state dict (name -> shape each), in words."""

    def listed(keys: list[str]) -> str:
        more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
        return ", ".join(keys[:SHOWN_KEYS]) + more

    parts = []
    only_checkpoint = sorted(set(checkpoint) - set(model))
    only_model = sorted(set(model) - set(checkpoint))
    shapes = sorted(k for k in set(checkpoint) & set(model) if tuple(checkpoint[k]) != tuple(model[k]))
    if only_checkpoint:
        parts.append(f"keys only in the checkpoint: {listed(only_checkpoint)}")
    if only_model:
        parts.append(f"keys only in the model: {listed(only_model)}")
    if shapes:
        shown = [f"{k} (checkpoint {list(checkpoint[k])}, model {list(model[k])})" for k in shapes]
        parts.append(f"different shapes: {listed(shown)}")
    return "; ".join(parts) or "same keys and shapes (the loader failed for another reason)"


def does_not_fit_message(
    source: WeightsSource, name: str, model_shapes: Mapping[str, tuple[int, ...]], err: BaseException
) -> str:
    """The message for weights that cannot be loaded into model `name`: the differing keys / shapes (against
    the model's state dict `model_shapes`) and timm's own error on one line."""
    assert source.path is not None
    timm_said = first_sentence(err)
    if source.path.suffix == ".npz":
        report = "timm's npz loader could not map it"
    else:
        report = fit_report(checkpoint_shapes(source.path), model_shapes)
    return (
        f"{source.description} does not fit '{name}' (a checkpoint of another architecture or size?): "
        f"{report}. timm said: {timm_said}"
    )


def require_cached_weights(name: str) -> None:
    """Raise a RuntimeError saying how to provide `name`'s pretrained weights offline when its Hugging Face
    weights are not in the local cache (checked without any network access). Models whose pretrained config
    names a local file (the shipped FashionGrid model) pass."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.get_pretrained_cfg(name)
    if cfg is None or cfg.file or not cfg.hf_hub_id:
        return
    repo = cfg.hf_hub_id.rstrip("/")
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
    files += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in files):
        return
    raise RuntimeError(
        f"pretrained weights of '{name}' are not in the Hugging Face cache ({repo}) and HF_HUB_OFFLINE=1 "
        f"forbids downloading them. Unset HF_HUB_OFFLINE on a machine with network access (timm downloads them "
        f"into the cache), copy the cache (HF_HOME, e.g. after `huggingface-cli download {repo}`) from one, or "
        f"pass a local file with model.weights=/path/to/model.safetensors; model.pretrained=false gives random "
        f"weights (explicitly, for tests only)."
    )
