"""Datasets (no downloads) and deterministic per-device partitions."""

from toolkit.data.datasets import Dataset, load_dataset
from toolkit.data.partition import parse_partition, parse_scheme, partition_indices

__all__ = ["Dataset", "load_dataset", "parse_partition", "parse_scheme", "partition_indices"]
