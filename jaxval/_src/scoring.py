"""Scoring engine: influence scores, streaming top-k and self-influence over a gradient log.

Conventions
-----------
``g_q`` is a query gradient, ``g_z`` a training gradient (rows of ``[Q, D]`` / ``[N, D]`` arrays, or
rows of a gradient store), ``H`` the preconditioner's (damped) curvature matrix.  The basic score is::

    score(q, z) = g_qᵀ H⁻¹ g_z

and a **positive score means training on z lowers q's loss** (z is a proponent of q).

Inputs
------
``train`` is either an array ``[N, D]`` (numpy, numpy memmap or jax) or any *store-like* object with
``__len__`` (N), ``.dim`` (D) and ``.read(start, stop) -> [stop - start, D]`` (e.g.
:class:`jaxval.store.GradientStore`).  It is streamed through exactly once, in row blocks of
``block_rows`` rows, by jit-compiled float32 GEMMs.  The GEMMs are dispatched asynchronously, so the
next block is read (by the calling thread, or by the store's own ``iter_blocks`` read-ahead when it has
one) while the current block's product runs, and the host copy of a block's scores is taken only after
the next block's product has been dispatched.  ``prefetch=k`` adds a background thread reading ``k``
blocks ahead (for latency-bound stores; on a 2-core CPU machine it measured no faster, and its
cross-thread allocations made glibc's memory arenas grow).

``precond`` is ``None`` (identity, ``H = I``) or any object with ``.apply(g) -> H⁻¹ g`` mapping a
``[B, D]`` batch to ``[B, D]``.  ``apply`` should be a pure JAX function (traceable under ``jax.jit``);
then it is fused into the streamed computation.  A non-traceable ``apply`` (e.g. one calling numpy) is
still accepted and called eagerly once per block.  Queries are preconditioned once (``q̃ = H⁻¹ g_q``);
training rows are preconditioned only when a mode needs their self-influence ``g_zᵀ H⁻¹ g_z``.

Modes (all in the ``H⁻¹`` metric)
---------------------------------
- ``"dot"``:      ``g_qᵀ H⁻¹ g_z``
- ``"cosine"``:   ``g_qᵀ H⁻¹ g_z / ( sqrt(g_qᵀ H⁻¹ g_q) · sqrt(g_zᵀ H⁻¹ g_z) )`` (both sides normalised;
  in ``[-1, 1]`` for an SPD ``H``)
- ``"relative"``: ``g_qᵀ H⁻¹ g_z / sqrt(g_zᵀ H⁻¹ g_z)`` (RelatIF, Barshan et al. 2020; only the training
  side is normalised, so the ranking of training points for a fixed query equals ``cosine``'s)
- ``"l2"``:       ``g_qᵀ H⁻¹ g_z − ½ g_zᵀ H⁻¹ g_z``

A zero (or, for a non-SPD ``apply``, non-positive) norm in a denominator gives a score of 0 for that
pair instead of ``inf``/``nan``.

Self-influence
--------------
The training self-influence ``s_z = g_zᵀ H⁻¹ g_z`` that ``cosine``/``relative``/``l2`` need is computed
in the same streamed pass (``apply`` on the block, then a rowwise dot), unless the caller passes a
precomputed ``self_influence=[N]`` array (see :func:`self_influence` and
:func:`cached_self_influence`, which stores it beside a store as ``self_influence_<key>.npy``).

Layer groups
------------
``groups={name: slice | index array | boolean mask over D}`` returns ``{name: [Q, N]}`` instead of one
matrix: the score restricted to the group's columns, computed as ``(H⁻¹ g_q)[cols] · g_z[cols]`` (and,
for the normalised modes, with the group-restricted self-influences ``g[cols] · (H⁻¹ g)[cols]``).  For a
preconditioner that is block-diagonal per layer (identity, raw per-layer, K-FAC, EK-FAC) and groups that
are unions of whole layer blocks, this is *exactly* the influence computed with only those layers' gradients
and curvature blocks, and in ``dot`` mode the groups of a partition of ``D`` sum to the total score.
For groups that cut through a layer block (or a non-block-diagonal ``H``), the group score is only the
partial sum of the full score's terms over those columns.

Sharding
--------
``mesh=jax.sharding.Mesh(...)``: every training block's rows are sharded over all the mesh's axes
(``NamedSharding(mesh, PartitionSpec(mesh.axis_names, None))``; ``block_rows`` is rounded up to a
multiple of ``mesh.size``), queries are replicated; results equal the single-device ones.  A mesh with
Explicit axes (``jax.make_mesh``'s default) is used with the same devices and axis names as Auto axes, so
``precond.apply`` needs no ``out_sharding`` annotations.

Top-k ties
----------
:func:`top_k` keeps, among equal scores, the **lower training index first** (the order of a stable sort
of ``-scores`` for ``largest=True``, of ``scores`` for ``largest=False``).  Memory is
``O(Q · (k + block_rows))``: the ``[Q, N]`` matrix is never formed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import queue
import re
import tempfile
import threading
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MODES",
    "StoreLike",
    "Preconditioner",
    "influence",
    "top_k",
    "self_influence",
    "cached_self_influence",
]

MODES = ("dot", "cosine", "relative", "l2")
_NEEDS_Z_SELF = {"cosine", "relative", "l2"}
_NEEDS_Q_SELF = {"cosine"}

# default block size target (float32 bytes of one block of train rows); kept below glibc's largest
# mmap threshold (32 MiB) so freed blocks are reused instead of page-faulting fresh memory every block
_BLOCK_BYTES = 16 * 2**20
_MIN_BLOCK_ROWS = 256
_MAX_BLOCK_ROWS = 65536
_PROGRESS_MIN_BLOCKS = 8
_BF16 = np.dtype(jnp.bfloat16)


def _reads_native(store) -> bool:
    """Whether ``store.read`` / ``store.iter_blocks`` take ``native=True`` (GradientStore does)."""
    try:
        return "native" in inspect.signature(store.read).parameters
    except (TypeError, ValueError):
        return False


@runtime_checkable
class StoreLike(Protocol):
    """What the scoring engine needs from a gradient store."""

    dim: int

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> Any: ...


class Preconditioner(Protocol):
    def apply(self, g: jax.Array) -> jax.Array: ...


# --------------------------------------------------------------------------------------------------
# sources


class _Source:
    """Uniform view of the training rows: n, dim, read(start, stop) -> float32 [rows, dim]."""

    def __init__(self, train: Any):
        self.obj = train
        self.native = False
        if isinstance(train, jax.Array) or isinstance(train, np.ndarray):
            if train.ndim != 2:
                raise ValueError(
                    f"train must be a 2-D array [N, D] of gradients; got shape {tuple(train.shape)}"
                )
            self.n, self.dim = int(train.shape[0]), int(train.shape[1])
            self.on_device = isinstance(train, jax.Array)
            self.kind = "array"
        elif hasattr(train, "read") and hasattr(train, "dim") and hasattr(train, "__len__"):
            self.n, self.dim = int(len(train)), int(train.dim)
            self.on_device = False
            self.kind = "store"
            # a bfloat16 store's rows go to the kernels as stored (see _qz_dot): no float32 copy
            self.native = getattr(train, "dtype", None) == "bfloat16" and _reads_native(train)
        else:
            raise TypeError(
                "train must be an array [N, D] or a store with __len__, .dim and .read(start, stop); "
                f"got {type(train).__name__}"
            )

    def convert(self, block):
        """A block from the store as float32 (numpy, C-contiguous; jax arrays stay on device), or as
        stored for a bfloat16 store read natively."""
        if isinstance(block, jax.Array):
            return block.astype(jnp.float32)
        if self.native and block.dtype == _BF16 and block.flags.c_contiguous:
            return block
        return np.ascontiguousarray(np.asarray(block, dtype=np.float32))

    def read(self, start: int, stop: int):
        if self.kind == "store":
            raw = self.obj.read(start, stop, native=True) if self.native else self.obj.read(start, stop)
            block = self.convert(raw)
            if block.shape != (stop - start, self.dim):
                raise ValueError(
                    f"store.read({start}, {stop}) returned shape {block.shape}; expected "
                    f"({stop - start}, {self.dim})"
                )
            return block
        elif self.on_device:
            return self.obj[start:stop].astype(jnp.float32)
        else:
            block = self.obj[start:stop]
            if isinstance(block, np.memmap):
                # materialise the pages here (possibly in the prefetch thread), not lazily in the transfer
                return np.array(block, dtype=np.float32, copy=True)
            return np.ascontiguousarray(np.asarray(block, dtype=np.float32))


def _num_devices(mesh) -> int:
    return 1 if mesh is None else int(mesh.size)


def _auto_mesh(mesh):
    """The same devices and axis names with Auto axis types.

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


