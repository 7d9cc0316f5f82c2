"""The ImageNet-1k classes in the order every timm ImageNet-1k head uses (`timm.data.ImageNetInfo`):
class index c is the c-th synset in sorted WordNet-id order (n01440764 = 0, "tench")."""

from __future__ import annotations

from collections import Counter
from functools import cache

from timm.data import ImageNetInfo


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synset ids in timm's class order (sorted)."""
    info = ImageNetInfo()
    return tuple(info.index_to_label_name(i) for i in range(info.num_classes()))


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """Readable names of the 1000 classes (the first synonym of each synset), in timm's class order, unique:
    a name that two synsets share ("crane", the bird and the machine; "maillot") carries the synset id,
    e.g. "crane (n02012849)", so that a name identifies its class in tables, labels files and media."""
    info = ImageNetInfo()
    first = [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]
    shared = {name for name, count in Counter(first).items() if count > 1}
    return tuple(
        f"{name} ({wnid})" if name in shared else name
        for name, wnid in zip(first, imagenet_wnids(), strict=True)
    )
