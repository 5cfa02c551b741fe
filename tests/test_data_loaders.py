"""Data loaders: good files in every format, and one clear error for each kind of broken file.

The CIFAR-10 and MNIST files are written here in their real on-disk layouts (python-2 style
pickled dicts with bytes keys; big-endian IDX headers), and expected values are computed
with NumPy straight from the arrays the test wrote.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fxsculpt.ir.errors import BadInputError
from fxsculpt.training.data import DataSplits, check_labels, load_data

RNG = np.random.default_rng(7)


def _images(n: int, c: int = 3, h: int = 6, w: int = 6) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def _write_npz(path: Path, **overrides: object) -> Path:
    arrays: dict[str, object] = {
        "x_train": _images(40),
        "y_train": RNG.integers(0, 4, size=40).astype(np.int64),
        "x_test": _images(10),
        "y_test": RNG.integers(0, 4, size=10).astype(np.int64),
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


# -- npz ------------------------------------------------------------------------------------------


def test_npz_normalizes_with_training_statistics(tmp_path: Path) -> None:
    x_train, x_test = _images(40), _images(10)
    y_train = np.arange(40, dtype=np.int64) % 4
    path = _write_npz(tmp_path / "d.npz", x_train=x_train, y_train=y_train, x_test=x_test)
    splits = load_data(f"npz:{path}", seed=3, val_fraction=0.25)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 10)
    assert splits.input_shape == (3, 6, 6) and splits.num_classes == 4
    # Recover which images went to train through their labels' positions: rebuild independently.
    order = np.random.default_rng(3).permutation(40)
    train_idx = np.sort(order[10:])
    ref = x_train[train_idx].astype(np.float64) / 255.0
    mean, std = ref.mean(axis=(0, 2, 3)), ref.std(axis=(0, 2, 3))
    expected_test = (x_test / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(splits.test.tensors[0].numpy(), expected_test, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(splits.train.tensors[1].numpy(), y_train[train_idx])
    x = splits.train.tensors[0]
    assert x.dtype == torch.float32 and splits.train.tensors[1].dtype == torch.int64
    np.testing.assert_allclose(x.mean(dim=(0, 2, 3)).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(dim=(0, 2, 3), unbiased=False).numpy(), 1.0, atol=1e-4)


def test_split_depends_on_seed_only(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "d.npz")
    a, b, c = (load_data(f"npz:{path}", seed=s) for s in (1, 1, 2))
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])
    assert torch.equal(a.test.tensors[1], c.test.tensors[1])  # the test split never moves


def test_limit_caps_train_and_test(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "d.npz")
    splits = load_data(f"npz:{path}", limit=20, val_fraction=0.1)
    assert len(splits.train) + len(splits.val) == 20 and len(splits.test) == 10


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"y_test": None}, "lacks key(s) y_test"),
        ({"x_train": _images(40).astype(np.int32)}, "dtype int32"),
        ({"x_train": _images(40)[:, 0]}, "rank 3"),
        ({"x_train": _images(0), "y_train": np.zeros(0, np.int64)}, "x_train is empty"),
        ({"y_train": np.zeros(39, np.int64)}, "40 images but y_train has 39 labels"),
        ({"y_test": -np.ones(10, np.int64)}, "negative labels"),
        ({"y_train": np.zeros(40, np.float32)}, "labels must be integers"),
        ({"x_test": _images(10, h=5)}, "test images are"),
        ({"x_train": _images(40).transpose(0, 2, 3, 1).copy().repeat(2, axis=1)}, "N,H,W,C"),
    ],
)
def test_npz_refuses_bad_contents(tmp_path: Path, overrides: dict[str, object], fragment: str) -> None:
    path = _write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(BadInputError) as info:
        load_data(f"npz:{path}")
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_npz_refuses_corrupt_and_truncated_files(tmp_path: Path) -> None:
    good = _write_npz(tmp_path / "good.npz").read_bytes()
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive at all" * 10)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good[: len(good) // 2])
    for path in (garbage, truncated):
        with pytest.raises(BadInputError, match=r"not a readable \.npz file"):
            load_data(f"npz:{path}")
    with pytest.raises(BadInputError, match="does not exist"):
        load_data(f"npz:{tmp_path / 'absent.npz'}")


def test_unknown_spec_lists_known_kinds() -> None:
    with pytest.raises(BadInputError, match=r"unknown data spec 'imagenet:/x' \(known: digits, npz:PATH"):
        load_data("imagenet:/x")
    with pytest.raises(BadInputError, match="needs a path"):
        load_data("npz:")


# -- digits ---------------------------------------------------------------------------------------


def test_digits_split_and_shape() -> None:
    from sklearn.datasets import load_digits

    total = len(load_digits().target)
    splits = load_data("digits", seed=0)
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 10
    assert len(splits.train) + len(splits.val) + len(splits.test) == total
    assert len(splits.test) == round(total * 0.2)
    other = load_data("digits", seed=5)
    assert torch.equal(splits.test.tensors[1], other.test.tensors[1])


# -- CIFAR-10 python batches -----------------------------------------------------------------------


def _write_cifar(root: Path, per_batch: int = 6, test: int = 4) -> dict[str, np.ndarray]:
    """The real layout: dicts with bytes keys, data (N, 3072) uint8, labels a list of ints."""
    root.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for name, n in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", test)]:
        data = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in RNG.integers(0, 10, size=n)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [b"x.png"] * n,
        }
        with (root / name).open("wb") as fh:
            pickle.dump(batch, fh, protocol=2)
        arrays[name] = data
    return arrays


def test_cifar10_reads_real_layout(tmp_path: Path) -> None:
    arrays = _write_cifar(tmp_path / "cifar")
    splits = load_data(f"cifar10:{tmp_path / 'cifar'}", val_fraction=0.0)
    assert (
        splits.input_shape == (3, 32, 32) and splits.classes is not None and splits.classes[0] == "airplane"
    )
    assert len(splits.train) == 30 and len(splits.test) == 4
    # The first training image is row 0 of data_batch_1: channel-major 1024 reds, greens, blues.
    first = arrays["data_batch_1"][0].reshape(3, 32, 32).astype(np.float64) / 255.0
    everything = (
        np.concatenate([arrays[f"data_batch_{i}"] for i in range(1, 6)]).reshape(-1, 3, 32, 32) / 255.0
    )
    mean, std = everything.mean(axis=(0, 2, 3)), everything.std(axis=(0, 2, 3))
    expected = (first - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(splits.train.tensors[0][0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_cifar10_refuses_missing_truncated_and_foreign_pickles(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    _write_cifar(root)
    (root / "data_batch_3").unlink()
    with pytest.raises(BadInputError, match="lacks data_batch_3"):
        load_data(f"cifar10:{root}")
    _write_cifar(root)
    blob = (root / "data_batch_2").read_bytes()
    (root / "data_batch_2").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(BadInputError, match=r"data_batch_2 is not a readable CIFAR-10 batch"):
        load_data(f"cifar10:{root}")
    _write_cifar(root)

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    with (root / "test_batch").open("wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(BadInputError, match=r"names the Python object .*print, which would run code"):
        load_data(f"cifar10:{root}")
    _write_cifar(root)
    with (root / "data_batch_1").open("wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh, protocol=2)
    with pytest.raises(BadInputError, match=r"expected \(N, 3072\)"):
        load_data(f"cifar10:{root}")
    with (root / "data_batch_1").open("wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(BadInputError, match=r"data_batch_1: 'data' has 2 images but 'labels' has 1 entries"):
        load_data(f"cifar10:{root}")


# -- MNIST IDX ----------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(root: Path, gz: bool, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        blob = _idx_bytes(array)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (root / name).write_bytes(blob)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx(tmp_path: Path, gz: bool) -> None:
    arrays = _write_mnist(tmp_path / "mnist", gz)
    splits = load_data(f"mnist:{tmp_path / 'mnist'}", val_fraction=0.0)
    assert splits.input_shape == (1, 28, 28) and len(splits.train) == 12 and len(splits.test) == 5
    np.testing.assert_array_equal(splits.test.tensors[1].numpy(), arrays["t10k-labels-idx1-ubyte"])
    train = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255.0
    expected = (arrays["t10k-images-idx3-ubyte"][2] / 255.0 - train.mean()) / train.std()
    np.testing.assert_allclose(splits.test.tensors[0][2, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_mnist_refuses_broken_files(tmp_path: Path) -> None:
    root = tmp_path / "mnist"
    _write_mnist(root, gz=False)
    path = root / "train-images-idx3-ubyte"
    blob = path.read_bytes()
    path.write_bytes(blob[:-100])
    with pytest.raises(BadInputError, match=r"is truncated: dimensions 12x28x28 need 9408 bytes, found 9308"):
        load_data(f"mnist:{root}")
    path.write_bytes(b"\x12\x34" + blob[2:])
    with pytest.raises(BadInputError, match="bad magic number"):
        load_data(f"mnist:{root}")
    path.write_bytes(blob)
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(BadInputError, match="has 5 images but t10k-labels-idx1-ubyte has 4 labels"):
        load_data(f"mnist:{root}")
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(BadInputError, match="lacks t10k-labels-idx1-ubyte"):
        load_data(f"mnist:{root}")
    gz_root = tmp_path / "mnist_gz"
    _write_mnist(gz_root, gz=True)
    gz_path = gz_root / "train-labels-idx1-ubyte.gz"
    gz_path.write_bytes(gz_path.read_bytes()[:-8])
    with pytest.raises(BadInputError, match="corrupt or truncated gzip"):
        load_data(f"mnist:{gz_root}")


# -- labels against the model, and the real data -----------------------------------------------------


def test_check_labels_against_model_width(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "d.npz", y_train=np.full(40, 6, np.int64))
    splits = load_data(f"npz:{path}")
    check_labels(splits, 7)
    with pytest.raises(BadInputError, match=r"labels up to 6 .* the model has 5 outputs"):
        check_labels(splits, 5)


def test_real_cifar_subset(cifar_npz: Path) -> None:
    splits = load_data(f"npz:{cifar_npz}", seed=0)
    assert isinstance(splits, DataSplits)
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10
    assert len(splits.train) + len(splits.val) == 4660 and len(splits.test) == 846
    counts = torch.bincount(splits.train.tensors[1], minlength=10)
    assert int(counts.min()) > 300  # roughly balanced, as the data README says


def test_real_mnist_subset(mnist_npz: Path) -> None:
    splits = load_data(f"npz:{mnist_npz}", seed=0)
    assert splits.input_shape == (1, 28, 28) and len(splits.test) == 1000
