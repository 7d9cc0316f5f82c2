"""`ContiguousDistributedSampler`: split a list of dataset indices across ranks, in order, without padding.

torch's `DistributedSampler` (which Lightning injects by default) pads the index list so every rank gets the
same count, so some images are evaluated twice and metrics averaged over ranks are biased. For evaluation we
want every selected index exactly once: rank r of w takes the r-th contiguous block, the first `n % w` ranks
one item more than the rest.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch.distributed as dist
from torch.utils.data import Sampler


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised default `torch.distributed` process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def contiguous_split(n: int, rank: int, num_replicas: int) -> range:
    """Positions `[start, stop)` of rank `rank`'s block when n items are split into `num_replicas` blocks."""
    base, extra = divmod(n, num_replicas)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class ContiguousDistributedSampler(Sampler[int]):
    """Yields this rank's contiguous block of `indices` (dataset indices), in order; no padding, no repetition.

    Args:
      indices: the dataset indices to evaluate (e.g. after limit and sharding), or an int n for range(n).
      num_replicas, rank: the world size and this process's rank; default: from the initialised
        `torch.distributed` default group, else 1 and 0 (then the sampler yields every index).

    Over all ranks the blocks cover `indices` exactly once; block sizes differ by at most one, so ranks may run a
    different number of batches: use it with `Trainer(use_distributed_sampler=False)` (else Lightning wraps it
    in a padding `DistributedSampler`) and only for loops with no per-step collectives (test / predict).
    """

    def __init__(
        self, indices: Sequence[int] | int, num_replicas: int | None = None, rank: int | None = None
    ):
        self.indices = list(range(indices)) if isinstance(indices, int) else [int(i) for i in indices]
        default_rank, default_world = world()
        self.num_replicas = default_world if num_replicas is None else num_replicas
        self.rank = default_rank if rank is None else rank
        if self.num_replicas < 1:
            raise ValueError(
                f"ContiguousDistributedSampler num_replicas must be positive; got {self.num_replicas}"
            )
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(
                f"ContiguousDistributedSampler rank must lie in [0, {self.num_replicas}); got {self.rank}"
            )
        self.local = [
            self.indices[i] for i in contiguous_split(len(self.indices), self.rank, self.num_replicas)
        ]

    def __iter__(self) -> Iterator[int]:
        return iter(self.local)

    def __len__(self) -> int:
        return len(self.local)

    def set_epoch(self, epoch: int) -> None:
        """No-op (order is fixed); present for loops that call it on every distributed sampler."""
