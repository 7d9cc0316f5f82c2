"""`AttributionDataModule`: the evaluation data of a run, limited, sharded and split across DDP ranks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from caap.data.collate import collate_skip_none
from caap.data.sampler import ContiguousDistributedSampler, world

log = logging.getLogger(__name__)


def select_indices(
    n: int,
    limit: int | None = None,
    shard: int = 0,
    num_shards: int = 1,
    readable: Callable[[int], bool] | None = None,
) -> list[int]:
    """Dataset indices a run evaluates: the first `limit` of range(n) that `readable` accepts (every index when
    None; asked in order, only until `limit` are found), then every `num_shards`-th from `shard`."""
    if num_shards < 1:
        raise ValueError(f"data.num_shards must be >= 1; got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"data.shard must lie in [0, data.num_shards={num_shards}); got data.shard={shard}")
    if limit is not None and limit < 1:
        raise ValueError(f"data.limit must be a positive number of samples or null; got {limit}")
    if readable is None:
        chosen = list(range(n if limit is None else min(limit, n)))
    else:
        chosen = []
        for index in range(n):
            if limit is not None and len(chosen) == limit:
                break
            if readable(index):
                chosen.append(index)
    return chosen[shard::num_shards]


class AttributionDataModule(L.LightningDataModule):
    """Serves a dataset's selected samples, in batches, to `Trainer.test` / `Trainer.predict`.

    Args:
      dataset: a map-style dataset of dict samples (`{image [3, H, W], target [C], index, ...}`), or a zero-arg
        callable returning one (Hydra's `_partial_: true`); a callable is called on first use.
      batch_size: samples per batch B.
      num_workers: DataLoader worker processes.
      limit: evaluate only the first `limit` samples (None: all).
      shard, num_shards: of those, take indices[shard::num_shards] (to split one evaluation over several jobs).
      pin_memory: pin host memory, so that Lightning's `non_blocking` copies to the GPU overlap the step (default:
        when the attached Trainer runs on CUDA; without a Trainer, when CUDA is available).

    Batches are `collate_skip_none` batches (`{image [B, 3, H, W], target [B, C], index [B], ...}`), or None when
    every sample of a batch was unreadable; steps must skip a None batch.

    Under DDP (an initialised `torch.distributed` group of world size > 1) the selected indices are split into
    contiguous blocks per rank by `ContiguousDistributedSampler`: no padding and no repeated samples, so ranks
    may run different numbers of batches. The Trainer must be built with `use_distributed_sampler=False`, or
    Lightning would wrap the sampler in a padding `DistributedSampler`.

    Attributes: `dataset` (the full dataset), `indices` (the selected dataset indices, before the DDP split),
    `num_classes` and `class_names` (from the dataset's `num_classes` and `class_names` / `classes`, else None),
    `has_labels` (the dataset's, else True).
    """

    def __init__(
        self,
        dataset: Dataset | Callable[[], Dataset],
        batch_size: int = 32,
        num_workers: int = 0,
        limit: int | None = None,
        shard: int = 0,
        num_shards: int = 1,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be positive; got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0; got {num_workers}")
        select_indices(0, limit, shard, num_shards)  # validate early, before the dataset is built
        self._dataset_or_factory = dataset
        self._dataset: Dataset | None = None
        self._indices: list[int] | None = None
        self.batch_size, self.num_workers = batch_size, num_workers
        self.limit, self.shard, self.num_shards = limit, shard, num_shards
        self.pin_memory = pin_memory

    @property
    def dataset(self) -> Dataset:
        """The full dataset (built from the factory on first access)."""
        if self._dataset is not None:
            return self._dataset
        dataset: Dataset
        source = self._dataset_or_factory
        if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
            dataset = source  # type: ignore[assignment]
        elif callable(source):
            dataset = source()
        else:
            raise TypeError(
                f"AttributionDataModule needs a map-style dataset or a zero-arg callable returning one; "
                f"got {type(source).__name__}"
            )
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(
                f"AttributionDataModule: the dataset factory returned {type(dataset).__name__}, "
                f"not a map-style dataset"
            )
        self._dataset = dataset
        return dataset

    def readable(self, index: int) -> bool:
        """Whether sample `index` can be read (the dataset's `readable`, e.g. PIL decodes the file; True when the
        dataset has none: generated data)."""
        check = getattr(self.dataset, "readable", None)
        return True if check is None else bool(check(index))

    @property
    def indices(self) -> list[int]:
        """The selected dataset indices: the first `limit` readable samples, then shard `shard` of `num_shards`.

        Unreadable samples are found here, once (the dataset names each in a warning; one more warning gives
        the count), so that every later stage (setup checks, calibration, loading) sees readable images only.
        """
        if self._indices is None:
            skipped: list[int] = []

            def readable(index: int) -> bool:
                ok = self.readable(index)
                if not ok:
                    skipped.append(index)
                return ok

            self._indices = select_indices(
                len(self.dataset),  # type: ignore[arg-type]
                self.limit,
                self.shard,
                self.num_shards,
                readable if hasattr(self.dataset, "readable") else None,
            )
            if skipped:
                describe = getattr(self.dataset, "describe", str)
                named = ", ".join(describe(i) for i in skipped[:20]) + (", ..." if len(skipped) > 20 else "")
                log.warning("AttributionDataModule: left out %d unreadable image(s): %s", len(skipped), named)
            if not self._indices:
                log.warning(
                    "AttributionDataModule: no samples selected (dataset of %d, limit=%s, shard %d of %d)",
                    len(self.dataset),  # type: ignore[arg-type]
                    self.limit,
                    self.shard,
                    self.num_shards,
                )
        return self._indices

    def exclude(self, indices: Sequence[int]) -> None:
        """Drop `indices` from the evaluated images (e.g. the calibration images of `layers=auto`)."""
        drop = set(int(i) for i in indices)
        self._indices = [i for i in self.indices if i not in drop]

    @property
    def num_classes(self) -> int | None:
        """The dataset's `num_classes`, or None."""
        return getattr(self.dataset, "num_classes", None)

    @property
    def has_labels(self) -> bool:
        """Whether the samples' `target` holds class labels (the dataset's `has_labels`; True when it has none):
        `target=label` needs them (ImageNet-Segmentation or an image folder without labels has all-zero targets)."""
        return bool(getattr(self.dataset, "has_labels", True))

    @property
    def class_names(self) -> Sequence[str] | None:
        """The dataset's `class_names` (or `classes`), or None."""
        names = getattr(self.dataset, "class_names", None)
        return names if names is not None else getattr(self.dataset, "classes", None)

    def setup(self, stage: str | None = None) -> None:
        """Build the dataset and the index selection (idempotent)."""
        _ = self.indices

    def sampler(
        self, num_replicas: int | None = None, rank: int | None = None
    ) -> ContiguousDistributedSampler:
        """This rank's share of `indices` (all of them without DDP); rank / world size default to torch.distributed."""
        return ContiguousDistributedSampler(self.indices, num_replicas=num_replicas, rank=rank)

    def pins_memory(self) -> bool:
        """Whether the loaders pin host memory: `pin_memory`, else whether the Trainer's device is CUDA."""
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        strategy = getattr(getattr(self, "trainer", None), "strategy", None)
        if strategy is not None:
            return strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def _loader(self) -> DataLoader:
        _, world_size = world()
        if world_size > 1:
            connector = getattr(getattr(self, "trainer", None), "_accelerator_connector", None)
            if getattr(connector, "use_distributed_sampler", False):
                log.warning(
                    "AttributionDataModule under DDP with use_distributed_sampler=True: Lightning will pad and "
                    "repeat samples; build the Trainer with use_distributed_sampler=False"
                )
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler(),
            num_workers=self.num_workers,
            collate_fn=collate_skip_none,
            pin_memory=self.pins_memory(),
            drop_last=False,
        )

    def test_dataloader(self) -> DataLoader:
        """Batches of this rank's share of the selected samples, in index order."""
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        """Same as `test_dataloader`."""
        return self._loader()

    def __repr__(self) -> str:
        return (
            f"AttributionDataModule(dataset={type(self._dataset_or_factory).__name__}, batch_size={self.batch_size}, "
            f"limit={self.limit}, shard={self.shard}/{self.num_shards})"
        )