def _resolve_block_rows(
    block_rows: int | None, n: int, dim: int, mesh, min_rows: int = 1, chunk_rows=None, native: bool = False
) -> int:
    ndev = _num_devices(mesh)
    if block_rows is None:
        block_rows = _BLOCK_BYTES // (4 * max(dim, 1))
        block_rows = int(min(max(block_rows, _MIN_BLOCK_ROWS), _MAX_BLOCK_ROWS))
        if native:
            # bfloat16 rows: twice the rows for the same bytes (its GEMMs want wide blocks: on a 2-core
            # CPU, 3Q x 256 rows ran at 290 GFLOP/s, 3Q x 1024 at 700)
            block_rows = min(2 * block_rows, _MAX_BLOCK_ROWS)
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


class _Placer:
    """Puts blocks / row vectors / replicated arrays on the device(s)."""

    def __init__(self, mesh):
        self.mesh = mesh = _auto_mesh(mesh)
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


def _pad_rows(x, rows: int):
    if x.shape[0] == rows:
        return x
    pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    if isinstance(x, jax.Array):
        return jnp.pad(x, pad)
    return np.pad(x, pad)


def _host_blocks(src: _Source, block_rows: int, prefetch: int | None) -> Iterator[tuple[int, int, Any]]:
    """Yield (start, stop, rows [stop - start, D]) in order, as read from the source.

    ``prefetch=None`` (default): read in the calling thread; a store's own ``iter_blocks(block_rows)``
    (which issues the next read before yielding the current block) is used when it has one.
    ``prefetch=k > 0``: a background thread reads up to ``k`` blocks ahead.  ``0``: plain ``read``.
    """
    n = src.n
    starts = range(0, n, block_rows)
    if prefetch is None and src.kind == "store" and callable(getattr(src.obj, "iter_blocks", None)):
        expected = iter(starts)
        blocks = src.obj.iter_blocks(block_rows, native=True) if src.native else src.obj.iter_blocks(block_rows)
        for start, rows in blocks:
            want = next(expected, None)
            stop = min(start + block_rows, n)
            if start != want or getattr(rows, "shape", None) != (stop - start, src.dim):
                raise ValueError(
                    f"store.iter_blocks({block_rows}) yielded rows starting at {start} with shape "
                    f"{getattr(rows, 'shape', None)}; expected start {want}, shape ({stop - start}, {src.dim}). "
                    "Pass prefetch=0 to use store.read instead"
                )
            yield start, stop, src.convert(rows)
        if next(expected, None) is not None:
            raise ValueError(f"store.iter_blocks({block_rows}) stopped before row {n}")
        return
    if not prefetch or prefetch <= 0 or len(starts) <= 1:
        for start in starts:
            stop = min(start + block_rows, n)
            yield start, stop, src.read(start, stop)
        return

    q: queue.Queue = queue.Queue(maxsize=int(prefetch))
    stop_evt = threading.Event()
    _END = object()

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
            put(_END)
        except BaseException as e:  # forwarded to the consumer
            put(e)

    t = threading.Thread(target=worker, name="jaxval-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop_evt.set()
        t.join(timeout=10)


def _iter_blocks(
    src: _Source,
    block_rows: int,
    placer: _Placer,
    extra: Sequence[np.ndarray] = (),
    prefetch: int | None = None,
) -> Iterator[tuple[int, int, jax.Array, tuple]]:
    """Yield (start, stop, block [block_rows, D] on device, extra row-slices on device).

    The last block is zero-padded to ``block_rows`` rows (one compiled shape); ``extra`` are [N] arrays
    sliced and padded alongside.  Padding and the transfer to the device happen in the calling thread
    (allocating and freeing in one thread keeps glibc's per-thread arenas from growing).
    """
    for start, stop, rows in _host_blocks(src, block_rows, prefetch):
        block = placer.block(_pad_rows(rows, block_rows))
        ex = tuple(placer.vector(_pad_rows(np.asarray(e[start:stop], np.float32), block_rows)) for e in extra)
        yield start, stop, block, ex


def _progress(total: int, progress: bool | None, desc: str):
    show = (total > _PROGRESS_MIN_BLOCKS) if progress is None else bool(progress)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", leave=False)


# --------------------------------------------------------------------------------------------------
# preconditioner / groups / queries


def _precision(p):
    if p is None or isinstance(p, jax.lax.Precision):
        return p
    return jax.lax.Precision(p) if not isinstance(p, str) else jax.lax.Precision[p.upper()]


def _is_array_pytree(obj) -> bool:
    leaves = jax.tree_util.tree_leaves(obj)
    return (
        len(leaves) > 0
        and not (len(leaves) == 1 and leaves[0] is obj)
        and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves)
    )


