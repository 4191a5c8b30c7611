"""Datasets: the registry, the synthetic generator, the loader and the preparation commands."""
from .registry import DATASETS, DatasetSpec, get_spec, list_datasets
