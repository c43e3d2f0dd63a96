"""Column groups of the scoring engine (``groups={name: slice | index array | bool mask over D}``)."""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

__all__ = ["normalize_groups", "selectors_key", "columns"]


def normalize_groups(groups: Mapping[str, Any] | None, dim: int):
    """-> (names or None, list of column selectors: ``slice`` or int32 numpy index array)."""
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


def selectors_key(sels) -> tuple:
    """A hashable key of a list of column selectors (for kernel and self-influence caches)."""
    return tuple(
        ("s", s.start, s.stop, s.step) if isinstance(s, slice) else ("a", s.size, s.tobytes()) for s in sels
    )


def columns(x, sel):
    """The columns ``sel`` of ``x [B, D]`` (traceable)."""
    if isinstance(sel, slice):
        if sel == slice(None):
            return x
        return x[:, sel]
    return jnp.take(x, sel, axis=1)