class _Precond:
    """How a preconditioner enters the jit-compiled kernels.

    ``identity``: ``precond is None``.  ``pytree``: a registered pytree whose leaves are all arrays
    (e.g. a ``jax.tree_util.register_dataclass``): passed to the kernels as an argument, so compiled
    kernels are reused across calls and always see its current arrays.  ``closure``: any other object
    whose ``apply`` jax can trace: closed over (kernels compiled once per call).  ``eager``: ``apply``
    cannot be traced (e.g. it calls numpy): called outside jit on every block.
    """

    def __init__(self, precond, dim: int):
        self.obj = precond
        if precond is None:
            self.kind = "identity"
            return
        apply = getattr(precond, "apply", None)
        if apply is None or not callable(apply):
            raise TypeError(
                "precond must be None (identity) or an object with .apply(g) -> H⁻¹ g for g of shape "
                f"[B, D]; got {type(precond).__name__}"
            )
        spec = jax.ShapeDtypeStruct((2, dim), jnp.float32)
        if _is_array_pytree(precond) and self._shape_ok(lambda pc, g: pc.apply(g), precond, spec):
            self.kind = "pytree"
        elif self._shape_ok(lambda pc, g: apply(g), None, spec):
            self.kind = "closure"
        else:
            self.kind = "eager"

    @staticmethod
    def _shape_ok(fn, pc, spec) -> bool:
        try:
            out = jax.eval_shape(fn, pc, spec)
        except Exception:
            return False
        return getattr(out, "shape", None) == spec.shape

    @property
    def arg(self):
        """What the kernels get as their ``pc`` argument."""
        return self.obj if self.kind == "pytree" else None

    def getter(self) -> Callable:
        """``get(pc)`` -> the apply function inside a kernel (None: identity, or applied outside for
        ``eager``).  Holds the preconditioner object only for ``closure`` (whose kernels are not
        cached), so cached kernels never keep a preconditioner alive."""
        kind, obj = self.kind, (self.obj if self.kind == "closure" else None)

        def get(pc):
            if kind == "pytree":
                return pc.apply
            if kind == "closure":
                return obj.apply
            return None

        return get

    def eager(self, x):
        return jnp.asarray(self.obj.apply(x), dtype=jnp.float32)


