"""Training-row sources for the scoring engine: a uniform view of arrays and stores, block sizes, the
devices blocks go to, and the streamed iteration over row blocks.

``train`` is an array ``[N, D]`` (numpy, numpy memmap or jax) or any *store-like* object with
``__len__`` (N), ``.dim`` (D) and ``.read(start, stop) -> [stop - start, D]``
(e.g. :class:`jaxval.store.GradientStore`). :class:`TrainRows` views a contiguous range ``[lo, hi)`` of
it (the rows one process owns when several share the work).
"""

from __future__ import annotations

import inspect
import queue
import threading
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["StoreLike", "TrainRows", "Placer", "auto_mesh", "resolve_block_rows", "device_blocks",
           "progress_bar", "pad_rows"]

# default block size target (float32 bytes of one block of train rows); kept below glibc's largest
# mmap threshold (32 MiB) so freed blocks are reused instead of page-faulting fresh memory every block
BLOCK_BYTES = 16 * 2**20
MIN_BLOCK_ROWS = 256
MAX_BLOCK_ROWS = 65536
PROGRESS_MIN_BLOCKS = 8
BF16 = np.dtype(jnp.bfloat16)


@runtime_checkable
class StoreLike(Protocol):
    """What the scoring engine needs from a gradient store."""

    dim: int

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> Any: ...


def _takes(fn, name: str) -> bool:
    """Whether callable ``fn`` takes a keyword ``name``."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class TrainRows:
    """Rows ``[lo, hi)`` of the training gradients, read as float32 ``[rows, D]`` blocks.

    Attributes: ``obj`` (the object given), ``total`` (its N), ``lo``/``hi``, ``n = hi - lo``, ``dim``,
    ``kind`` (``"array"`` | ``"store"``), ``on_device`` (rows already in a jax array), ``native`` (a
    bfloat16 store read without conversion), ``chunk_rows`` (the store's, or None).
    """

    def __init__(self, train: Any, lo: int = 0, hi: int | None = None):
        self.obj = train
        self.native = False
        self.rows = train
        if isinstance(train, (jax.Array, np.ndarray)):
            if train.ndim != 2:
                raise ValueError(f"train must be a 2-D array [N, D] of gradients; got shape {tuple(train.shape)}")
            self.total, self.dim = int(train.shape[0]), int(train.shape[1])
            self.on_device = isinstance(train, jax.Array)
            self.kind = "array"
            if self.on_device and not train.is_fully_addressable:
                if not train.is_fully_replicated:
                    raise ValueError(
                        "train is a jax.Array sharded across processes; the scoring engine splits rows across "
                        "processes itself: pass a GradientStore, a host array, or a fully replicated array"
                    )
                self.rows = train.addressable_data(0)  # this process's full copy
        elif hasattr(train, "read") and hasattr(train, "dim") and hasattr(train, "__len__"):
            self.total, self.dim = int(len(train)), int(train.dim)
            self.on_device = False
            self.kind = "store"
            # a bfloat16 store's rows go to the kernels as stored (see kernels.qz_dot): no float32 copy
            self.native = getattr(train, "dtype", None) == "bfloat16" and _takes(train.read, "native")
        else:
            raise TypeError(
                "train must be an array [N, D] or a store with __len__, .dim and .read(start, stop); "
                f"got {type(train).__name__}"
            )
        chunk = getattr(train, "chunk_rows", None) if self.kind == "store" else None
        self.chunk_rows = int(chunk) if isinstance(chunk, (int, np.integer)) and chunk > 0 else None
        self.lo = int(lo)
        self.hi = self.total if hi is None else int(hi)
        if not 0 <= self.lo <= self.hi <= self.total:
            raise ValueError(f"row range [{self.lo}, {self.hi}) is not inside [0, {self.total})")
        self.n = self.hi - self.lo

    def convert(self, block):
        """A block from the store as float32 (numpy, C-contiguous; jax arrays stay on device), or as
        stored for a bfloat16 store read natively."""
        if isinstance(block, jax.Array):
            return block.astype(jnp.float32)
        if self.native and block.dtype == BF16 and block.flags.c_contiguous:
            return block
        return np.ascontiguousarray(np.asarray(block, dtype=np.float32))

    def read(self, start: int, stop: int):
        """Rows ``[lo + start, lo + stop)``."""
        s, e = self.lo + start, self.lo + stop
        if self.kind == "store":
            raw = self.obj.read(s, e, native=True) if self.native else self.obj.read(s, e)
            block = self.convert(raw)
            if block.shape != (stop - start, self.dim):
                raise ValueError(
                    f"store.read({s}, {e}) returned shape {block.shape}; expected ({stop - start}, {self.dim})"
                )
            return block
        if self.on_device:
            block = self.rows if (s, e) == (0, self.total) else self.rows[s:e]  # all rows: no slicing op
            return block if block.dtype == jnp.float32 else block.astype(jnp.float32)
        block = self.rows[s:e]
        if isinstance(block, np.memmap):
            # materialise the pages here (possibly in the prefetch thread), not lazily in the transfer
            return np.array(block, dtype=np.float32, copy=True)
        return np.ascontiguousarray(np.asarray(block, dtype=np.float32))

    def store_blocks(self, block_rows: int):
        """The store's own ``iter_blocks`` over this range (None when it has none or cannot do the range)."""
        it = getattr(self.obj, "iter_blocks", None) if self.kind == "store" else None
        if not callable(it):
            return None
        kw = {"native": True} if self.native else {}
        if self.lo == 0 and self.hi == self.total:
            return it(block_rows, **kw)
        if _takes(it, "start") and _takes(it, "stop"):
            return it(block_rows, start=self.lo, stop=self.hi, **kw)
        return None


def auto_mesh(mesh):
    """The same devices and axis names with Auto axis types (None stays None).

    ``jax.make_mesh`` gives Explicit axes by default; under those, ops inside a user's ``precond.apply``
    (``jnp.linalg.solve``, contractions over a sharded axis) need explicit ``out_sharding``s.  The engine
    only shards rows of independent blocks, so it lets the compiler propagate shardings instead.
    """
    if mesh is None:
        return None
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None; got {type(mesh).__name__}")
    types = getattr(mesh, "axis_types", None)
    auto = jax.sharding.AxisType.Auto
    if types is None or all(t == auto for t in types):
        return mesh
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(auto,) * len(mesh.axis_names))


