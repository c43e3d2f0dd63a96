"""Self-influence cached on disk beside a store (``self_influence_<key>.npy`` + its fingerprint)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import jax
import numpy as np

from jaxval._src.scoring.engine import self_influence
from jaxval._src.scoring.memo import files_fingerprint

__all__ = ["cached_self_influence"]

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _precond_fingerprint(precond) -> str | None:
    """A hash of a pytree preconditioner's structure and leaf values (None for other objects)."""
    if precond is None:
        return "identity"
    leaves = jax.tree_util.tree_leaves(precond)
    if not leaves or not all(isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves):
        return None
    # the type and the leaves (the structure's printed form can hold object addresses: not stable)
    h = hashlib.sha256(f"{type(precond).__module__}.{type(precond).__qualname__}".encode("utf-8"))
    for x in leaves:
        a = np.asarray(x)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _store_fingerprint(store, precond=None) -> dict:
    """What must not change for a cached self-influence to stay valid."""
    fp = {"num_rows": int(len(store)), "dim": int(store.dim)}
    pfp = _precond_fingerprint(precond)
    if pfp is not None:  # a key reused for another preconditioner (or damping) is noticed
        fp["precond_sha256"] = pfp
    manifest = getattr(store, "manifest", None)
    if isinstance(manifest, Mapping):  # GradientStore: config hash + creation time identify the data
        blob = json.dumps(manifest, sort_keys=True, default=str).encode("utf-8")
        fp["manifest_sha256"] = hashlib.sha256(blob).hexdigest()
    path = getattr(store, "path", None)
    if isinstance(path, (str, os.PathLike)):
        # the manifest's creation time has one-second resolution and rows can be rewritten in place: the
        # store's files (sizes, inodes, modification times) must be unchanged too
        fp["files_sha256"] = files_fingerprint(str(path))
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
    ``[N]``) and ``self_influence_<key>.json`` (the store fingerprint it was computed from: N, D,
    for a :class:`~jaxval.store.GradientStore` a hash of its manifest, and a hash of the sizes, inodes and
    modification times of the files in its folder, so a store overwritten, re-created or rewritten in
    place is never served stale values).  ``key`` names the preconditioner (e.g.
    ``"ekfac_d1e-3"``); it is required when ``precond`` is not None and defaults to ``"identity"``
    otherwise.  For a pytree preconditioner (e.g. :class:`jaxval.Preconditioner`) the fingerprint also
    holds a hash of its structure and arrays, so a key reused for another preconditioner or damping is
    recomputed, not served; for other preconditioner objects the key alone tells them apart.

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
    fp = _store_fingerprint(store, precond)
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