_KERNELS: "OrderedDict[tuple, Callable]" = OrderedDict()
_KERNELS_MAX = 64


def _sels_key(sels) -> tuple:
    return tuple(
        ("s", s.start, s.stop, s.step) if isinstance(s, slice) else ("a", s.size, s.tobytes()) for s in sels
    )


def _kernel(key: tuple, pre: _Precond, build: Callable[[], Callable]) -> Callable:
    """jax.jit(build()), cached across calls unless it closes over a preconditioner object."""
    if pre.kind == "closure":
        return jax.jit(build())
    key = (pre.kind,) + key
    fn = _KERNELS.get(key)
    if fn is None:
        fn = _KERNELS[key] = jax.jit(build())
        while len(_KERNELS) > _KERNELS_MAX:
            _KERNELS.popitem(last=False)
    else:
        _KERNELS.move_to_end(key)
    return fn


def _normalize_groups(groups: Mapping[str, Any] | None, dim: int):
    """-> (names or None, list of column selectors: slice or int32 np array)."""
    if groups is None:
        return None, [slice(None)]
    if not isinstance(groups, Mapping) or len(groups) == 0:
        raise ValueError("groups must be a non-empty dict {name: slice | index array | bool mask over D}")
    names, sels = [], []
    for name, sel in groups.items():
        if isinstance(sel, slice):
            start, stop, step = sel.indices(dim)
            if len(range(start, stop, step)) == 0:
                raise ValueError(f"group {name!r}: slice {sel} selects no column of D={dim}")
            sel = slice(start, stop, step)
        else:
            arr = np.asarray(sel)
            if arr.dtype == bool:
                if arr.shape != (dim,):
                    raise ValueError(f"group {name!r}: boolean mask must have shape ({dim},); got {arr.shape}")
                arr = np.flatnonzero(arr)
            if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"group {name!r}: expected a slice, a 1-D integer index array or a bool mask")
            if arr.min() < -dim or arr.max() >= dim:
                raise ValueError(f"group {name!r}: column index out of range for D={dim}")
            arr = np.where(arr < 0, arr + dim, arr).astype(np.int32)
            if arr.size > 1 and np.all(np.diff(arr) == 1):
                sel = slice(int(arr[0]), int(arr[-1]) + 1, 1)
            else:
                sel = arr
        names.append(str(name))
        sels.append(sel)
    return names, sels


def _cols(x, sel):
    if isinstance(sel, slice):
        if sel == slice(None):
            return x
        return x[:, sel]
    return jnp.take(x, sel, axis=1)


def _rowdot(a, b):
    return jnp.sum(a * b, axis=1)


def _f32(z):
    return z if z.dtype == jnp.float32 else z.astype(jnp.float32)


def _bf16_parts(q):
    """float32 [Q, D] -> bfloat16 [3Q, D] with q == p0 + p1 + p2 exactly.

    Each part keeps the top 8 significant bits of what is left (truncation by masking the low 16 bits:
    exact, and nothing a compiler may fold as a float round trip), so three parts hold all 24 bits
    (unless the last parts are subnormal, |q| < ~1e-31, which XLA:CPU flushes to zero)."""
    parts, r = [], q
    for _ in range(3):
        h = jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(r, jnp.uint32) & jnp.uint32(0xFFFF0000), jnp.float32
        )
        parts.append(h.astype(jnp.bfloat16))
        r = r - h
    return jnp.concatenate(parts)


