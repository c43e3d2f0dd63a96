"""Influence methods compared in the evaluation harness, all returning ``scores [Q, N]`` with the package
sign convention (positive = the training example lowers the query's loss).

- :func:`logra_scores`: LoGra projected gradients (any init / rank) + a preconditioner kind.
- :func:`ekfac_scores`: EK-FAC on the un-projected model (``rank=None, init="identity"``: exact per-layer
  K-FAC factors); training gradients are streamed in batches, never stored as ``[N, D]``.
- :func:`grad_scores`: TracIn at one checkpoint: ``g_qᵀ g_z`` (dot) or its cosine, full gradients.
- :func:`trak_scores`: TRAK-style: full per-example gradients by ``vmap(grad)``, projected with a dense
  random Rademacher matrix ``[P, k]`` that is generated block by block from a key (never one dense matrix
  in memory), then ``φ_qᵀ (ΦᵀΦ/N + λI)⁻¹ φ_z`` (one checkpoint, no ensembling).
- :func:`representation_scores`: cosine similarity of a hidden representation (e.g. the last hidden layer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxval._src.logra import LoGra
from jaxval._src import precision
from jaxval._src.batching import batch_size as _n, iterate_batches
from jaxval._src.curvature import fit_preconditioner, pca_projections

_HI = precision.MATMUL


def _grads_all(logra: LoGra, model, data, batch_size: int) -> np.ndarray:
    return np.concatenate([np.asarray(logra.grads(model, b)) for _, b in iterate_batches(data, batch_size)])


def streamed_scores(logra: LoGra, model, hq, train, batch_size: int = 64, normalize: bool = False) -> np.ndarray:
    """``hq [Q, D] @ g_trainᵀ`` with training gradients computed batch by batch (``[N, D]`` never stored),
    in LoGra's compiled step (a reduction of its pairs). ``normalize``: divide each column by ``‖g_z‖``
    (for cosine)."""
    step, state = logra.step_for(model, _contract_normalized if normalize else _contract, grads=False)
    hq = jnp.asarray(hq)
    out = [np.asarray(step(state, b, logra.projections, None, hq)[2]) for _, b in iterate_batches(train, batch_size)]
    return np.concatenate(out, axis=1)


def _contract(layers, losses, pairs, g, hq):
    """``[Q, B]``: ``hq · g_bᵀ`` per layer; with few tokens per example straight from the layer's projected
    inputs and cotangents, ``Σ_t a_tᵀ (H⁻¹g_q) s_t`` (the ``[B, k_in·k_out]`` block is never written)."""
    total, o = 0.0, 0
    for l in layers:
        hql = hq[:, o:o + l.k_in * l.k_out].reshape(-1, l.k_in, l.k_out)
        o += l.k_in * l.k_out
        calls = pairs[l.name]
        if sum(a.shape[1] for a, _, _ in calls) <= 2:
            total += sum(jnp.einsum("btk,qkl,btl->qb", a, hql, c, precision=_HI) for a, c, _ in calls)
        else:
            blk = sum(jnp.einsum("btk,btl->bkl", a, c, precision=_HI) for a, c, _ in calls)
            total += jnp.einsum("qkl,bkl->qb", hql, blk, precision=_HI)
    return total


def _contract_normalized(layers, losses, pairs, g, hq):
    """``[Q, B]``: ``hq · g_bᵀ / ‖g_b‖`` (one contraction over D)."""
    s = jax.lax.dot_general(hq, g, (((1,), (1,)), ((), ())), precision=_HI)
    return s / jnp.maximum(jnp.linalg.norm(g, axis=1), 1e-30)


def ekfac_streamed_scores(logra: LoGra, model, queries, train, precond, batch_size: int = 64) -> np.ndarray:
    """``[Q, N]`` scores ``g_qᵀ H⁻¹ g_z`` for a K-FAC / EK-FAC ``precond`` (``H = Q_A diag(L) Q_Sᵀ``-factored
    per layer, plus its damping ``λ``), computed in the eigenbasis: no ``pc.apply`` and no ``[B, D]`` block.

    Per layer, each example's pairs are rotated, ``ã_t = Q_Aᵀ a_t`` ``[k_in]`` and ``s̃_t = Q_Sᵀ s_t``
    ``[k_out]``; the query side is ``M_q = (Σ_t ã_t s̃_tᵀ) / (L + λ)`` ``[Q, k_in, k_out]`` (cost
    ``Q·T·(k_in² + k_out² + k_in·k_out)`` instead of ``apply``'s ``Q·(k_in²·k_out + k_in·k_out²)``), and a
    training example's score is ``Σ_t ã_btᵀ M_q s̃_bt`` (``M_q`` is consumed as one row-major GEMM
    ``[Q·k_in, k_out] @ s̃ᵀ``). Equal in exact arithmetic to ``precond.apply(g_q) @ g_zᵀ``.
    ``queries`` / ``train``: data (pytrees with a leading example axis) streamed in ``batch_size`` batches."""
    if getattr(precond, "kind", None) not in ("kfac", "ekfac"):
        raise ValueError(f"ekfac_streamed_scores needs a 'kfac' or 'ekfac' Preconditioner, got "
                         f"{getattr(precond, 'kind', type(precond).__name__)!r}; use streamed_scores with "
                         "hq = precond.apply(g_query) for other kinds")
    precond.check_config(logra.config())
    names = tuple(l.name for l in logra.layers)
    shapes = tuple((l.k_in, l.k_out) for l in logra.layers)
    if tuple(precond.names) != names or tuple(precond.shapes) != shapes:
        raise ValueError(f"the preconditioner's layers {list(precond.names)} {list(precond.shapes)} are not this "
                         f"LoGra's {list(names)} {list(shapes)}; fit the preconditioner with this LoGra")
    rot = {n: (precond.factors[n]["QA"], precond.factors[n]["QS"]) for n in names}
    inv = {n: 1.0 / (precond.factors[n]["L"] + jnp.asarray(precond.damping[n], jnp.float32)) for n in names}
    qstep, state = logra.step_for(model, _rotated_blocks, grads=False)
    parts = [qstep(state, b, logra.projections, None, rot)[2] for _, b in iterate_batches(queries, batch_size)]
    m = {n: jnp.concatenate([p[n] for p in parts]) * inv[n] for n in names}
    tstep, _ = logra.step_for(model, _eigen_contract, grads=False)
    out = [np.asarray(tstep(state, b, logra.projections, None, (rot, m))[2])
           for _, b in iterate_batches(train, batch_size)]
    return np.concatenate(out, axis=1)


def _rotated(pairs, name, qa, qs):
    """Per call ``(ã [B,T,k_in], s̃ [B,T,k_out])``: the layer's pairs in the factors' eigenbasis."""
    return [(jnp.matmul(a.astype(jnp.float32), qa, precision=_HI), jnp.matmul(c.astype(jnp.float32), qs, precision=_HI))
            for a, c, _ in pairs[name]]


def _rotated_blocks(layers, losses, pairs, g, rot):
    """``{name: [B, k_in, k_out]}``: ``Q_Aᵀ G_b Q_S = Σ_t ã_t s̃_tᵀ``."""
    return {l.name: sum(jnp.einsum("btk,btl->bkl", a, c, precision=_HI) for a, c in _rotated(pairs, l.name, *rot[l.name]))
            for l in layers}


def _eigen_contract(layers, losses, pairs, g, aux):
    """``[Q, B]``: ``Σ_layers Σ_t ã_btᵀ M_q s̃_bt`` (few tokens) or ``⟨M_q, Σ_t ã_bt s̃_btᵀ⟩`` (many)."""
    rot, m = aux
    total = 0.0
    for l in layers:
        mq = m[l.name]
        q = mq.shape[0]
        calls = _rotated(pairs, l.name, *rot[l.name])
        if sum(a.shape[1] for a, _ in calls) <= 2:
            for a, c in calls:
                b, t = a.shape[:2]
                ms = jnp.matmul(mq.reshape(q * l.k_in, l.k_out), c.reshape(b * t, l.k_out).T, precision=_HI)
                total += jnp.einsum("qkbt,btk->qb", ms.reshape(q, l.k_in, b, t), a, precision=_HI)
        else:
            blk = sum(jnp.einsum("btk,btl->bkl", a, c, precision=_HI) for a, c in calls)
            total += jnp.matmul(mq.reshape(q, -1), blk.reshape(blk.shape[0], -1).T, precision=_HI)
    return total


def logra_scores(model, loss_fn, train, queries, *, rank=64, init: str = "gaussian", kind: str = "ekfac",
                 seed: int = 0, layers=None, fit_data=None, batch_size: int = 64, precond_kw: Mapping | None = None,
                 store_train: bool = True, progress: bool = False) -> np.ndarray:
    """LoGra scores ``g_qᵀ H⁻¹ g_z`` (``init="pca"`` fits the projections on ``fit_data`` first).
    ``precond_kw``: extra ``fit_preconditioner`` arguments (damping, fisher, sample_fn, num_samples...)."""
    fit_data = train if fit_data is None else fit_data
    proj = None
    if init == "pca":
        proj = pca_projections(model, loss_fn, fit_data, rank=rank, layers=layers, batch_size=batch_size,
                               progress=progress)
    lg = LoGra(model, loss_fn, rank=rank, init=init, seed=seed, layers=layers, projections=proj)
    pc = fit_preconditioner(lg, model, fit_data, kind=kind, batch_size=batch_size, progress=progress,
                            **dict(precond_kw or {}))
    hq = pc.apply(jnp.asarray(_grads_all(lg, model, queries, batch_size)))
    if store_train:
        g = jnp.asarray(_grads_all(lg, model, train, batch_size))
        return np.asarray(jnp.matmul(hq, g.T, precision=_HI))
    return streamed_scores(lg, model, hq, train, batch_size)


def ekfac_scores(model, loss_fn, train, queries, *, kind: str = "ekfac", layers=None, fit_data=None,
                 batch_size: int = 64, precond_kw: Mapping | None = None, progress: bool = False) -> np.ndarray:
    """Influence with the un-projected (exact per-layer factor) K-FAC / EK-FAC preconditioner."""
    return logra_scores(model, loss_fn, train, queries, rank=None, init="identity", kind=kind, layers=layers,
                        fit_data=fit_data, batch_size=batch_size, precond_kw=precond_kw, store_train=False,
                        progress=progress)


def grad_scores(model, loss_fn, train, queries, *, mode: str = "dot", layers=None, batch_size: int = 64) -> np.ndarray:
    """TracIn at one checkpoint (learning rate 1): full-gradient dot products or cosines."""
    if mode not in ("dot", "cosine"):
        raise ValueError(f"mode must be 'dot' or 'cosine', got {mode!r}")
    lg = LoGra(model, loss_fn, rank=None, init="identity", layers=layers)
    gq = jnp.asarray(_grads_all(lg, model, queries, batch_size))
    if mode == "cosine":
        gq = gq / jnp.maximum(jnp.linalg.norm(gq, axis=1, keepdims=True), 1e-30)
    return streamed_scores(lg, model, gq, train, batch_size, normalize=mode == "cosine")


# ----------------------------------------------------------------------------- TRAK-style dense projection

def _per_example_flat_grads(model, loss_fn):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat0, unravel = jax.flatten_util.ravel_pytree(params)

    def single(flat, example):
        m = nnx.merge(graphdef, unravel(flat), rest)
        return loss_fn(m, jax.tree.map(lambda a: a[None], example))[0]

    fn = jax.jit(jax.vmap(jax.grad(single), in_axes=(None, 0)))
    return flat0, fn


def dense_projection(g: jax.Array, key, k: int, block: int = 8192) -> jax.Array:
    """``g [B, P] @ R [P, k]`` with ``R`` Rademacher ``±1/√k``; ``R``'s row block ``j`` (rows
    ``j·block … (j+1)·block``) is drawn from ``fold_in(key, j)``, one block at a time inside a
    ``lax.scan``, so the full ``[P, k]`` matrix never exists. Same key, same ``R`` for any batch."""
    b, p = g.shape
    nb = -(-p // block)
    g = jnp.pad(g, ((0, 0), (0, nb * block - p))).reshape(b, nb, block).transpose(1, 0, 2)
    scale = 1.0 / np.sqrt(k)

    def body(acc, xs):
        j, gj = xs
        r = jax.random.rademacher(jax.random.fold_in(key, j), (block, k), jnp.float32) * scale
        # rows past P are multiplied by zero-padded gradient entries, so they never contribute
        return acc + jnp.matmul(gj, r, precision=_HI), None

    acc, _ = jax.lax.scan(body, jnp.zeros((b, k), jnp.float32), (jnp.arange(nb), g))
    return acc


_dense_projection = jax.jit(dense_projection, static_argnames=("k", "block"))


def trak_features(model, loss_fn, data, *, k: int = 512, seed: int = 0, batch_size: int = 64,
                  block: int = 8192) -> np.ndarray:
    """``[N, k]`` randomly projected full per-example gradients."""
    flat0, fn = _per_example_flat_grads(model, loss_fn)
    key = jax.random.key(seed)
    out = []
    for _, b in iterate_batches(data, batch_size):
        out.append(np.asarray(_dense_projection(fn(flat0, b), key, k=k, block=block)))
    return np.concatenate(out)


def trak_scores(model, loss_fn, train, queries, *, k: int = 512, seed: int = 0, damping: float = 1e-3,
                batch_size: int = 64, block: int = 8192) -> np.ndarray:
    """TRAK-style scores ``φ_qᵀ (ΦᵀΦ/N + λ·mean eig·I)⁻¹ φ_z`` (``damping`` relative to the mean eigenvalue)."""
    phi = trak_features(model, loss_fn, train, k=k, seed=seed, batch_size=batch_size, block=block).astype(np.float64)
    phq = trak_features(model, loss_fn, queries, k=k, seed=seed, batch_size=batch_size, block=block).astype(np.float64)
    gram = phi.T @ phi / len(phi)
    lam = damping * np.trace(gram) / len(gram)
    hq = np.linalg.solve(gram + lam * np.eye(len(gram)), phq.T).T
    return (hq @ phi.T).astype(np.float32)


# ----------------------------------------------------------------------------- representation similarity

def representation_scores(features_fn: Callable[[Any, Any], jax.Array], model, train, queries,
                          batch_size: int = 256) -> np.ndarray:
    """Cosine similarity of ``features_fn(model, batch) -> [B, F]`` (e.g. the last hidden layer)."""
    def feats(data):
        f = np.concatenate([np.asarray(features_fn(model, b)) for _, b in iterate_batches(data, batch_size)])
        f = f.reshape(len(f), -1).astype(np.float64)
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-30)

    return (feats(queries) @ feats(train).T).astype(np.float32)


# ----------------------------------------------------------------------------- dispatch from a config

def compute_scores(spec: Mapping[str, Any], model, loss_fn, train, queries, *, precond_kw: Mapping | None = None,
                   features_fn: Callable | None = None, batch_size: int = 64) -> np.ndarray:
    """Scores ``[Q, N]`` of one method described by ``spec`` (a config entry):

    ``{type: logra, rank, init, kind}`` | ``{type: ekfac, kind: ekfac|kfac}`` (un-projected) |
    ``{type: grad, mode: dot|cosine}`` | ``{type: trak, k, seed, damping}`` | ``{type: repsim}``.
    ``precond_kw`` (damping, fisher, sample_fn, num_samples...) is used by logra and ekfac, updated by
    the spec's own ``precond`` entry."""
    kind = spec["type"]
    kw = dict(precond_kw or {})
    kw.update(spec.get("precond", {}))
    if kind == "logra":
        if spec.get("kind", "identity") == "identity":
            kw = {}
        return logra_scores(model, loss_fn, train, queries, rank=spec.get("rank", 64), init=spec.get("init", "gaussian"),
                            kind=spec.get("kind", "identity"), seed=spec.get("seed", 0), batch_size=batch_size,
                            precond_kw=kw)
    if kind == "ekfac":
        return ekfac_scores(model, loss_fn, train, queries, kind=spec.get("kind", "ekfac"), batch_size=batch_size,
                            precond_kw=kw)
    if kind == "grad":
        return grad_scores(model, loss_fn, train, queries, mode=spec.get("mode", "dot"), batch_size=batch_size)
    if kind == "trak":
        return trak_scores(model, loss_fn, train, queries, k=spec.get("k", 512), seed=spec.get("seed", 0),
                           damping=spec.get("damping", 1e-3), batch_size=batch_size)
    if kind == "repsim":
        if features_fn is None:
            raise ValueError("method type 'repsim' needs features_fn(model, batch) -> [B, F]")
        return representation_scores(features_fn, model, train, queries)
    raise ValueError(f"unknown method type {kind!r}; use logra | ekfac | grad | trak | repsim")
