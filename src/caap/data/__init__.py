"""Datasets (dicts `{image, target, index[, masks]}`, images in pixel space [0, 1]) and the LightningDataModule."""

from caap.data.fashiongrid import FashionGrid
from caap.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist

__all__ = ["FASHION_MNIST_CLASSES", "FashionGrid", "load_fashion_mnist"]
