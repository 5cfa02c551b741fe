"""Image-classification data sets for passes that train or evaluate: ``--data SPEC``.

Every loader returns the same :class:`DataSplits`: float32 NCHW inputs normalized per
channel with the training split's mean and standard deviation, int64 labels, and a
train/validation split drawn from the seed. Files are checked before use, and every
problem (missing, corrupt, truncated, wrong dtype or rank, mismatched lengths, negative
labels) is one :class:`~ir.errors.BadInputError` line that names the file.

Specs: ``digits`` (scikit-learn's bundled 8x8 digits), ``npz:PATH`` (keys ``x_train``,
``y_train``, ``x_test``, ``y_test``), ``cifar10:DIR`` (the python pickle batches) and
``mnist:DIR`` (IDX files, gzipped or not).
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fxsculpt.ir.errors import BadInputError, first_line

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
DIGIT_CLASSES = [str(i) for i in range(10)]

#: The fixed seed that carves the test split of ``digits``: the test set must not move with ``--seed``.
DIGITS_TEST_SEED = 20240601
DIGITS_TEST_FRACTION = 0.2


@dataclass
class DataSplits:
    """Train, validation and test splits of one data set, ready for the training loops.

    ``input_shape`` is one sample's shape ``(C, H, W)``; ``classes`` names the labels when
    the data set says what they are.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str
    classes: list[str] | None = None


@dataclass
class _Raw:
    """Arrays as read from the source, before normalization and the validation split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    classes: list[str] | None = None
    scale: float = 255.0  # what maps the raw values to [0, 1]


# -- the public entry points ---------------------------------------------------------------


def known_kinds() -> list[str]:
    """The spec kinds :func:`load_data` understands, spelled as a user writes them."""
    return ["digits", "npz:PATH", "cifar10:DIR", "mnist:DIR"]


def load_data(spec: str, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None) -> DataSplits:
    """Load the data set named by ``spec`` and split it.

    ``val_fraction`` of the training images (chosen by ``seed``) become the validation split.
    ``limit`` keeps at most that many training and that many test images (the first ones,
    before the validation split), for quick runs.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise BadInputError(f"validation fraction must be in [0, 1), got {val_fraction}")
    if limit is not None and limit < 1:
        raise BadInputError(f"data limit must be a positive number of images, got {limit}")
    kind, _, arg = spec.partition(":")
    readers: dict[str, Callable[[str], _Raw]] = {
        "digits": _read_digits,
        "npz": _read_npz,
        "cifar10": _read_cifar10,
        "mnist": _read_mnist,
    }
    if kind not in readers:
        raise BadInputError(f"unknown data spec '{spec}' (known: {', '.join(known_kinds())})")
    if kind == "digits" and arg:
        raise BadInputError(f"data spec 'digits' takes no argument, got '{spec}'")
    if kind != "digits" and not arg:
        raise BadInputError(f"data spec '{kind}' needs a path: {kind}:{'PATH' if kind == 'npz' else 'DIR'}")
    raw = readers[kind](arg)
    return _to_splits(raw, seed, val_fraction, limit)


def check_labels(splits: DataSplits, num_classes: int | None) -> None:
    """Refuse data whose labels do not fit a model with ``num_classes`` outputs."""
    if num_classes is None:
        return
    for split_name in ("train", "val", "test"):
        labels = getattr(splits, split_name).tensors[1]
        if labels.numel() and int(labels.max()) >= num_classes:
            raise BadInputError(
                f"data '{splits.name}' has labels up to {int(labels.max())} in its {split_name} split, "
                f"but the model has {num_classes} outputs (pass --num-classes {splits.num_classes} "
                "for a built-in model, or use data that fits)"
            )


# -- turning raw arrays into splits ----------------------------------------------------------


