"""MNIST-style IDX files (optionally gzip-compressed), parsed with numpy.

IDX format: 2 zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64), the number of dimensions, then one big-endian uint32 per dimension, then the data
(big-endian, row-major).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

_DATASETS = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist",
             "fmnist": "fashion-mnist"}
_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip or plain) into a numpy array of its native dtype (native byte order).

    ``limit``: read only the first ``limit`` items along the first axis.
    """
    path = Path(path)
    with _open(path) as f:
        head = f.read(4)
        if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in _TYPES:
            raise ValueError(f"{path} is not an IDX file (bad magic {head.hex()})")
        dtype, ndim = _TYPES[head[2]], head[3]
        dims_raw = f.read(4 * ndim)
        if len(dims_raw) != 4 * ndim:
            raise ValueError(f"{path}: truncated IDX header")
        dims = [int(v) for v in np.frombuffer(dims_raw, dtype=">u4")]
        if limit is not None and ndim > 0:
            dims[0] = min(dims[0], max(0, int(limit)))
        count = int(np.prod(dims, dtype=np.int64)) if ndim else 1
        raw = f.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise ValueError(f"{path}: truncated IDX data ({len(raw)} bytes, expected {count * dtype.itemsize})")
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def load_idx_dataset(name: str = "mnist", data_dir: str | os.PathLike | None = None, flatten: bool = True,
                     limit: int | None = None) -> dict:
    """MNIST or Fashion-MNIST from IDX ``.gz`` files.

    ``data_dir``: the data directory holding ``mnist/`` / ``fashion-mnist/`` (resolved by
    :func:`jaxval.data.data_dir`, i.e. ``$JAXVAL_DATA`` by default), or the dataset folder itself.
    Returns ``x_train`` float32 [N, 784] in [0, 1] ([N, 28, 28] with ``flatten=False``), ``y_train``
    int32, ``x_test``, ``y_test``. ``limit``: keep the first ``limit`` examples of each split.
    """
    from jaxval.data import data_dir as _data_dir

    key = _DATASETS.get(name.lower())
    if key is None:
        raise ValueError(f"unknown IDX dataset {name!r}; use one of {sorted(set(_DATASETS.values()))}")
    if data_dir is not None and all((Path(data_dir) / fn).exists() for fn in _FILES.values()):
        folder = Path(data_dir)
    else:
        folder = _data_dir(data_dir, expect=[f"{key}/{fn}" for fn in _FILES.values()]) / key
    out = {}
    for k, fn in _FILES.items():
        arr = read_idx(folder / fn, limit=limit)
        if k.startswith("x"):
            if arr.ndim != 3:
                raise ValueError(f"{folder / fn}: expected images [N, H, W], got shape {arr.shape}")
            arr = arr.astype(np.float32) / np.float32(255.0)
            if flatten:
                arr = arr.reshape(arr.shape[0], -1)
        else:
            arr = arr.astype(np.int32)
        out[k] = arr
    for split in ("train", "test"):
        if out[f"x_{split}"].shape[0] != out[f"y_{split}"].shape[0]:
            raise ValueError(f"{folder}: {split} images and labels differ in count")
    return out
