"""Batches of a dataset: a pytree of arrays with a leading example axis N, or an iterable of batches.

One rule everywhere: a short last batch is padded by repeating its **last** example (the padded rows are
discarded by the caller), so one compiled shape serves a whole pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def batch_size(batch) -> int:
    """The common leading axis of every leaf of ``batch``; a clear error if they disagree."""
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError("the batch is empty: pass a pytree of arrays with a leading example axis")
    sizes: dict[int, list[str]] = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs a "
                             "leading example axis")
        sizes.setdefault(shape[0], []).append(jax.tree_util.keystr(path))
    if len(sizes) > 1:
        desc = "; ".join(f"{n}: {', '.join(p)}" for n, p in sizes.items())
        raise ValueError(f"batch leaves have different leading (example) axes: {desc}")
    return next(iter(sizes))


def is_array_tree(data) -> bool:
    """A pytree whose leaves are all arrays with a leading axis (not a list: lists are streams)."""
    if isinstance(data, (np.ndarray, jax.Array)):
        return True
    if isinstance(data, (list, Iterator)):
        return False
    leaves = jax.tree_util.tree_leaves(data)
    return bool(leaves) and all(hasattr(x, "shape") and len(np.shape(x)) >= 1 for x in leaves)


def num_examples(data) -> int | None:
    """N of an array pytree; None for an iterable of batches."""
    return batch_size(data) if is_array_tree(data) else None


def take(data, start: int, stop: int, pad_to: int | None = None):
    """Rows ``[start, stop)`` of ``data``; with ``pad_to`` rows, padded by repeating row ``stop - 1``."""
    if pad_to is None or stop - start >= pad_to:
        return jax.tree_util.tree_map(lambda a: a[start:stop], data)
    idx = np.minimum(np.arange(start, start + pad_to), stop - 1)
    return jax.tree_util.tree_map(lambda a: a[idx], data)


def padded_batches(data, size: int) -> Iterator[tuple[int, int, Any]]:
    """``(start, n_valid, batch)`` over an array pytree, every batch ``min(size, N)`` rows (padded)."""
    n = batch_size(data)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    bs = min(size, n)
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        yield start, stop - start, take(data, start, stop, bs)


def iterate_batches(data, size: int) -> Iterator[tuple[int, Any]]:
    """``(start, batch)`` over an array pytree (unpadded cuts of ``size`` rows) or an iterable of batches."""
    if is_array_tree(data):
        n = batch_size(data)
        for s in range(0, n, size):
            yield s, take(data, s, min(s + size, n))
        return
    start = 0
    for batch in data:
        yield start, batch
        start += batch_size(batch)


def example_keys(seed: int, sample: int, start: int, b: int) -> jax.Array:
    """One PRNG key per example ``start .. start+b-1`` of draw ``sample``: independent of the batch cut."""
    base = jax.random.fold_in(jax.random.key(seed), sample)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + b))


def shard_batch(batch, mesh, axis: str | None = None):
    """Place ``batch`` with its leading axis split over ``mesh``'s ``axis`` (default: the first); a leading
    size the axis does not divide is replicated."""
    if mesh is None:
        return batch
    from jax.sharding import NamedSharding, PartitionSpec

    axis = axis or mesh.axis_names[0]
    ndev = mesh.shape[axis]

    def put(a):
        a = jnp.asarray(a)
        spec = PartitionSpec(axis) if a.shape[0] % ndev == 0 else PartitionSpec()
        return jax.device_put(a, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(put, batch)