def resolve_block_rows(block_rows: int | None, n: int, dim: int, mesh, min_rows: int = 1, chunk_rows=None,
                       native: bool = False) -> int:
    """Training rows per streamed block (see :func:`jaxval.influence`'s ``block_rows``)."""
    ndev = 1 if mesh is None else int(mesh.size)
    if block_rows is None:
        block_rows = BLOCK_BYTES // (4 * max(dim, 1))
        block_rows = int(min(max(block_rows, MIN_BLOCK_ROWS), MAX_BLOCK_ROWS))
        if native:
            # bfloat16 rows: twice the rows for the same bytes (its GEMMs want wide blocks: on a 2-core
            # CPU, 3Q x 256 rows ran at 290 GFLOP/s, 3Q x 1024 at 700)
            block_rows = min(2 * block_rows, MAX_BLOCK_ROWS)
        if isinstance(chunk_rows, (int, np.integer)) and chunk_rows > 0:
            # whole storage chunks per block: each chunk file is read once
            block_rows = max(1, round(block_rows / int(chunk_rows))) * int(chunk_rows)
    else:
        block_rows = int(block_rows)
        if block_rows < 1:
            raise ValueError(f"block_rows must be a positive integer; got {block_rows}")
    block_rows = max(block_rows, min_rows)
    block_rows = min(block_rows, max(n, min_rows, 1))
    return -(-block_rows // ndev) * ndev  # round up to a multiple of the device count


class Placer:
    """Puts blocks / row vectors / replicated arrays on the device(s) of ``mesh`` (or the default device)."""

    def __init__(self, mesh):
        self.mesh = mesh = auto_mesh(mesh)
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec as P

            axes = tuple(mesh.axis_names)
            self.rows2 = NamedSharding(mesh, P(axes, None))
            self.rows1 = NamedSharding(mesh, P(axes))
            self.repl = NamedSharding(mesh, P())

    def block(self, x):
        if self.mesh is not None:
            return jax.device_put(x, self.rows2)
        # a block read from a store is a fresh, aligned, never-mutated host buffer: on CPU the device
        # array can alias it instead of copying it (elsewhere this is an ordinary transfer)
        aliasable = isinstance(x, np.ndarray) and x.flags.c_contiguous and x.ctypes.data % 64 == 0
        return jax.device_put(x, may_alias=True) if aliasable else jax.device_put(x)

    def vector(self, x):
        return jax.device_put(x, self.rows1) if self.mesh is not None else jax.device_put(x)

    def replicated(self, x):
        return jax.device_put(x, self.repl) if self.mesh is not None else jax.device_put(x)


def pad_rows(x, rows: int):
    """``x`` zero-padded along axis 0 to ``rows`` rows."""
    if x.shape[0] == rows:
        return x
    pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    if isinstance(x, jax.Array):
        return jnp.pad(x, pad)
    return np.pad(x, pad)


def _host_blocks(src: TrainRows, block_rows: int, prefetch: int | None) -> Iterator[tuple[int, int, Any]]:
    """Yield (start, stop, rows [stop - start, D]) in order (positions relative to ``src.lo``).

    ``prefetch=None`` (default): read in the calling thread; a store's own ``iter_blocks(block_rows)``
    (which issues the next read before yielding the current block) is used when it has one.
    ``prefetch=k > 0``: a background thread reads up to ``k`` blocks ahead.  ``0``: plain ``read``.
    """
    n = src.n
    starts = range(0, n, block_rows)
    blocks = src.store_blocks(block_rows) if prefetch is None else None
    if blocks is not None:
        expected = iter(starts)
        for start, rows in blocks:
            start -= src.lo
            want = next(expected, None)
            stop = min(start + block_rows, n)
            if start != want or getattr(rows, "shape", None) != (stop - start, src.dim):
                raise ValueError(
                    f"store.iter_blocks({block_rows}) yielded rows starting at {start + src.lo} with shape "
                    f"{getattr(rows, 'shape', None)}; expected start {None if want is None else want + src.lo}, "
                    f"shape ({stop - start}, {src.dim}). Pass prefetch=0 to use store.read instead"
                )
            yield start, stop, src.convert(rows)
        if next(expected, None) is not None:
            raise ValueError(f"store.iter_blocks({block_rows}) stopped before row {src.hi}")
        return
    if not prefetch or prefetch <= 0 or len(starts) <= 1:
        for start in starts:
            stop = min(start + block_rows, n)
            yield start, stop, src.read(start, stop)
        return

    q: queue.Queue = queue.Queue(maxsize=int(prefetch))
    stop_evt = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop_evt.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker():
        try:
            for start in starts:
                stop = min(start + block_rows, n)
                if not put((start, stop, src.read(start, stop))):
                    return
            put(end)
        except BaseException as e:  # forwarded to the consumer
            put(e)

    t = threading.Thread(target=worker, name="jaxval-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is end:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop_evt.set()
        t.join(timeout=10)


def device_blocks(src: TrainRows, block_rows: int, placer: Placer, extra: Sequence[np.ndarray] = (),
                  prefetch: int | None = None) -> Iterator[tuple[int, int, jax.Array, tuple]]:
    """Yield (start, stop, block [block_rows, D] on device, extra row-slices on device).

    The last block is zero-padded to ``block_rows`` rows (one compiled shape); ``extra`` are ``[src.n]``
    arrays sliced and padded alongside.  Padding and the transfer to the device happen in the calling
    thread (allocating and freeing in one thread keeps glibc's per-thread arenas from growing).
    """
    for start, stop, rows in _host_blocks(src, block_rows, prefetch):
        block = placer.block(pad_rows(rows, block_rows))
        ex = tuple(placer.vector(pad_rows(np.asarray(e[start:stop], np.float32), block_rows)) for e in extra)
        yield start, stop, block, ex


def progress_bar(total: int, progress: bool | None, desc: str):
    """A tqdm bar over ``total`` blocks (default: shown above 8 blocks), or None."""
    show = (total > PROGRESS_MIN_BLOCKS) if progress is None else bool(progress)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", leave=False)