def _to_splits(raw: _Raw, seed: int, val_fraction: float, limit: int | None) -> DataSplits:
    x_pool, y_pool, x_test, y_test = raw.x_train, raw.y_train, raw.x_test, raw.y_test
    if limit is not None:
        x_pool, y_pool = x_pool[:limit], y_pool[:limit]
        x_test, y_test = x_test[:limit], y_test[:limit]
    n = len(x_pool)
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    if n - n_val < 1:
        raise BadInputError(f"data '{raw.name}' has {n} training images: too few to keep a training split")
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])

    x_train = x_pool[train_idx].astype(np.float32) / raw.scale
    mean = x_train.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x_train.std(axis=(0, 2, 3), dtype=np.float64)
    std = np.where(std > 1e-8, std, 1.0)

    def prepare(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        xf = (x.astype(np.float32) / raw.scale - mean[None, :, None, None]) / std[None, :, None, None]
        return TensorDataset(
            torch.from_numpy(np.ascontiguousarray(xf, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
        )

    labels_max = max(int(raw.y_train.max()), int(raw.y_test.max()))
    num_classes = max(labels_max + 1, len(raw.classes) if raw.classes else 0)
    c, h, w = (int(d) for d in raw.x_train.shape[1:])
    return DataSplits(
        train=prepare(x_pool[train_idx], y_pool[train_idx]),
        val=prepare(x_pool[val_idx], y_pool[val_idx]),
        test=prepare(x_test, y_test),
        num_classes=num_classes,
        input_shape=(c, h, w),
        name=raw.name,
        classes=raw.classes,
    )


def _check_arrays(where: str, x: np.ndarray, y: np.ndarray, split: str) -> None:
    """The checks every reader shares: rank, dtype, emptiness, lengths, label range."""
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise BadInputError(f"{where}: x_{split} has dtype {x.dtype}; images must be uint8 (or float)")
    if x.ndim != 4:
        raise BadInputError(
            f"{where}: x_{split} has rank {x.ndim} (shape {tuple(x.shape)}); images must be N,C,H,W"
        )
    if x.shape[0] == 0:
        raise BadInputError(f"{where}: x_{split} is empty")
    if x.shape[1] > 4 and x.shape[3] in (1, 3, 4):
        raise BadInputError(
            f"{where}: x_{split} has shape {tuple(x.shape)}, which looks like N,H,W,C; images must be N,C,H,W"
        )
    if min(x.shape[1:]) == 0:
        raise BadInputError(f"{where}: x_{split} has an empty dimension (shape {tuple(x.shape)})")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise BadInputError(f"{where}: x_{split} contains NaN or infinite values")
    if y.ndim != 1:
        raise BadInputError(
            f"{where}: y_{split} has rank {y.ndim}; labels must be a 1-D array of class indices"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise BadInputError(f"{where}: y_{split} has dtype {y.dtype}; labels must be integers")
    if len(y) != len(x):
        raise BadInputError(f"{where}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
    if y.min() < 0:
        raise BadInputError(f"{where}: y_{split} has negative labels (min {int(y.min())})")


def _check_pair(where: str, raw: _Raw) -> _Raw:
    _check_arrays(where, raw.x_train, raw.y_train, "train")
    _check_arrays(where, raw.x_test, raw.y_test, "test")
    if raw.x_train.shape[1:] != raw.x_test.shape[1:]:
        raise BadInputError(
            f"{where}: train images are {tuple(raw.x_train.shape[1:])} but test images are "
            f"{tuple(raw.x_test.shape[1:])}"
        )
    if raw.x_train.dtype != raw.x_test.dtype:
        raise BadInputError(f"{where}: x_train is {raw.x_train.dtype} but x_test is {raw.x_test.dtype}")
    if np.issubdtype(raw.x_train.dtype, np.floating):
        raw.scale = 1.0
    return raw


def _existing_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise BadInputError(f"{what} {path} does not exist")
    if not path.is_file():
        raise BadInputError(f"{what} {path} is not a file")
    return path


def _existing_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise BadInputError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise BadInputError(f"{what} {path} is not a directory")
    return path


# -- digits ------------------------------------------------------------------------------------


def _read_digits(_: str) -> _Raw:
    """scikit-learn's 8x8 digits (values 0..16); a fixed 20% test split that ``--seed`` does not move."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[:, None, :, :]  # N,1,8,8
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(DIGITS_TEST_SEED).permutation(len(images))
    n_test = round(len(images) * DIGITS_TEST_FRACTION)
    test_idx, pool_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    return _Raw(
        images[pool_idx],
        labels[pool_idx],
        images[test_idx],
        labels[test_idx],
        name="digits",
        classes=DIGIT_CLASSES,
        scale=16.0,
    )


# -- npz ---------------------------------------------------------------------------------------

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_npz(arg: str) -> _Raw:
    """An ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 NCHW, integer labels)."""
    path = _existing_file(Path(arg), "data file")
    where = str(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInputError(
            f"{where} is not a readable .npz file (corrupt or truncated: {first_line(exc)})"
        ) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise BadInputError(
            f"{where} holds a single array, not an .npz archive with keys {', '.join(NPZ_KEYS)}"
        )
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise BadInputError(
                f"{where} lacks key(s) {', '.join(missing)} (an npz data file needs {', '.join(NPZ_KEYS)})"
            )
        arrays: dict[str, np.ndarray] = {}
        for key in NPZ_KEYS:
            try:
                arrays[key] = np.asarray(archive[key])
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise BadInputError(
                    f"{where}: array '{key}' cannot be read (corrupt or truncated: {first_line(exc)})"
                ) from exc
        classes = None
        if "classes" in archive.files:
            try:
                names = np.asarray(archive["classes"])
                if names.dtype.kind == "U" and names.ndim == 1:
                    classes = [str(s) for s in names]
            except (OSError, ValueError):
                classes = None
    raw = _Raw(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], name=path.name)
    raw.classes = classes
    return _check_pair(where, raw)


# -- CIFAR-10 python batches ---------------------------------------------------------------------


class _RefusedGlobal(pickle.UnpicklingError):
    """A batch file names a Python global other than numpy's array rebuilders."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch files without running code: only numpy's array rebuilders are allowed."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"{module}.{name}")


def _load_batch(path: Path) -> dict[str, Any]:
    """One CIFAR batch as a dict with str keys; anything but the expected layout is refused."""
    try:
        with path.open("rb") as fh:
            obj = _BatchUnpickler(fh, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise BadInputError(
            f"{path} is not a CIFAR-10 batch: it names the Python object {exc}, which would run code "
            "when unpickled (refused; a batch holds only arrays and lists)"
        ) from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise BadInputError(
            f"{path} is not a readable CIFAR-10 batch (corrupt or truncated: {first_line(exc)})"
        ) from exc
    if not isinstance(obj, dict):
        raise BadInputError(f"{path} holds a {type(obj).__name__}, not a CIFAR-10 batch dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
    return batch


def _cifar_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_batch(path)
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise BadInputError(
            f"{path} lacks key(s) {', '.join(missing)} (a CIFAR-10 batch has data and labels)"
        )
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray):
        raise BadInputError(f"{path}: 'data' is a {type(data).__name__}, expected a uint8 array")
    if data.dtype != np.uint8:
        raise BadInputError(f"{path}: 'data' has dtype {data.dtype}, expected uint8")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise BadInputError(f"{path}: 'data' has shape {tuple(data.shape)}, expected (N, 3072)")
    if not isinstance(labels, list | np.ndarray) or not all(
        isinstance(v, int | np.integer) for v in np.asarray(labels).ravel().tolist()
    ):
        raise BadInputError(f"{path}: 'labels' must be a list of integers")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(y) != len(data):
        raise BadInputError(f"{path}: 'data' has {len(data)} images but 'labels' has {len(y)} entries")
    if len(y) and y.min() < 0:
        raise BadInputError(f"{path}: 'labels' has negative values (min {int(y.min())})")
    return data.reshape(-1, 3, 32, 32), y


def _read_cifar10(arg: str) -> _Raw:
    """The CIFAR-10 python version: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``."""
    root = _existing_dir(Path(arg), "CIFAR-10 directory")
    if not (root / "data_batch_1").exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    batches = [root / f"data_batch_{i}" for i in range(1, 6)]
    missing = [p.name for p in [*batches, root / "test_batch"] if not p.is_file()]
    if missing:
        raise BadInputError(
            f"CIFAR-10 directory {root} lacks {', '.join(missing)} (expected data_batch_1..5 and test_batch)"
        )
    xs, ys = zip(*(_cifar_arrays(p) for p in batches))
    x_test, y_test = _cifar_arrays(root / "test_batch")
    raw = _Raw(
        np.concatenate(xs), np.concatenate(ys), x_test, y_test, name="cifar10", classes=CIFAR10_CLASSES
    )
    _check_pair(str(root), raw)
    if max(int(raw.y_train.max()), int(raw.y_test.max())) > 9:
        raise BadInputError(f"CIFAR-10 directory {root}: labels go above 9")
    return raw


# -- MNIST IDX -------------------------------------------------------------------------------------

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format; gzipped when the name ends in .gz) of unsigned bytes."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                blob = fh.read()
        else:
            blob = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise BadInputError(f"{path} cannot be read (corrupt or truncated gzip: {first_line(exc)})") from exc
    if len(blob) < 4:
        raise BadInputError(f"{path} is not an IDX file: only {len(blob)} bytes")
    zero, dtype_code, ndim = struct.unpack(">HBB", blob[:4])
    if zero != 0 or ndim == 0:
        raise BadInputError(f"{path} is not an IDX file (bad magic number {blob[:4].hex()})")
    if dtype_code != 0x08:
        raise BadInputError(f"{path}: IDX element type 0x{dtype_code:02x} is not unsigned byte (0x08)")
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise BadInputError(
            f"{path} is truncated: the IDX header needs {header} bytes, the file has {len(blob)}"
        )
    dims = struct.unpack(f">{ndim}I", blob[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    body = len(blob) - header
    if body != expected:
        what = "truncated" if body < expected else "longer than its header says"
        raise BadInputError(
            f"{path} is {what}: dimensions {'x'.join(map(str, dims))} need {expected} bytes, found {body}"
        )
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / candidate).is_file():
            return root / candidate
    raise BadInputError(f"MNIST directory {root} lacks {stem} (or {stem}.gz)")


def _read_mnist(arg: str) -> _Raw:
    """MNIST (or Fashion-MNIST) IDX files under their standard names, gzipped or not."""
    root = _existing_dir(Path(arg), "MNIST directory")
    paths = {key: _find_idx(root, stem) for key, stem in MNIST_FILES.items()}
    arrays = {key: read_idx(p) for key, p in paths.items()}
    for key in ("x_train", "x_test"):
        if arrays[key].ndim != 3:
            raise BadInputError(
                f"{paths[key]}: images must have 3 dimensions (N, H, W), found {arrays[key].ndim}"
            )
        arrays[key] = arrays[key][:, None, :, :]
    for key in ("y_train", "y_test"):
        if arrays[key].ndim != 1:
            raise BadInputError(f"{paths[key]}: labels must have 1 dimension, found {arrays[key].ndim}")
        arrays[key] = arrays[key].astype(np.int64)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise BadInputError(
                f"MNIST directory {root}: {paths[f'x_{split}'].name} has {len(x)} images but "
                f"{paths[f'y_{split}'].name} has {len(y)} labels"
            )
    raw = _Raw(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], name="mnist")
    _check_pair(str(root), raw)
    if max(int(raw.y_train.max()), int(raw.y_test.max())) <= 9:
        raw.classes = DIGIT_CLASSES
    return raw
