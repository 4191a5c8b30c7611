"""Datasets: the registry, the synthetic generator, the loader and the preparation commands."""
from .cache import ImageCache, open_cache
from .dataset import MTLDataset, Sample, index_split, read_card, stratified_split
from .io import DataError
from .loader import fingerprint, make_loader
from .registry import DATASETS, DatasetSpec, get_spec, list_datasets
from .synthetic import LOOK_ALIKE_PAIRS, make_synthetic, render_sample

__all__ = ["MTLDataset", "Sample", "index_split", "read_card", "stratified_split", "DataError", "fingerprint",
           "make_loader", "DATASETS", "DatasetSpec", "get_spec", "list_datasets", "LOOK_ALIKE_PAIRS",
           "make_synthetic", "render_sample", "ImageCache", "open_cache"]
