"""Data files as users bring them: IDX files (the MNIST format) written from arrays."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(f"{path}.gz", "wb") as handle:
            handle.write(blob)
    else:
        path.write_bytes(blob)


def digits_idx(folder: Path) -> Path:
    """scikit-learn's 8x8 digits as an ``idx:`` folder: for an agent installed without built-in data."""
    from toolkit.data import load_dataset

    data = load_dataset("builtin:digits", 0)
    folder.mkdir(parents=True)

    def pixels(x) -> np.ndarray:
        x = x.numpy()[:, 0]
        return np.round(255 * (x - x.min()) / (x.max() - x.min()))

    write_idx(folder / "train-images-idx3-ubyte", pixels(data.train_x), False)
    write_idx(folder / "train-labels-idx1-ubyte", data.train_y.numpy(), False)
    write_idx(folder / "t10k-images-idx3-ubyte", pixels(data.test_x), False)
    write_idx(folder / "t10k-labels-idx1-ubyte", data.test_y.numpy(), False)
    return folder
