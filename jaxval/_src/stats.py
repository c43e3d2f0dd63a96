"""Rank statistics: average ranks, Pearson and Spearman correlations (numpy, float64), along an axis.

One implementation for the whole package (LinFiK's proposition tools, the ALinFiK student's early
stopping, LDS / LOO metrics, experiments, tests). Conventions, as ``scipy.stats``:

* ``rankdata(a, axis=None)``: ranks ``1..n``, ties get the average of the ranks they span; ``axis=None``
  ranks the flattened array; a slice containing NaN ranks to all-NaN (NaN propagates).
* ``pearson(a, b, axis=0)`` / ``spearman(a, b, axis=0)``: the correlation of ``a`` and ``b`` along ``axis``
  (``a`` and ``b`` of one shape); a Python ``float`` for 1-D inputs, else an array with ``axis`` removed.
  NaN where one side is constant (or holds NaN) along the axis.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rankdata", "pearson", "spearman"]


def rankdata(a, axis: int | None = None) -> np.ndarray:
    """Average ranks (1 = smallest) of ``a`` along ``axis`` (``None``: of the flattened array), float64.

    Vectorised over the other axes (no Python loop over rows): one stable sort, then the mean rank of each
    run of equal values via ``bincount``."""
    x = np.asarray(a, np.float64)
    if axis is None:
        x, axis = x.reshape(-1), 0
    x = np.moveaxis(x, axis, -1)
    shape = x.shape
    n = shape[-1] if x.ndim else 1
    rows = x.reshape(-1, n)
    if rows.size == 0:
        return np.moveaxis(np.zeros(shape), -1, axis)
    order = np.argsort(rows, axis=1, kind="mergesort")
    xs = np.take_along_axis(rows, order, axis=1)
    new_run = np.ones(xs.shape, bool)
    new_run[:, 1:] = xs[:, 1:] != xs[:, :-1]
    run = np.cumsum(new_run, axis=1) - 1 + (np.arange(len(rows)) * n)[:, None]   # globally unique run ids
    pos = np.broadcast_to(np.arange(1, n + 1, dtype=np.float64), xs.shape)
    counts = np.maximum(np.bincount(run.ravel()), 1)          # ids between rows are unused (count 0)
    avg = np.bincount(run.ravel(), weights=pos.ravel()) / counts
    ranks = np.empty_like(rows)
    np.put_along_axis(ranks, order, avg[run], axis=1)
    ranks[np.isnan(rows).any(axis=1)] = np.nan
    return np.moveaxis(ranks.reshape(shape), -1, axis)


def _pair(a, b, axis: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"correlation needs arrays of one shape, got {a.shape} and {b.shape}")
    if a.ndim == 0:
        raise ValueError("correlation needs at least 1-D arrays, got scalars")
    if not -a.ndim <= axis < a.ndim:
        raise ValueError(f"axis {axis} is out of range for arrays of shape {a.shape}")
    return a, b


def _out(r: np.ndarray, ndim: int):
    return float(r) if ndim == 1 else r


def pearson(a, b, axis: int = 0):
    """Pearson correlation of ``a`` and ``b`` along ``axis`` (float for 1-D inputs; NaN if constant)."""
    a, b = _pair(a, b, axis)
    a = a - a.mean(axis, keepdims=True)
    b = b - b.mean(axis, keepdims=True)
    num = (a * b).sum(axis)
    den = np.sqrt((a * a).sum(axis) * (b * b).sum(axis))
    ok = den > 0
    r = np.where(ok, num / np.where(ok, den, 1.0), np.nan)
    return _out(np.clip(r, -1.0, 1.0), a.ndim)


def spearman(a, b, axis: int = 0):
    """Spearman rank correlation (Pearson of average ranks) of ``a`` and ``b`` along ``axis``."""
    a, b = _pair(a, b, axis)
    return pearson(rankdata(a, axis), rankdata(b, axis), axis)
