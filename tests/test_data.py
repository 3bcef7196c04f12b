"""Datasets without downloads and deterministic partitions."""

from __future__ import annotations

import numpy as np
import pytest

from tests.datafiles import write_idx
from toolkit.data import load_dataset, parse_partition, parse_scheme, partition_indices
from toolkit.errors import UserError


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder(tmp_path, compress) -> None:
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 255, (30, 28, 28)), compress)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(30) % 10, compress)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 255, (10, 28, 28)), compress)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10), compress)
    data = load_dataset(f"idx:{tmp_path}")
    assert data.train_x.shape == (30, 1, 28, 28) and data.test_x.shape == (10, 1, 28, 28)
    assert data.num_classes == 10 and abs(float(data.train_x.mean())) < 1e-4


def test_corrupt_idx_is_one_clear_error(tmp_path) -> None:
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (tmp_path / stem).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(UserError, match="header says"):
        load_dataset(f"idx:{tmp_path}")


def test_image_folder(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("cat", "dog", "owl"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = load_dataset(f"folder:{tmp_path}", seed=3)
    assert data.input_shape == (3, 12, 10) and data.num_classes == 3
    assert len(data.train_y) + len(data.test_y) == 15


@pytest.mark.slow
def test_builtin_mnist5k_is_real_and_split_by_seed() -> None:
    first, again, other = (
        load_dataset("builtin:mnist5k", 0),
        load_dataset("builtin:mnist5k", 0),
        load_dataset("builtin:mnist5k", 1),
    )
    assert first.train_x.shape == (4000, 1, 28, 28) and first.test_x.shape == (1000, 1, 28, 28)
    assert sorted(set(first.train_y.tolist())) == list(range(10))
    assert (first.train_y == again.train_y).all() and not (first.train_y == other.train_y).all()


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "shards:2"])
def test_partitions_cover_every_sample_once_and_are_deterministic(scheme) -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition_indices(labels, 4, scheme, seed=5)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    assert all((a == b).all() for a, b in zip(parts, partition_indices(labels, 4, scheme, seed=5), strict=True))


def test_label_skew_is_real_for_non_iid() -> None:
    labels = np.repeat(np.arange(10), 100)
    shards = partition_indices(labels, 5, "shards:1", seed=0)
    assert all(len(set(labels[part])) <= 2 for part in shards)


@pytest.mark.parametrize("text", ["4/4", "x/2", "1", "-1/3"])
def test_bad_partition(text) -> None:
    with pytest.raises(UserError):
        parse_partition(text)


@pytest.mark.parametrize("text", ["dirichlet:0", "shards:1.5", "zipf:2", "dirichlet:x"])
def test_bad_scheme(text) -> None:
    with pytest.raises(UserError):
        parse_scheme(text)


def test_unknown_spec() -> None:
    with pytest.raises(UserError, match="unknown data spec"):
        load_dataset("builtin:imagenet")