def _qz_dot(q, z, precision):
    """q [Q, D] float32 · z[B, D]ᵀ -> [Q, B] float32.

    For bfloat16 rows z, q is split exactly into three bfloat16 parts (``_bf16_parts``): every product
    of two bfloat16 numbers is exact in float32 and the sums accumulate in float32, so this is the
    float32 product of q with the stored rows (up to summation order) without converting z: one
    bfloat16 GEMM with 3Q rows, 1.3x faster than converting a 75 MB block and a float32 GEMM on a
    2-core CPU (20 vs 26 ms plus 32 ms of conversion), and the fast path on accelerators."""
    if z.dtype == jnp.bfloat16:
        s = jax.lax.dot_general(_bf16_parts(q), z, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return s.reshape(3, q.shape[0], -1).sum(0)
    return jnp.dot(q, _f32(z).T, precision=precision, preferred_element_type=jnp.float32)


def _safe_rsqrt(s):
    return jnp.where(s > 0, jax.lax.rsqrt(jnp.where(s > 0, s, 1.0)), 0.0)


def _combine(mode, s, q_self, z_self):
    if mode == "dot":
        return s
    if mode == "cosine":
        return s * _safe_rsqrt(q_self)[:, None] * _safe_rsqrt(z_self)[None, :]
    if mode == "relative":
        return s * _safe_rsqrt(z_self)[None, :]
    if mode == "l2":
        return s - 0.5 * z_self[None, :]
    raise AssertionError(mode)


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")


def _prepare_queries(queries, dim, pre: _Precond, sels, mode, placer):
    q = queries if isinstance(queries, jax.Array) else np.asarray(queries)
    if q.ndim != 2:
        raise ValueError(f"queries must be a 2-D array [Q, D]; got shape {tuple(q.shape)}")
    if q.shape[1] != dim:
        raise ValueError(f"queries have D={q.shape[1]} columns but the training gradients have D={dim}")
    q = placer.replicated(q.astype(np.float32) if isinstance(q, np.ndarray) else q.astype(jnp.float32))
    if pre.kind == "eager":
        qt = placer.replicated(pre.eager(q))
    else:
        get = pre.getter()

        def build():
            def prep(pc, q):
                apply = get(pc)
                qt = q if apply is None else apply(q).astype(jnp.float32)
                qts = tuple(_cols(qt, s) for s in sels)
                qself = tuple(
                    _rowdot(_cols(q, s), t) if mode in _NEEDS_Q_SELF else None for s, t in zip(sels, qts)
                )
                return qts, qself
            return prep

        prep = _kernel(("queries", mode, _sels_key(sels)), pre, build)
        return prep(pre.arg, q)
    if qt.shape != q.shape:
        raise ValueError(f"precond.apply returned shape {tuple(qt.shape)} for input {tuple(q.shape)}")
    qts = tuple(_cols(qt, s) for s in sels)
    qself = tuple(_rowdot(_cols(q, s), t) if mode in _NEEDS_Q_SELF else None for s, t in zip(sels, qts))
    return qts, qself


def _given_self_influence(self_infl, names, n):
    """Normalise a user-given self_influence to a list of [N] float32 arrays (one per group)."""
    if self_infl is None:
        return None
    if names is None:
        if isinstance(self_infl, Mapping):
            raise ValueError("self_influence is a dict but no groups were given; pass an array [N]")
        arrs = [self_infl]
    else:
        if not isinstance(self_infl, Mapping) or set(self_infl) != set(names):
            raise ValueError(
                "with groups, self_influence must be a dict {group name: [N]} with the same keys as groups "
                "(each group needs its own restricted self-influence); or pass None to compute it"
            )
        arrs = [self_infl[k] for k in names]
    out = []
    for a in arrs:
        a = np.asarray(a, dtype=np.float32)
        if a.shape != (n,):
            raise ValueError(f"self_influence must have shape ({n},) (one value per training row); got {a.shape}")
        out.append(a)
    return out


# --------------------------------------------------------------------------------------------------
# jit-compiled block kernels


def _block_self(z, apply, sels, hz=None):
    """Group-restricted self-influences of the rows of z: tuple of [B]."""
    z = _f32(z)
    if hz is None:
        hz = z if apply is None else apply(z).astype(jnp.float32)
    return tuple(_rowdot(_cols(z, s), _cols(hz, s)) for s in sels)


def _scores(apply, qts, qself, z, zself, *, mode, sels, compute_z_self, precision):
    """Scores of one block: tuple of [Q, B] per group (zself: tuple of [B] or None)."""
    if mode in _NEEDS_Z_SELF and compute_z_self:
        zself = _block_self(z, apply, sels)
    out = []
    for gi, sel in enumerate(sels):
        s = _qz_dot(qts[gi], _cols(z, sel), precision)
        out.append(_combine(mode, s, qself[gi], None if zself is None else zself[gi]))
    return tuple(out)


def _topk_key(s, n_valid, start, k, largest):
    """Top-k of one block's [Q, B] scores (rows >= n_valid are padding), global indices."""
    if not largest:
        s = -s
    # XLA's TopK orders by the float total order: make -0.0 equal to +0.0 and rank NaN last
    s = jnp.where(s == 0, 0.0, s)
    cols = jnp.arange(s.shape[1], dtype=jnp.int32)
    s = jnp.where((cols[None, :] < n_valid) & ~jnp.isnan(s), s, -jnp.inf)
    v, i = jax.lax.top_k(s, k)
    return v, i + start


class _Plan:
    """Everything shared by influence / top_k for one call."""

    def __init__(self, queries, train, precond, mode, block_rows, self_infl, groups, mesh, precision, min_rows=1):
        _check_mode(mode)
        self.mode = mode
        self.src = _Source(train)
        self.n, self.dim = self.src.n, self.src.dim
        if self.n == 0:
            raise ValueError("train has no rows")
        self.placer = _Placer(mesh)
        self.block_rows = _resolve_block_rows(
            block_rows, self.n, self.dim, mesh, min_rows, getattr(train, "chunk_rows", None), self.src.native
        )
        self.names, self.sels = _normalize_groups(groups, self.dim)
        self.pre = _Precond(precond, self.dim)
        self.precision = _precision(precision)
        self.qts, self.qself = _prepare_queries(queries, self.dim, self.pre, self.sels, mode, self.placer)
        self.nq = int(self.qts[0].shape[0])
        needs = mode in _NEEDS_Z_SELF
        given = _given_self_influence(self_infl, self.names, self.n)  # validated even when unused
        given = given if needs else None
        self.extra = given or []
        # where the train self-influence comes from: given / inside the kernel / eager apply per block
        self.z_self_source = (
            "none" if not needs else ("given" if given else ("eager" if self.pre.kind == "eager" else "jit"))
        )
        self.key = (mode, _sels_key(self.sels), str(self.precision), self.z_self_source)
        sels = self.sels
        self.get = self.pre.getter()
        self.score_kw = dict(
            mode=mode, sels=sels, compute_z_self=self.z_self_source == "jit", precision=self.precision
        )
        if self.z_self_source == "eager":
            self._eager_self = _kernel(
                ("self", _sels_key(sels)), self.pre, lambda: lambda pc, z, hz: _block_self(z, None, sels, hz)
            )

    def blocks(self, prefetch):
        return _iter_blocks(self.src, self.block_rows, self.placer, self.extra, prefetch)

    def z_self(self, block, ex):
        """zself tuple for the kernel (or None)."""
        if self.z_self_source == "given":
            return tuple(ex)
        if self.z_self_source == "eager":
            return self._eager_self(None, block, self.placer.block(self.pre.eager(_f32(block))))
        return None

    @property
    def n_blocks(self):
        return -(-self.n // self.block_rows)


# --------------------------------------------------------------------------------------------------
# public API


def influence(
    queries,
    train,
    precond=None,
    mode: str = "dot",
    block_rows: int | None = None,
    self_influence=None,
    *,
    groups: Mapping[str, Any] | None = None,
    mesh=None,
    precision="highest",
    prefetch: int | None = None,
    progress: bool | None = None,
):
    """Influence scores of every training row on every query.

    Args:
      queries: ``[Q, D]`` query gradients (numpy or jax).
      train: ``[N, D]`` array, or a store with ``__len__``, ``.dim``, ``.read(start, stop)``.
      precond: ``None`` (identity) or an object with ``.apply(g [B, D]) -> H⁻¹ g``.
      mode: ``"dot" | "cosine" | "relative" | "l2"`` (see the module docstring for the formulas).
      block_rows: training rows per streamed block (default: ~16 MiB of float32 per block, clipped to
        [256, 65536] rows, rounded to whole ``train.chunk_rows`` when the store has them, and to N;
        always rounded up to a multiple of the mesh size).
      self_influence: optional precomputed ``[N]`` train self-influence ``g_zᵀ H⁻¹ g_z`` (for
        ``cosine``/``relative``/``l2``; with ``groups``, a dict ``{name: [N]}``); skips computing it.
      groups: optional ``{name: slice | index array | bool mask over D}``; returns a dict of ``[Q, N]``.
      mesh: optional ``jax.sharding.Mesh``; block rows are sharded over it, queries replicated.
      precision: ``jax.lax.Precision`` for the GEMMs (default ``"highest"``: true float32 also on
        accelerators whose default float32 matmul is TF32/bf16; ``"default"`` is faster there).
      prefetch: ``None`` (default): blocks are read in the calling thread and the reads overlap the
        previous block's GEMM through jax's asynchronous dispatch (a store's own ``iter_blocks``
        read-ahead is used when it has one); ``k > 0``: a background thread reads ``k`` blocks ahead
        (for slow, latency-bound stores); ``0``: plain ``store.read`` in the calling thread.
      progress: show a tqdm bar (default: when there are more than 8 blocks).

    Returns:
      ``np.ndarray`` float32 ``[Q, N]`` (or ``{group name: [Q, N]}`` with ``groups``).
    """
    plan = _Plan(queries, train, precond, mode, block_rows, self_influence, groups, mesh, precision)
    pre, get, kw = plan.pre, plan.get, plan.score_kw
    score = _kernel(
        ("influence",) + plan.key, pre,
        lambda: lambda pc, qts, qself, z, zself: _scores(get(pc), qts, qself, z, zself, **kw),
    )
    outs = [np.empty((plan.nq, plan.n), dtype=np.float32) for _ in plan.sels]
    bar = _progress(plan.n_blocks, progress, "influence")

    def collect(pending):
        start, stop, res = pending
        for o, r in zip(outs, res):
            o[:, start:stop] = np.asarray(r)[:, : stop - start]
        if bar is not None:
            bar.update(1)

    pending = None
    try:
        for start, stop, block, ex in plan.blocks(prefetch):
            res = score(pre.arg, plan.qts, plan.qself, block, plan.z_self(block, ex))  # async dispatch
            if pending is not None:
                collect(pending)  # host copy of the previous block overlaps this block's GEMM
            pending = (start, stop, res)
        if pending is not None:
            collect(pending)
    finally:
        if bar is not None:
            bar.close()
    if plan.names is None:
        return outs[0]
    return dict(zip(plan.names, outs))


def top_k(
    queries,
    train,
    k: int,
    precond=None,
    mode: str = "dot",
    largest: bool = True,
    block_rows: int | None = None,
    self_influence=None,
    *,
    mesh=None,
    precision="highest",
    prefetch: int | None = None,
    progress: bool | None = None,
):
    """The ``k`` highest (``largest=True``: proponents) or lowest (opponents) scoring training rows per query.

    Streams ``train`` once; memory is ``O(Q · (k + block_rows))``, never ``O(Q · N)``.  Each block's
    scores are reduced to their own top-k and merged with the running top-k (``jax.lax.top_k`` on the
    concatenation, jit-compiled).  Scores are as in :func:`influence` (same ``mode``/``precond``).

    Ties: among equal scores the lower training index comes first (same order as a stable sort of
    ``-scores`` for ``largest=True`` and of ``scores`` for ``largest=False``; ``-0.0 == 0.0``).  A NaN
    score (from a NaN gradient) ranks last and is reported as ``-inf`` (``+inf`` for ``largest=False``).

    Returns:
      ``(values [Q, k] float32, indices [Q, k] int64)``, sorted best first.
    """
    k = int(k)
    src_n = _Source(train).n
    if not 1 <= k <= src_n:
        raise ValueError(f"k must be between 1 and the number of training rows ({src_n}); got {k}")
    plan = _Plan(
        queries, train, precond, mode, block_rows, self_influence, None, mesh, precision, min_rows=k
    )
    pre, get, kw = plan.pre, plan.get, plan.score_kw

    def build_first():
        def first(pc, qts, qself, z, zself, n_valid, start):
            (s,) = _scores(get(pc), qts, qself, z, zself, **kw)
            return _topk_key(s, n_valid, start, k, largest)

        return first

    def build_merge():
        def merge(vals, idx, pc, qts, qself, z, zself, n_valid, start):
            (s,) = _scores(get(pc), qts, qself, z, zself, **kw)
            bv, bi = _topk_key(s, n_valid, start, k, largest)
            # running entries (all lower indices) first: top_k keeps the lower position among equal
            # values, so ties resolve to the lower training index
            v, pos = jax.lax.top_k(jnp.concatenate([vals, bv], axis=1), k)
            return v, jnp.take_along_axis(jnp.concatenate([idx, bi], axis=1), pos, axis=1)

        return merge

    first = _kernel(("topk_first", k, bool(largest)) + plan.key, pre, build_first)
    merge = _kernel(("topk_merge", k, bool(largest)) + plan.key, pre, build_merge)
    bar = _progress(plan.n_blocks, progress, "top_k")
    vals = idx = None
    inflight: deque = deque()
    try:
        for start, stop, block, ex in plan.blocks(prefetch):
            zself = plan.z_self(block, ex)
            n_valid = np.int32(stop - start)
            st = np.int32(start)
            if vals is None:
                vals, idx = first(pre.arg, plan.qts, plan.qself, block, zself, n_valid, st)
            else:
                vals, idx = merge(vals, idx, pre.arg, plan.qts, plan.qself, block, zself, n_valid, st)
            # back-pressure: wait for the previous block's merge once this one is queued, so at most
            # two blocks are in flight and memory stays O(Q · (k + block_rows))
            inflight.append(vals)
            if len(inflight) > 1:
                inflight.popleft().block_until_ready()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    values = np.asarray(vals, dtype=np.float32)
    if not largest:
        values = -values
    return values, np.asarray(idx).astype(np.int64)


def self_influence(
    train,
    precond=None,
    block_rows: int | None = None,
    *,
    groups: Mapping[str, Any] | None = None,
    mesh=None,
    prefetch: int | None = None,
    progress: bool | None = None,
):
    """Self-influence ``g_zᵀ H⁻¹ g_z`` of every training row, ``np.ndarray`` float32 ``[N]``.

    With ``groups``, ``{name: [N]}`` of the group-restricted ``g_z[cols] · (H⁻¹ g_z)[cols]`` (the form
    :func:`influence` accepts as ``self_influence`` together with the same ``groups``).
    """
    src = _Source(train)
    placer = _Placer(mesh)
    br = _resolve_block_rows(block_rows, src.n, src.dim, mesh, 1, getattr(train, "chunk_rows", None))
    names, sels = _normalize_groups(groups, src.dim)
    pre = _Precond(precond, src.dim)
    get = pre.getter()
    kern = _kernel(("self", _sels_key(sels)), pre, lambda: lambda pc, z, hz: _block_self(z, get(pc), sels, hz))
    if pre.kind == "eager":
        fn = lambda z: kern(None, z, placer.block(pre.eager(_f32(z))))  # noqa: E731
    else:
        fn = lambda z: kern(pre.arg, z, None)  # noqa: E731
    outs = [np.empty((src.n,), np.float32) for _ in sels]
    bar = _progress(-(-src.n // br), progress, "self_influence")

    def collect(p):
        start, stop, res = p
        for o, r in zip(outs, res):
            o[start:stop] = np.asarray(r)[: stop - start]
        if bar is not None:
            bar.update(1)

    pending = None
    try:
        for start, stop, block, _ in _iter_blocks(src, br, placer, (), prefetch):
            res = fn(block)
            if pending is not None:
                collect(pending)
            pending = (start, stop, res)
        if pending is not None:
            collect(pending)
    finally:
        if bar is not None:
            bar.close()
    return outs[0] if names is None else dict(zip(names, outs))


_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _store_fingerprint(store) -> dict:
    """What must not change for a cached self-influence to stay valid."""
    fp = {"num_rows": int(len(store)), "dim": int(store.dim)}
    manifest = getattr(store, "manifest", None)
    if isinstance(manifest, Mapping):  # GradientStore: config hash + creation time identify the data
        blob = json.dumps(manifest, sort_keys=True, default=str).encode("utf-8")
        fp["manifest_sha256"] = hashlib.sha256(blob).hexdigest()
    return fp


def _atomic_write(file: Path, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cached_self_influence(
    store,
    precond=None,
    key: str | None = None,
    *,
    block_rows: int | None = None,
    mesh=None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> np.ndarray:
    """Self-influence ``g_zᵀ H⁻¹ g_z`` of a store's rows, cached in the store's folder.

    The cache is two files inside the folder ``store.path``: ``self_influence_<key>.npy`` (float32
    ``[N]``) and ``self_influence_<key>.json`` (the store fingerprint it was computed from: N, D and,
    for a :class:`~jaxval.store.GradientStore`, a hash of its manifest, so a store overwritten or
    re-created with other data is never served stale values).  ``key`` names the preconditioner (e.g.
    ``"ekfac_d1e-3"``); it is required when ``precond`` is not None (the engine cannot tell two
    preconditioners apart) and defaults to ``"identity"`` otherwise.

    A cached value is reused when its fingerprint matches and ``overwrite`` is False; otherwise it is
    computed with :func:`self_influence` and written atomically (temporary file + rename, ``.npy`` then
    ``.json``).  Nothing is cached (just computed) when the store has no ``.path`` naming a local
    folder (e.g. a ``gs://`` store), or when it reports ``is_complete() == False`` (rows still missing).
    """
    if key is None:
        if precond is not None:
            raise ValueError(
                "cached_self_influence needs key= naming the preconditioner (e.g. key='ekfac_d1e-3') so "
                "that caches of different preconditioners are not mixed up"
            )
        key = "identity"
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"key must match {_KEY_RE.pattern} (it becomes part of a file name); got {key!r}")

    def compute():
        return self_influence(store, precond, block_rows, mesh=mesh, progress=progress)

    path = getattr(store, "path", None)
    if not isinstance(path, (str, os.PathLike)) or "://" in str(path) or not Path(path).is_dir():
        return compute()
    is_complete = getattr(store, "is_complete", None)
    if callable(is_complete) and not is_complete():
        return compute()
    npy = Path(path) / f"self_influence_{key}.npy"
    meta = Path(path) / f"self_influence_{key}.json"
    fp = _store_fingerprint(store)
    if not overwrite and npy.exists() and meta.exists():
        try:
            ok = json.loads(meta.read_text()) == fp
            cached = np.load(npy, allow_pickle=False) if ok else None
        except (OSError, ValueError):
            cached = None
        if cached is not None and cached.shape == (fp["num_rows"],):
            return cached.astype(np.float32, copy=False)
    values = compute()
    if meta.exists():
        meta.unlink()  # never leave a fingerprint next to values it does not describe
    _atomic_write(npy, lambda f: np.save(f, values, allow_pickle=False))
    _atomic_write(meta, lambda f: f.write(json.dumps(fp, sort_keys=True).encode("utf-8")))
    return values
