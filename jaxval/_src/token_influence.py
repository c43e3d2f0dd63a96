"""Per-token influence: a pair's score split exactly over the training example's tokens and the query's.

For a loss that is a sum of token losses selected or weighted by a mask, ``loss_b = Σ_t w(mask_bt) ℓ_bt``
with ``w(0) = 0`` (jaxval's language-model convention: the next-token losses where ``batch["mask"] > 0``),
the projected gradient splits over the tokens: ``g_b = Σ_t g_bt`` where ``g_bt`` is the LoGra gradient of
the same sequence with the one-hot mask ``mask_bt · e_t``. So ``g_bt`` is an ordinary LoGra row
(``logra.grads`` of a batch of copies of the sequence, each with one token's mask), and

    score(q, z) = q̃ · g_z = Σ_t q̃ · g_zt          (q̃ = H⁻¹ g_q: the training example's tokens)
                = Σ_u (H⁻¹ g_qu) · g_z             (the query's tokens)

exactly, up to float32 summation order; ``cosine`` / ``relative`` divide every part by the pair's
constant normalisers, so their parts sum to their scores too. With the LM loss the part at position ``t``
is the effect of the loss of predicting token ``t`` (from the tokens before it); position 0 predicts
nothing and gets 0.

The parts are computed on demand (for the top-k examples of a query, say): the per-token rows are
batches of ``chunk`` (example, position) pairs through the one compiled LoGra step, contracted with the
other side on the device at once; no ``[T, D]`` matrix per example is kept and no Python loop runs over
tokens. Cost: one forward and backward of the sequence per counted token.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TokenInfluence", "token_influence", "token_rows"]

MODES = ("dot", "cosine", "relative")
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class TokenInfluence:
    """Scores of ``Q`` queries against ``N`` training examples and their exact per-token parts.

    scores: ``[Q, N]`` the pair's score in ``mode`` from the whole-example gradients.
    train_tokens: ``[Q, N, T]`` the part of each training token (position of the training batch);
      ``train_tokens.sum(-1) == scores`` to float32 precision; 0 where the training mask is 0.
    query_tokens: ``[Q, N, U]`` the part of each query token, summing to ``scores`` likewise
      (None when the queries were given as gradients, or ``split_queries=False``).
    mode: the score's mode (``dot`` | ``cosine`` | ``relative``).
    """

    scores: np.ndarray
    train_tokens: np.ndarray
    query_tokens: np.ndarray | None
    mode: str


def _num_rows(batch: Mapping) -> int:
    return int(np.shape(next(iter(jax.tree_util.tree_leaves(batch))))[0])


def _take(batch: Mapping, rows: np.ndarray) -> dict:
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[rows], dict(batch))


def _whole_grads(logra, model, batch: Mapping, chunk: int) -> jax.Array:
    """``[B, D]`` projected gradients in batches of ``chunk`` rows (the last one padded by repeating its
    last row, so every call has one shape)."""
    n = _num_rows(batch)
    out = []
    for s in range(0, n, chunk):
        rows = np.arange(s, s + chunk).clip(max=n - 1)
        out.append(jnp.asarray(logra.grads(model, _take(batch, rows)))[: min(chunk, n - s)])
    return jnp.concatenate(out, axis=0)


def token_rows(batch: Mapping, mask_key: str = "mask") -> tuple[np.ndarray, np.ndarray]:
    """``(example, position)`` index arrays of the tokens that count in the loss (mask ≠ 0), in order."""
    mask = np.asarray(batch[mask_key])
    if mask.ndim != 2:
        raise ValueError(f"batch[{mask_key!r}] must be [B, T], got shape {mask.shape}")
    ex, pos = np.nonzero(mask)
    return ex.astype(np.int64), pos.astype(np.int64)


@jax.jit
def _contract(g, right):
    return jnp.einsum("cd,kd->ck", g, right, precision=_HI)


def _token_products(logra, model, batch: Mapping, right: jax.Array, *, mask_key: str, chunk: int,
                    transform: Callable | None = None) -> np.ndarray:
    """``[B, T, K]``: ``transform(g_bt) · right[k]`` for every counted token ``(b, t)`` (0 elsewhere);
    ``right`` is ``[K, D]``."""
    b_all, t_all = np.shape(batch[mask_key])
    right = jnp.asarray(right, jnp.float32)
    mask = np.asarray(batch[mask_key])
    ex, pos = token_rows(batch, mask_key)
    out = np.zeros((b_all, t_all, right.shape[0]), np.float32)
    for s in range(0, len(ex), chunk):
        sel = np.arange(s, s + chunk).clip(max=len(ex) - 1)
        live = np.arange(s, s + chunk) < len(ex)
        e, p = ex[sel], pos[sel]
        sub = _take(batch, e)
        onehot = np.zeros((chunk, t_all), mask.dtype)
        onehot[np.arange(chunk), p] = np.where(live, mask[e, p], 0)   # padding rows: an all-zero mask
        sub[mask_key] = onehot
        g = jnp.asarray(logra.grads(model, sub), jnp.float32)
        if transform is not None:
            g = jnp.asarray(transform(g), jnp.float32)
        vals = np.asarray(_contract(g, right))
        n_live = int(live.sum())
        out[e[:n_live], p[:n_live]] = vals[:n_live]
    return out


def token_influence(logra, model, queries, train: Mapping, *, precond=None, mode: str = "dot",
                    mask_key: str = "mask", chunk: int = 16, split_queries: bool = True,
                    check: bool = True) -> TokenInfluence:
    """Scores of ``queries`` against the training examples ``train`` and their exact per-token parts.

    Args:
      logra: a :class:`jaxval.LoGra`; ``model``: what its ``grads`` takes (the model or its parameters).
      queries: a batch ``{..., mask_key: [Q, U]}`` (its tokens are split too), or ``[Q, D]`` query
        gradients (only the training side is split).
      train: a batch ``{..., mask_key: [N, T]}`` of training examples (e.g. a query's top-k).
      precond: ``None`` (identity) or an object with ``apply(g [B, D]) -> H⁻¹ g`` (a
        :class:`jaxval.Preconditioner`); linear, as every preconditioner is.
      mode: ``dot`` (``g_qᵀH⁻¹g_z``), ``cosine`` (divided by ``sqrt(g_qᵀH⁻¹g_q · g_zᵀH⁻¹g_z)``) or
        ``relative`` (divided by ``sqrt(g_zᵀH⁻¹g_z)``), as in :func:`jaxval.influence`.
      mask_key: the batch entry the loss selects or weights its token losses with.
      chunk: (example, token) rows per LoGra call (memory: ``chunk`` sequences' forward and backward).
      split_queries: also split over the query's tokens (needs ``queries`` as a batch).
      check: warn when the parts do not sum to the scores (a loss that is not linear in the mask).

    Returns a :class:`TokenInfluence`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} for per-token influence, got {mode!r}")
    chunk = max(1, int(chunk))
    apply = (lambda g: g) if precond is None else precond.apply
    as_batch = isinstance(queries, Mapping)
    g_q = _whole_grads(logra, model, queries, chunk) if as_batch else jnp.asarray(queries, jnp.float32)
    if g_q.ndim != 2 or g_q.shape[1] != logra.dim:
        raise ValueError(f"query gradients must be [Q, {logra.dim}], got {tuple(g_q.shape)}")
    g_z = _whole_grads(logra, model, train, chunk)
    qt = jnp.asarray(apply(g_q), jnp.float32)                                  # H⁻¹ g_q  [Q, D]
    zt = jnp.asarray(apply(g_z), jnp.float32) if (mode != "dot" or (as_batch and split_queries)) else None
    dot = np.asarray(jnp.einsum("qd,nd->qn", qt, g_z, precision=_HI))
    norm = np.ones_like(dot)
    if mode in ("cosine", "relative"):
        s_z = np.asarray(jnp.einsum("nd,nd->n", zt, g_z, precision=_HI))
        norm = norm * _sqrt_pos(s_z)[None, :]
        if mode == "cosine":
            s_q = np.asarray(jnp.einsum("qd,qd->q", qt, g_q, precision=_HI))
            norm = norm * _sqrt_pos(s_q)[:, None]
    inv = np.where(norm > 0, 1.0 / np.where(norm > 0, norm, 1.0), 0.0).astype(np.float32)
    scores = dot * inv
    # the training side: q̃ · g_zt for every counted token t of every training example
    parts_z = _token_products(logra, model, train, qt, mask_key=mask_key, chunk=chunk)    # [N, T, Q]
    train_tokens = np.transpose(parts_z, (2, 0, 1)) * inv[:, :, None]                    # [Q, N, T]
    query_tokens = None
    if as_batch and split_queries:
        # the query side: (H⁻¹ g_qu) · g_z for every counted token u of every query
        parts_q = _token_products(logra, model, queries, g_z, mask_key=mask_key, chunk=chunk,
                                  transform=apply)                                       # [Q, U, N]
        query_tokens = np.transpose(parts_q, (0, 2, 1)) * inv[:, :, None]                # [Q, N, U]
    if check:
        _check_sums(scores, train_tokens, "training")
        if query_tokens is not None:
            _check_sums(scores, query_tokens, "query")
    return TokenInfluence(scores=scores.astype(np.float32), train_tokens=train_tokens.astype(np.float32),
                          query_tokens=None if query_tokens is None else query_tokens.astype(np.float32),
                          mode=mode)


def _sqrt_pos(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.where(x > 0, x, 0.0))


def _check_sums(scores: np.ndarray, parts: np.ndarray, side: str) -> None:
    total = parts.sum(-1, dtype=np.float64)
    scale = np.abs(parts).sum(-1, dtype=np.float64) + np.abs(scores) + 1e-30
    err = float(np.max(np.abs(total - scores) / scale)) if scores.size else 0.0
    if err > 1e-3:
        warnings.warn(f"jaxval.token_influence: the {side} tokens' parts miss the scores by {err:.2g} "
                      "(relative): the loss is not a mask-weighted sum of token losses (loss_b = Σ_t "
                      "mask_bt ℓ_bt), so the split is not exact", stacklevel=3)
