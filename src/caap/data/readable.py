"""`RememberedReads`: read a dataset's samples by index, skipping the unreadable ones with one warning each.

Shared by the file-backed datasets (`ImageFolderDataset`, the segmentation datasets): the datamodule asks each
index once whether it reads when it selects the images (`AttributionDataModule`), and later reads of a sample
found unreadable return None without trying or warning again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class RememberedReads(Generic[T]):
    """`read(index)`, or None where it raises one of `errors`; the first failure of an index is logged (naming
    `describe(index)` as a `kind`, e.g. "image") and remembered.

    Args:
      read: reads sample `index`.
      describe: names sample `index` in the warning (its file).
      errors: the exceptions that mean "unreadable"; any other propagates.
      kind: what a sample is, for the warning ("Skipping unreadable <kind> <describe(index)>: ...").
    """

    def __init__(
        self,
        read: Callable[[int], T],
        describe: Callable[[int], str],
        errors: tuple[type[BaseException], ...],
        kind: str,
    ) -> None:
        self.read, self.describe, self.errors, self.kind = read, describe, errors, kind
        self.known: dict[int, bool] = {}  # index -> read without error

    def __call__(self, index: int) -> T | None:
        if self.known.get(index) is False:
            return None
        try:
            sample = self.read(index)
        except self.errors as err:
            log.warning(
                "Skipping unreadable %s %s: %s: %s", self.kind, self.describe(index), type(err).__name__, err
            )
            self.known[index] = False
            return None
        self.known[index] = True
        return sample

    def readable(self, index: int) -> bool:
        """Whether sample `index` reads (read at the first ask, then remembered)."""
        if index not in self.known:
            self(index)
        return self.known[index]
