"""Small, dependency-free data loaders for experiments and tests.

* :func:`load_mnist` reads the four standard MNIST IDX files (gzip-compressed or raw) from a
  directory with numpy and gzip only (no torchvision, no download).
* :func:`load_digits_split` gives scikit-learn's bundled 8x8 digits, standardised, with a fixed
  train / test split: seconds to train on, for quick runs and tests.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Environment variable naming the directory that holds the MNIST IDX files.
DATA_DIR_ENV = "ECP_DATA_DIR"
#: Pixel mean and standard deviation of the MNIST training images after scaling to ``[0, 1]``.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type codes (third byte of the magic number) and their big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class Split(NamedTuple):
    """Training and test tensors: float inputs and int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


class DataFileError(ValueError):
    """A data file that is missing a valid header, truncated or corrupt; the message names the file."""


#: Errors a damaged gzip stream raises while it is read.
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _read_bytes(path: Path) -> bytes:
    """The (decompressed) contents of ``path``; ``DataFileError`` when a gzip stream is damaged."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            return handle.read()
    except _GZIP_ERRORS as error:
        raise DataFileError(f"read_idx: {path} is truncated or corrupt ({error})") from error


def _parse_header(raw: bytes, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and header length of an IDX file from its first bytes."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataFileError(f"read_idx: {path} is not an IDX file (bad magic number {raw[:4]!r})")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DataFileError(f"read_idx: {path} has unknown IDX type code 0x{type_code:02x}")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DataFileError(
            f"read_idx: {path} is truncated: its header declares {ndim} dimensions ({header_end} bytes) but the "
            f"file holds {len(raw)} bytes"
        )
    shape = tuple(int(size) for size in np.frombuffer(raw[4:header_end], dtype=">u4"))
    return shape, _IDX_DTYPES[type_code], header_end


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip-compressed when the name ends in ``.gz``) into a numpy array.

    Raises:
        DataFileError (a ``ValueError``): when the header is not a valid IDX header, the payload has
        the wrong size, or the gzip stream is truncated or corrupt.
    """
    path = Path(path)
    raw = _read_bytes(path)
    shape, dtype, header_end = _parse_header(raw, path)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise DataFileError(
            f"read_idx: {path} declares shape {shape} ({expected} bytes of data) but holds "
            f"{len(raw) - header_end} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape).astype(dtype.newbyteorder("="))


def check_idx(
    path: str | os.PathLike[str], expected_dtype: np.dtype | None = None, chunk: int = 1 << 20
) -> tuple[int, ...]:
    """The shape of the IDX file ``path`` after reading it through (decompressing, checking its size).

    Cheaper in memory than :func:`read_idx` (nothing is kept) and raises the same errors: a
    truncated or corrupt file is found here, before any work that needs it starts.
    ``expected_dtype`` (e.g. unsigned bytes for MNIST) rejects files of another IDX type.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(4)
            head += handle.read(4 * head[3]) if len(head) == 4 else b""
            shape, dtype, _ = _parse_header(head, path)
            if expected_dtype is not None and dtype != expected_dtype:
                raise DataFileError(f"read_idx: {path} holds {dtype} values, expected {expected_dtype}")
            size = 0
            while block := handle.read(chunk):
                size += len(block)
    except _GZIP_ERRORS as error:
        raise DataFileError(f"read_idx: {path} is truncated or corrupt ({error})") from error
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        raise DataFileError(
            f"read_idx: {path} declares shape {shape} ({expected} bytes of data) but holds {size} bytes"
        )
    return shape


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``data_dir`` if given, else the ``ECP_DATA_DIR`` environment variable.

    Raises:
        FileNotFoundError: when neither is set.
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV)
        if not data_dir:
            raise FileNotFoundError(
                f"no MNIST directory given: pass data_dir (--data-dir) or set the {DATA_DIR_ENV} "
                "environment variable to the folder holding the four IDX files"
            )
    return Path(data_dir)


def find_idx_file(directory: Path, stem: str) -> Path:
    """Path of ``stem.gz`` or ``stem`` inside ``directory``; FileNotFoundError naming both otherwise."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"MNIST file '{stem}[.gz]' not found in directory '{directory}'")


def check_mnist(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The MNIST directory after checking that its four files exist, are complete and agree.

    Reads every file through once (about a second for the real files) without keeping it, so a
    missing, truncated or corrupt file is reported before a run starts. Raises
    ``FileNotFoundError`` or :class:`DataFileError` naming the file.
    """
    directory = resolve_data_dir(data_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"MNIST directory '{directory}' does not exist or is not a directory")
    paths = {key: find_idx_file(directory, stem) for key, stem in MNIST_FILES.items()}
    shapes = {key: check_idx(path, expected_dtype=np.dtype(">u1")) for key, path in paths.items()}
    for part in ("train", "test"):
        images, labels = shapes[f"{part}_images"], shapes[f"{part}_labels"]
        if len(images) != 3 or len(labels) != 1 or images[0] != labels[0]:
            raise DataFileError(
                f"load_mnist: {part} images {images} and labels {labels} in '{directory}' do not match "
                "(expected (N, rows, cols) and (N,))"
            )
        largest = int(read_idx(paths[f"{part}_labels"]).max(initial=0))
        if largest > 9:
            raise DataFileError(f"load_mnist: {paths[f'{part}_labels']} holds label {largest}; MNIST labels are 0..9")
    if shapes["train_images"][1:] != shapes["test_images"][1:]:
        raise DataFileError(
            f"load_mnist: train images are {shapes['train_images'][1:]} but test images "
            f"{shapes['test_images'][1:]} in '{directory}'"
        )
    return directory


def load_mnist(data_dir: str | os.PathLike[str] | None = None, normalize: bool = False, flatten: bool = False) -> Split:
    """The MNIST training (60,000) and test (10,000) sets as tensors.

    Args:
        data_dir: folder with ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``; defaults to the
            ``ECP_DATA_DIR`` environment variable.
        normalize: subtract :data:`MNIST_MEAN` and divide by :data:`MNIST_STD` after scaling.
        flatten: return images as ``(N, 784)`` instead of ``(N, 1, 28, 28)``.

    Returns:
        :class:`Split` with float32 images scaled to ``[0, 1]`` (before normalisation) and int64
        labels.

    Raises:
        FileNotFoundError: naming the missing file and the directory searched.
        DataFileError (a ``ValueError``): when a file is not a valid IDX file, is truncated or
        corrupt, or images and labels disagree in number.
    """
    directory = resolve_data_dir(data_dir)
    arrays = {key: read_idx(find_idx_file(directory, stem)) for key, stem in MNIST_FILES.items()}
    tensors = []
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataFileError(
                f"load_mnist: {part} images {images.shape} and labels {labels.shape} do not match "
                "(expected (N, rows, cols) and (N,))"
            )
        x = torch.from_numpy(images.astype(np.float32) / 255.0)
        if normalize:
            x = (x - MNIST_MEAN) / MNIST_STD
        x = x.reshape(x.shape[0], -1) if flatten else x.unsqueeze(1)
        tensors += [x, torch.from_numpy(labels.astype(np.int64))]
    logger.info("loaded MNIST from %s: %d train, %d test", directory, len(tensors[1]), len(tensors[3]))
    return Split(*tensors)


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """scikit-learn's bundled 8x8 digits (1,797 images, 64 features), standardised, split in two.

    The split is stratified and fixed by ``seed``; the standardisation uses training statistics.
    Inputs are ``(N, 64)`` float32, labels int64 in ``0..9``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    scaler = StandardScaler().fit(x_train)
    return Split(
        torch.tensor(scaler.transform(x_train), dtype=torch.float32),
        torch.tensor(y_train, dtype=torch.int64),
        torch.tensor(scaler.transform(x_test), dtype=torch.float32),
        torch.tensor(y_test, dtype=torch.int64),
    )


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzip-compressed when ``path`` ends in ``.gz``.

    The inverse of :func:`read_idx` for unsigned bytes; used to build small synthetic data sets.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(payload)
