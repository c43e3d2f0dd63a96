"""In-memory caches between scoring calls: training self-influences ``g_zᵀ H⁻¹ g_z``, and the rows of
small complete local stores kept on the device.

``cosine``/``relative``/``l2`` need every training row's self-influence; for repeated calls over the
same rows with the same preconditioner it cannot have changed, so it is computed once (in the first
call's streamed pass) and reused.  A stale value would be a wrong score that looks right, so an entry is
made, and served, only when both sides are immutable and identified exactly:

- training rows: a ``jax.Array`` (immutable; identified by the object itself, held through a weak
  reference, so an entry dies with its array and a recycled ``id`` can never match), or a *complete*
  local :class:`~jaxval.store.GradientStore` (identified by its path, a hash of its manifest and a
  fingerprint of its files' sizes, inodes and modification times, which change when rows are rewritten
  or the store is re-created); numpy arrays (mutable), remote and other stores are never cached;
- preconditioner: ``None`` (identity), or a pytree whose leaves are jax arrays (by identity, weakly
  referenced) and numpy scalars (by value, e.g. :class:`~jaxval.Preconditioner`'s damping), together with
  its tree structure (kind, layer names, shapes, config); a pytree with a numpy-array leaf (mutable),
  and any other preconditioner object, is never cached;
- the row range and the column groups.

Values are kept as read-only host copies; at most ``MAX_BYTES`` in all (least recently used dropped).

Resident rows (:func:`rows_identity`, :func:`rows_lookup`, :func:`rows_remember`): the device blocks a
streamed pass over a *complete local* GradientStore produced (identified as above: path, manifest hash,
files' fingerprint; plus the row range, block size and dtype), at most ``ROWS_MAX_BYTES`` in all, so that a
user scoring a few queries at a time against the same store (a notebook, a service) reads and converts its
rows once, as in-memory peers (TRAK) keep their features. Device arrays are immutable; a rewritten store
changes its files' fingerprint and misses.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections import OrderedDict
from typing import Any

import jax
import numpy as np

from jaxval._src.scoring.kernels import PreconditionerSpec
from jaxval._src.scoring.sources import TrainRows

__all__ = ["MAX_BYTES", "ROWS_MAX_BYTES", "identify", "lookup", "remember", "rows_identity", "rows_lookup",
           "rows_remember", "clear", "files_fingerprint"]

MAX_BYTES = 256 * 2**20
ROWS_MAX_BYTES = 256 * 2**20


class _Id:
    """A cache identity: a hashable ``key`` plus the objects that must still be the very same ones."""

    def __init__(self, key: tuple, objects: list):
        self.key = key
        self.refs = [weakref.ref(o) for o in objects]

    def alive_as(self, other: "_Id") -> bool:
        return all(a() is not None and a() is b() for a, b in zip(self.refs, other.refs))


def _train_identity(src: TrainRows) -> tuple[tuple, list] | None:
    obj = src.obj
    if isinstance(obj, jax.Array):
        return ("array", id(obj)), [obj]
    from jaxval._src.store import GradientStore

    if isinstance(obj, GradientStore) and obj.is_complete():
        files = files_fingerprint(obj.path)
        if files is None:
            return None
        blob = json.dumps(obj.manifest, sort_keys=True, default=str).encode("utf-8")
        return ("store", obj.path, hashlib.sha256(blob).hexdigest(), files), []
    return None


def files_fingerprint(path: str) -> str | None:
    """A hash of every file under a local store folder (name, size, inode, modification and change times,
    in nanoseconds), so rows rewritten or a store re-created within the manifest's one-second timestamp
    are noticed; None for a folder that is not local.  The engine's own cache files (``self_influence_*``)
    and hidden temporaries are left out."""
    if "://" in str(path) or not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if name.startswith(("self_influence_", ".")):
                continue
            st = os.stat(os.path.join(root, name))
            rel = os.path.relpath(os.path.join(root, name), path)
            h.update(f"{rel}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()


def _precond_identity(spec: PreconditionerSpec) -> tuple[tuple, list] | None:
    if spec.kind == "identity":
        return ("identity",), []
    if spec.kind != "pytree" or spec.leaves is None:
        return None
    keys, objs = [], []
    for leaf in spec.leaves:
        if isinstance(leaf, jax.Array):
            keys.append(("a", id(leaf)))
            objs.append(leaf)
        elif isinstance(leaf, np.generic):
            keys.append(("v", str(leaf.dtype), leaf.tobytes()))
        else:  # a numpy array: mutable
            return None
    try:
        treedef = jax.tree_util.tree_structure(spec.obj)
        hash(treedef)
    except TypeError:
        return None
    return (type(spec.obj), treedef, tuple(keys)), objs


def identify(src: TrainRows, spec: PreconditionerSpec, sels_key: tuple) -> _Id | None:
    """The cache identity of (rows, preconditioner, groups), or None when it must not be cached."""
    t = _train_identity(src)
    p = _precond_identity(spec) if t is not None else None
    if t is None or p is None:
        return None
    return _Id((t[0], src.lo, src.hi, p[0], sels_key), t[1] + p[1])


_ENTRIES: "OrderedDict[tuple, tuple[_Id, list[np.ndarray]]]" = OrderedDict()


def lookup(ident: _Id | None) -> list[np.ndarray] | None:
    """The cached per-group ``[n]`` self-influences (read-only arrays), or None."""
    if ident is None:
        return None
    hit = _ENTRIES.get(ident.key)
    if hit is None:
        return None
    stored, values = hit
    if not stored.alive_as(ident):
        del _ENTRIES[ident.key]
        return None
    _ENTRIES.move_to_end(ident.key)
    return values


def remember(ident: _Id | None, values: list[Any]) -> None:
    """Store read-only host copies of ``values`` (one ``[n]`` array per group) under ``ident``."""
    if ident is None:
        return
    copies = []
    for v in values:
        a = np.array(v, dtype=np.float32, copy=True)
        a.flags.writeable = False
        copies.append(a)
    if sum(a.nbytes for a in copies) > MAX_BYTES:
        return
    _ENTRIES[ident.key] = (ident, copies)
    _ENTRIES.move_to_end(ident.key)
    # drop dead entries, then the least recently used beyond the budget
    for key in [k for k, (i, _) in _ENTRIES.items() if any(r() is None for r in i.refs)]:
        del _ENTRIES[key]
    while sum(a.nbytes for _, vs in _ENTRIES.values() for a in vs) > MAX_BYTES:
        _ENTRIES.popitem(last=False)


_ROWS: "OrderedDict[tuple, tuple[_Id, list, int]]" = OrderedDict()


def rows_identity(src: TrainRows, block_rows: int, dtype) -> _Id | None:
    """The identity of a complete local store's rows as device blocks (None: not cached; jax arrays are on
    the device already, and other sources cannot be identified)."""
    from jaxval._src.store import GradientStore

    if not isinstance(src.obj, GradientStore):
        return None
    t = _train_identity(src)
    if t is None:
        return None
    return _Id(("rows", t[0], src.lo, src.hi, int(block_rows), str(np.dtype(dtype))), t[1])


def rows_lookup(ident: _Id | None) -> list | None:
    """The cached ``[(start, stop, block)]`` device blocks, or None."""
    hit = _ROWS.get(ident.key) if ident is not None else None
    if hit is None:
        return None
    _ROWS.move_to_end(ident.key)
    return hit[1]


def rows_remember(ident: _Id | None, blocks: list) -> None:
    """Keep ``[(start, stop, block)]`` (device arrays) under ``ident`` within ``ROWS_MAX_BYTES``."""
    if ident is None:
        return
    nbytes = sum(int(b.size) * b.dtype.itemsize for _, _, b in blocks)
    if nbytes > ROWS_MAX_BYTES:
        return
    _ROWS[ident.key] = (ident, list(blocks), nbytes)
    _ROWS.move_to_end(ident.key)
    while sum(v[2] for v in _ROWS.values()) > ROWS_MAX_BYTES:
        _ROWS.popitem(last=False)


def clear() -> None:
    """Forget every cached self-influence and every resident store's rows."""
    _ENTRIES.clear()
    _ROWS.clear()
