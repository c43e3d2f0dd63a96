"""Chunk layout of the ``grads`` array: zarr3 metadata, aligned buffers, direct reads of chunk files."""

from __future__ import annotations

import json
import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jaxval._src.errors import StoreCorruptError, StoreError
from jaxval._src.store.location import LocalLocation


def zarr3_metadata(shape, dtype: str, chunk_shape, *, compress: bool, dimension_names=None) -> dict:
    codecs: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compress:
        codecs.append({"name": "zstd", "configuration": {"level": 3, "checksum": False}})
    md = {
        "shape": [int(s) for s in shape],
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [int(c) for c in chunk_shape]}},
        "chunk_key_encoding": {"name": "default"},
        "codecs": codecs,
        "fill_value": 0,
    }
    if dimension_names:
        md["dimension_names"] = list(dimension_names)
    return md


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data start on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + 64, np.uint8)
    off = -buf.ctypes.data % 64
    return buf[off:off + nbytes].view(dtype).reshape(shape)


def aligned(arr, dtype=None) -> np.ndarray:
    """``arr`` (as ``dtype``, default its own) in a C-contiguous, 64-byte-aligned buffer: ``arr`` itself when
    it already is one, else a fresh copy (one conversion pass).

    XLA:CPU takes such arrays without a copy (``jax.device_put(x, may_alias=True)``); an unaligned
    array is copied, at ~1.3 GB/s (measured: 120 ms for a 150 MB block, vs 0.1 ms aligned)."""
    arr = np.asarray(arr)
    dtype = arr.dtype if dtype is None else np.dtype(dtype)
    if arr.dtype == dtype and arr.flags.c_contiguous and arr.ctypes.data % 64 == 0:
        return arr
    out = aligned_empty(arr.shape, dtype)
    np.copyto(out, arr, casting="unsafe")
    return out


class ChunkFiles:
    """Reads rows of a local, uncompressed ``grads`` array straight from its zarr3 chunk files.

    With the ``bytes`` codec alone, chunk ``c`` of a ``[chunk_rows, dim]`` grid is the file
    ``grads/c/<c>/0`` holding the chunk's rows in C order, little endian; an absent file is a chunk
    never written (fill value 0). Reading the needed byte range of each file into the caller's
    (aligned) buffer is one copy from the page cache: ~2.5x faster than a tensorstore read plus the
    copy into an aligned buffer that XLA can alias (75 MB of bf16 rows: 21 vs 53 ms, 2-core CPU). Used
    only when the array's metadata say exactly that layout; anything else goes through tensorstore.
    """

    def __init__(self, root: str, chunk_rows: int, row_bytes: int):
        self.root, self.chunk_rows, self.row_bytes = root, chunk_rows, row_bytes
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def probe(cls, loc, chunk_rows: int, dim: int, itemsize: int) -> "ChunkFiles | None":
        if not isinstance(loc, LocalLocation) or sys.byteorder != "little":
            return None
        try:
            with open(os.path.join(loc.local, "grads", "zarr.json"), "rb") as f:
                md = json.loads(f.read())
        except (OSError, ValueError):
            return None
        plain = (
            md.get("codecs") == [{"name": "bytes", "configuration": {"endian": "little"}}]
            and md.get("chunk_key_encoding") in ({"name": "default"},
                                                 {"name": "default", "configuration": {"separator": "/"}})
            and md.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") == [chunk_rows, dim]
            and md.get("fill_value") in (0, 0.0)
        )
        return cls(os.path.join(loc.local, "grads", "c"), chunk_rows, dim * itemsize) if plain else None

    @property
    def chunk_bytes(self) -> int:
        """The size of every chunk file (zarr3 stores edge chunks whole)."""
        return self.chunk_rows * self.row_bytes

    def path(self, c: int) -> str:
        return os.path.join(self.root, str(c), "0")

    def status(self, c: int) -> str:
        """``"ok"`` | ``"missing"`` | ``"short"`` | ``"long"``: the chunk file against its size record (the
        size every chunk file of this layout has)."""
        try:
            size = os.stat(self.path(c)).st_size
        except FileNotFoundError:
            return "missing"
        return "ok" if size == self.chunk_bytes else ("short" if size < self.chunk_bytes else "long")

    def crc32(self, c: int) -> int | None:
        """crc32 of the chunk file's bytes (None when absent)."""
        try:
            with open(self.path(c), "rb") as f:
                crc = 0
                while True:
                    b = f.read(4 << 20)
                    if not b:
                        return crc
                    crc = zlib.crc32(b, crc)
        except FileNotFoundError:
            return None

    def read_into(self, start: int, stop: int, out: np.ndarray) -> list[int]:
        """Rows [start, stop) into ``out`` (C-contiguous [stop - start, dim] of the store dtype); returns the
        chunks whose file is absent (their rows are zeros in ``out``: the caller decides whether that is a
        pending chunk or a lost one). A chunk file of the wrong size raises :class:`StoreCorruptError`.

        The chunks of one call are read by a small thread pool (the copies release the GIL): on a
        2-core CPU, 2 threads read 75 MB into a fresh buffer in 12 ms instead of 22."""
        raw = out.reshape(-1).view(np.uint8)
        cr, rb = self.chunk_rows, self.row_bytes
        parts = []
        for c in range(start // cr, (stop - 1) // cr + 1):
            r0, r1 = max(start, c * cr), min(stop, (c + 1) * cr)
            parts.append((c, (r0 - c * cr) * rb, raw[(r0 - start) * rb:(r1 - start) * rb]))
        if len(parts) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="jaxval-read")
            res = list(self._pool.map(self._read_part, parts))
        else:
            res = [self._read_part(parts[0])]
        return [c for c in res if c is not None]

    def _read_part(self, part):
        c, offset, dst = part
        try:
            f = open(self.path(c), "rb", buffering=0)
        except FileNotFoundError:
            dst[:] = 0
            return c
        view = memoryview(dst)
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != self.chunk_bytes:
                raise StoreCorruptError(
                    f"chunk file {f.name} is {'shorter' if size < self.chunk_bytes else 'longer'} than its chunk "
                    f"({size} bytes, not {self.chunk_bytes}; rows "
                    f"[{c * self.chunk_rows}, {(c + 1) * self.chunk_rows})): a damaged store; run "
                    "GradientStore.open(path).repair() and rerun the same log to recompute these rows")
            f.seek(offset)
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise StoreCorruptError(f"chunk file {f.name} is shorter than its chunk (rows "
                                            f"[{c * self.chunk_rows}, {(c + 1) * self.chunk_rows})): a damaged "
                                            "store; run GradientStore.open(path).repair() and rerun the log")
                got += n
        return None
