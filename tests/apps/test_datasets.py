"""Tests of the MNIST IDX reader and the digits split."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ecp_fast.apps.datasets import (
    DATA_DIR_ENV,
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_STD,
    load_digits_split,
    load_mnist,
    read_idx,
    write_idx,
)

# The project keeps MNIST beside the repository, in ../shared/data/mnist, unless ECP_DATA_DIR says otherwise.
REAL_MNIST = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist")


def write_fake_mnist(directory: Path, n_train: int = 7, n_test: int = 3, compress: bool = True, seed: int = 0) -> dict:
    """Four tiny IDX files with MNIST's names; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=(n_train,), dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=(n_test,), dtype=np.uint8),
    }
    for key, stem in MNIST_FILES.items():
        write_idx(directory / (stem + (".gz" if compress else "")), arrays[key])
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_reads_synthetic_idx_files(tmp_path: Path, compress: bool) -> None:
    arrays = write_fake_mnist(tmp_path, compress=compress)
    split = load_mnist(tmp_path)
    assert split.x_train.shape == (7, 1, 28, 28) and split.x_test.shape == (3, 1, 28, 28)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    np.testing.assert_allclose(split.x_train[:, 0].numpy(), arrays["train_images"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(split.y_test.numpy(), arrays["test_labels"])
    assert 0.0 <= float(split.x_train.min()) and float(split.x_train.max()) <= 1.0


def test_normalize_and_flatten(tmp_path: Path) -> None:
    arrays = write_fake_mnist(tmp_path)
    split = load_mnist(tmp_path, normalize=True, flatten=True)
    assert split.x_train.shape == (7, 784)
    expected = (arrays["train_images"].reshape(7, -1) / 255.0 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(split.x_train.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_mnist(tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert load_mnist().y_train.shape == (7,)


def test_missing_file_names_file_and_directory(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path)
    assert "t10k-labels-idx1-ubyte" in str(info.value) and str(tmp_path) in str(info.value)


def test_no_directory_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        load_mnist()


def test_rejects_bad_files(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad.gz"
    with gzip.open(bad_magic, "wb") as handle:
        handle.write(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad_magic)
    truncated = tmp_path / "short"
    truncated.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="bytes"):
        read_idx(truncated)


def test_images_and_labels_must_agree(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        load_mnist(tmp_path)


def test_digits_split_is_fixed_and_standardised() -> None:
    first, second = load_digits_split(seed=3), load_digits_split(seed=3)
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_test, second.y_test)
    assert first.x_train.shape[1] == 64 and len(first.x_train) + len(first.x_test) == 1797
    assert first.y_train.dtype == torch.int64
    assert abs(float(first.x_train.mean())) < 1e-3
    assert not torch.equal(load_digits_split(seed=4).y_train, first.y_train)


@pytest.mark.skipif(
    not (REAL_MNIST / "train-images-idx3-ubyte.gz").exists() and not (REAL_MNIST / "train-images-idx3-ubyte").exists(),
    reason="real MNIST files not available",
)
def test_real_mnist() -> None:
    split = load_mnist(REAL_MNIST)
    assert split.x_train.shape == (60000, 1, 28, 28) and split.x_test.shape == (10000, 1, 28, 28)
    assert split.y_train.min() == 0 and split.y_train.max() == 9
    assert abs(float(split.x_train.mean()) - MNIST_MEAN) < 1e-3
    assert abs(float(split.x_train.std()) - MNIST_STD) < 1e-3
