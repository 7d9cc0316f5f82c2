"""Datasets (dicts `{image, target, index[, masks]}`, images in pixel space [0, 1]) and the LightningDataModule."""

from caap.data.collate import collate_skip_none
from caap.data.datamodule import AttributionDataModule, select_indices
from caap.data.fashiongrid import FashionGrid
from caap.data.fashionscenes import FashionScenes
from caap.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist, read_idx
from caap.data.image_folder import IMAGE_EXTENSIONS, ImageFolderDataset, list_images
from caap.data.imagenet import ImageNetVal, imagenet_class_names, imagenet_wnids
from caap.data.sampler import ContiguousDistributedSampler, contiguous_split
from caap.data.segmentation import VOC_CLASSES, ImageNetS, ImageNetSegmentation, VOCSegmentation
from caap.data.synthetic import SyntheticGrid
from caap.data.transforms import EvalTransform

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "VOC_CLASSES",
    "AttributionDataModule",
    "ContiguousDistributedSampler",
    "EvalTransform",
    "FashionGrid",
    "FashionScenes",
    "ImageFolderDataset",
    "ImageNetS",
    "ImageNetSegmentation",
    "ImageNetVal",
    "SyntheticGrid",
    "VOCSegmentation",
    "collate_skip_none",
    "contiguous_split",
    "imagenet_class_names",
    "imagenet_wnids",
    "list_images",
    "load_fashion_mnist",
    "read_idx",
    "select_indices",
]
