"""LinFiK: the linearized future influence kernel (Pan et al., NAACL 2025), from LoGra gradients.

Definition (the plain kernel; the default score is its layer-normalised form, see below). For a training sample ``z``, a task set ``T = {t_1..t_m}`` with task loss
``L_T(θ) = (1/m) Σ_j ℓ(t_j; θ)`` and a checkpoint ``θ``, one SGD step on ``z`` with learning rate ``η``
(``θ' = θ − η ∇ℓ(z; θ)``) changes the task loss by

    L_T(θ) − L_T(θ') = η ⟨∇ℓ(z; θ), ∇L_T(θ)⟩ + O(η²),

and LinFiK is the first-order term, the *predicted decrease* of the task loss:

    LinFiK(z) = η · ⟨g_z, ḡ_T⟩,     ḡ_T = (1/m) Σ_j g_{t_j}

Positive = training on ``z`` is predicted to lower the task loss (same sign convention as
``jaxval.influence``). Losses follow the jaxval contract (per-example, an LM example's loss is the sum of
its token losses), so the task loss is the mean over task *examples* of summed token losses.

Choices (and why):

* **LoGra projected gradients.** ``g`` are the rows of ``logra.grads`` (``P_in ∂ℓ/∂W P_outᵀ`` per layer).
  With Gaussian ``N(0, 1/k)`` projections ``⟨P a, P b⟩`` is an unbiased estimate of ``⟨a, b⟩``, so the score
  is an unbiased estimate of the full-gradient kernel restricted to the tracked layers (layers LoGra does
  not track — LayerNorm scales, say — do not contribute; with ``init="identity"`` at full rank the value is
  exact for the tracked layers). The task gradient is averaged *after* projection (the projection is
  linear, so this is the projection of the mean gradient).
* **``precond`` (optional).** ``η ⟨g_z, H⁻¹ ḡ_T⟩`` with a :class:`jaxval.Preconditioner`: the first-order
  task-loss change of a preconditioned (natural-gradient / Newton-like) step ``θ' = θ − η H⁻¹ g_z``, i.e. the
  influence-function form. ``H⁻¹`` is applied once, to ``ḡ_T``; ``H`` is symmetric, so this equals
  ``⟨H⁻¹ g_z, ḡ_T⟩``. Use it when the training optimiser is Adam-like (curvature-scaled steps) or to
  compare with influence functions; plain LinFiK (SGD kernel) is the paper's definition.
* **``normalize="layer"`` (the default).** Every example's gradient is split into its per-layer blocks and
  each block is scaled to unit L2 norm (pool and task examples alike) before the task mean and the dot
  product. The value is then ``η Σ_layers ⟨ĝ_z^l, mean_j ĝ_{t_j}^l⟩``, a sum of per-layer cosines (bounded by
  ``η · #layers``). Why this is the default: the authors' code lineage (NOTES.md) scores with per-layer
  unit-normalised gradients and dot products; an unnormalised dot product is dominated by the few layers with
  huge gradients (embeddings, output heads) and by high-loss samples (long, noisy or off-domain texts), which
  it rewards regardless of their direction. Measured on both of jaxval's pools: on WikiText (a small GPT, 20%
  Shakespeare blocks mixed in, continued training on the top 20%) plain LinFiK picked 54.6% off-domain blocks
  and ended at task loss 4.530, *worse* than random (4.409), while the layer-normalised score picked 5.8%
  off-domain and reached 4.398; on the Howdy! backdoor pool (SmolLM2-135M, 200 injected of 800) plain LinFiK
  put 66.0% injected samples in its top 200 (average precision 0.650), the layer-normalised score 100%
  (1.000). It is no longer a first-order loss change: pass ``normalize=None`` (or ``"none"``) for the plain
  kernel ``η ⟨g_z, ḡ_T⟩`` of the definition above (the first-order task-loss change of an SGD step).
* **``checkpoints`` (optional).** A sequence of models (same architecture) ``θ_1..θ_C``: the score is the
  sum ``Σ_c η_c ⟨g_z(θ_c), ḡ_T(θ_c)⟩`` (TracIn-style, each checkpoint with its own task gradient). ``lr`` may
  then be a scalar or one learning rate per checkpoint (the learning rate in effect around θ_c).
  Summing over checkpoints approximates the total first-order effect of ``z`` along a training run.

Proposition tools (the paper's justification for scoring early): :func:`gradient_stability` returns, for
a set of samples and a list of checkpoints, each sample's gradient direction cosine to its direction at a
reference (late) checkpoint, and the Spearman correlations of the per-sample gradient norms between every
pair of checkpoints; :func:`jaxval.evaluation.plots.plot_stability` draws both.

This module holds the algorithm only; the WikiText pipeline and the ``jaxval linfik`` command are in
:mod:`jaxval.cli.linfik`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxval._src import precision
from jaxval._src.batching import batch_size as _batch_size, padded_batches, shard_batch
from jaxval._src.errors import ConfigError
from jaxval._src.logra import LoGra
from jaxval._src.stats import pearson, rankdata

__all__ = [
    "linfik",
    "linfik_parts",
    "task_gradient",
    "pool_gradients",
    "layer_normalize",
    "gradient_stability",
]

_HI = precision.MATMUL


# ----------------------------------------------------------------------------- gradients

def layer_normalize(logra: LoGra, g: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Scale each layer block of every row of ``g [B, D]`` to unit L2 norm (zero blocks stay zero)."""
    g = jnp.asarray(g, jnp.float32)
    parts = []
    for lo, hi in logra.offsets().values():
        blk = g[:, lo:hi]
        nrm = jnp.sqrt(jnp.sum(blk * blk, axis=1, keepdims=True))
        parts.append(blk / jnp.maximum(nrm, eps))
    return jnp.concatenate(parts, axis=1)


def _check_normalize(normalize):
    if normalize not in (None, "none", "layer"):
        raise ConfigError(f"normalize must be 'layer' (the default), None or 'none', got {normalize!r}")
    return None if normalize in (None, "none") else normalize


def _grads(logra: LoGra, model, batch, normalize, mesh=None):
    g = logra.grads(model, _place(batch, mesh))
    return layer_normalize(logra, g) if normalize == "layer" else g


def _place(batch, mesh):
    """The batch split over ``mesh``'s first axis (a mesh spanning several processes: each process places
    only the rows of its own devices; every process passes the same batch)."""
    if mesh is None:
        return batch
    from jaxval._src.parallel import global_batch, spans_processes

    if spans_processes(mesh):
        return global_batch(batch, mesh)
    return shard_batch(batch, mesh)


def _host(x, mesh) -> np.ndarray:
    """``x`` as a host array on every process (replicated first when it is sharded across processes)."""
    if mesh is not None and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.sharding import NamedSharding, PartitionSpec

        x = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def pool_gradients(logra: LoGra, model, data, batch_size: int = 64, normalize=None, mesh=None) -> np.ndarray:
    """All ``[N, D]`` projected (optionally layer-normalised) gradients of ``data`` as float32 numpy.
    Memory ``N·D·4`` bytes: for analysis of modest sets; :func:`linfik` streams instead."""
    normalize = _check_normalize(normalize)
    out = []
    for _, nv, batch in padded_batches(data, batch_size):
        out.append(_host(_grads(logra, model, batch, normalize, mesh), mesh)[:nv])
    return np.concatenate(out, axis=0)


def task_gradient(logra: LoGra, model, task, batch_size: int = 64, normalize=None, mesh=None) -> jax.Array:
    """``ḡ_T [D]``: the mean of the task examples' projected (optionally layer-normalised) gradients."""
    normalize = _check_normalize(normalize)
    m = _batch_size(task)
    total = jnp.zeros((logra.dim,), jnp.float32)
    for _, nv, batch in padded_batches(task, batch_size):
        g = _grads(logra, model, batch, normalize, mesh)
        total = total + jnp.asarray(_host(jnp.sum(g[:nv], axis=0), mesh))
    return total / m


def _as_models(model, checkpoints) -> list:
    if checkpoints is None:
        if model is None:
            raise ValueError("pass a model (or checkpoints=[model, ...])")
        return [model]
    ckpts = list(checkpoints)
    if not ckpts:
        raise ValueError("checkpoints is empty: pass a non-empty list of models (or None to use `model`)")
    return ckpts


def _lrs(lr, c: int) -> list[float]:
    if np.ndim(lr) == 0:
        return [float(lr)] * c
    lrs = [float(x) for x in np.asarray(lr).reshape(-1)]
    if len(lrs) != c:
        raise ValueError(f"lr has {len(lrs)} values but there are {c} checkpoints; pass one lr or one per checkpoint")
    return lrs


def linfik(logra: LoGra, model, pool, task, lr: float | Sequence[float] = 1.0, batch_size: int = 64,
           precond=None, normalize: str | None = "layer", checkpoints: Sequence | None = None,
           return_per_checkpoint: bool = False, mesh=None, unchecked: bool = False) -> np.ndarray:
    """LinFiK scores ``[N]`` (float32 numpy) of the pool examples with respect to the task set.

    Args:
      logra: a :class:`jaxval.LoGra` built for the model's architecture.
      model: the checkpoint θ (ignored when ``checkpoints`` is given).
      pool, task: batch pytrees with a leading example axis (e.g. ``{"tokens", "mask"}``).
      lr: the step size η (scalar, or one per checkpoint).
      batch_size: examples per LoGra call (the last batch is padded, not recompiled).
      precond: optional preconditioner (``.apply(g) -> H⁻¹ g``) fitted with the same ``logra``.
      normalize: ``"layer"`` (default: per-layer unit-normalised gradients, the authors' lineage) or None /
        ``"none"`` (the plain kernel ``η ⟨g_z, ḡ_T⟩``).
      checkpoints: optional sequence of models; scores are summed over them.
      return_per_checkpoint: also return the ``[C, N]`` per-checkpoint terms.
      mesh: optional ``jax.sharding.Mesh``: each batch is split over its first axis (also a mesh spanning
        several processes under ``jax.distributed``: every process passes the same pool and task, and gets
        the same scores); parameters placed with a ``NamedSharding`` stay sharded.
      unchecked: skip the provenance check of ``precond`` (by default a preconditioner fitted with another
        LoGra configuration, or, for one ``model``, on other weights, raises :class:`jaxval.ProvenanceError`).

    See the module docstring for the meaning and the rationale of each option.
    """
    normalize = _check_normalize(normalize)
    models = _as_models(model, checkpoints)
    lrs = _lrs(lr, len(models))
    _check_precond_provenance(logra, models[0] if checkpoints is None else None, precond, unchecked)
    n = _batch_size(pool)
    _batch_size(task)
    per = np.zeros((len(models), n), np.float32)
    for c, (m, eta) in enumerate(zip(models, lrs)):
        gt = task_gradient(logra, m, task, batch_size, normalize, mesh)
        if precond is not None:
            cfg = logra.config() if hasattr(precond, "check_config") else None
            gt = precond.apply(gt, cfg) if cfg is not None else precond.apply(gt)
        gt = _host(jnp.asarray(gt, jnp.float32).reshape(-1), mesh)  # host: usable with any mesh
        for start, nv, batch in padded_batches(pool, batch_size):
            g = _grads(logra, m, batch, normalize, mesh)
            s = eta * jnp.matmul(g, gt, precision=_HI)
            per[c, start:start + nv] = _host(s, mesh)[:nv]
    total = per.sum(axis=0)
    return (total, per) if return_per_checkpoint else total


def _position_parts(layers, pairs, g, t_flat, normalize: bool):
    """``[B, T]`` parts of ``⟨g_b, t⟩`` over the products' positions, each layer's divided by the norm of its
    block of ``g`` when normalising. A layer's block is ``Σ_calls Σ_t a_t c_tᵀ`` (``blocks_from_pairs``), so its
    part at ``t`` is ``a_tᵀ T c_t`` with ``T`` the task gradient's block in the same row-major layout."""
    lengths = {layer.name: sorted({a.shape[1] for a, _, _ in pairs[layer.name]}) for layer in layers}
    if len({t for ts in lengths.values() for t in ts}) != 1:         # static shapes: raised while tracing
        raise ConfigError(
            f"linfik_parts needs one position axis shared by every tracked layer; their products have "
            f"{', '.join(f'{n}: {ts}' for n, ts in lengths.items())} positions: track only layers of one sequence "
            "length (LoGra layers=...)")
    out, lo = 0.0, 0
    for layer in layers:
        calls = pairs[layer.name]
        ka, kc = calls[0][0].shape[-1], calls[0][1].shape[-1]
        blk = t_flat[lo:lo + ka * kc].reshape(ka, kc)
        part = sum(jnp.einsum("btk,kl,btl->bt", a, blk, c, precision=_HI) for a, c, _ in calls)
        if normalize:
            gl = g[:, lo:lo + ka * kc]
            part = part / jnp.maximum(jnp.sqrt(jnp.sum(gl * gl, axis=1)), 1e-12)[:, None]
        out = out + part
        lo += ka * kc
    return out


def _layer_parts(layers, losses, pairs, g, task):
    """The LoGra step's ``reduce`` for ``normalize="layer"`` (module level: the step cache keys on it)."""
    return _position_parts(layers, pairs, g, task, True)


def _plain_parts(layers, losses, pairs, g, task):
    """The LoGra step's ``reduce`` for the plain kernel."""
    return _position_parts(layers, pairs, g, task, False)


def linfik_parts(logra: LoGra, model, pool, task=None, *, task_grad=None, lr: float = 1.0, batch_size: int = 64,
                 normalize: str | None = "layer") -> np.ndarray:
    """LinFiK scores split exactly over positions: ``[N, T]`` float32 with ``parts.sum(1) == linfik(...)``.

    The projected gradient of a layer is a sum over the positions ``t`` of its product's input (for a causal
    LM, the input tokens): ``g^l = Σ_t (P_in x_t)(P_out dy_t)ᵀ``. The score ``η Σ_l ⟨g^l, ḡ_T^l⟩ / ‖g^l‖``
    (``normalize="layer"``; without the norm for ``None``) is linear in that sum, so its part at ``t`` is
    ``η Σ_l ⟨(P_in x_t)(P_out dy_t)ᵀ, ḡ_T^l⟩ / ‖g^l‖``: the share of the score that flows through position ``t``
    (in a position-wise top layer, that of the loss of the token predicted there). One LoGra pass per batch, as
    for the scores; the students of :func:`jaxval.valuation.alinfik.fit_token_student` learn from these parts.

    Args:
      pool: batch pytree with a leading example axis; every tracked product must share its position axis ``T``.
      task: the task batch, or ``task_grad``: ``ḡ_T [D]`` already computed by :func:`task_gradient` with the
        same ``normalize`` (one of the two).
      lr, batch_size, normalize: as :func:`linfik` (no preconditioner, one checkpoint).
    """
    normalize = _check_normalize(normalize)
    if (task is None) == (task_grad is None):
        raise ConfigError("pass exactly one of task (a batch) and task_grad (its task_gradient)")
    if task_grad is None:
        task_grad = task_gradient(logra, model, task, batch_size, normalize)
    gt = jnp.asarray(task_grad, jnp.float32).reshape(-1)
    if gt.shape[0] != logra.dim:
        raise ConfigError(f"task_grad has {gt.shape[0]} entries, this LoGra's gradients {logra.dim}")
    step, state = logra.step_for(model, _layer_parts if normalize == "layer" else _plain_parts)
    out = [np.asarray(step(state, batch, logra.projections, None, gt)[2])[:nv]
           for _, nv, batch in padded_batches(pool, batch_size)]
    return float(lr) * np.concatenate(out, axis=0)


def _check_precond_provenance(logra, model, precond, unchecked: bool) -> None:
    """A preconditioner recording its provenance must come from this LoGra (and, for one model, its weights)."""
    from jaxval._src import provenance as prov

    pp = prov.of_precond(precond)
    if pp is None or unchecked:
        return
    try:
        mine = prov.Provenance.of(logra, model)
    except Exception:  # noqa: BLE001 - weights this process cannot read whole: the configuration only
        mine = prov.Provenance.of(logra)
    if mine.fingerprint is None:
        pp = prov.Provenance(pp.config_hash, None)
    prov.check({"LoGra gradients": mine, "preconditioner": pp}, what="linfik")


# ----------------------------------------------------------------------------- propositions

def gradient_stability(logra: LoGra, checkpoints: Sequence, data, batch_size: int = 64, reference: int = -1,
                       normalize: str | None = None) -> dict:
    """Per-sample gradient statistics across checkpoints (the paper's two propositions).

    Returns a dict of numpy arrays:
      ``norms [C, N]``: ‖g_z(θ_c)‖ (projected gradients);
      ``cosine [C, N]``: cos(g_z(θ_c), g_z(θ_ref)), ``ref = checkpoints[reference]`` (the row of the
      reference itself is 1) — Proposition 1: the direction stabilises early, cosines rise towards 1;
      ``norm_spearman [C, C]``: Spearman correlation of the per-sample norms between checkpoints —
      Proposition 2: the ordering of gradient norms is stable;
      ``cosine_consecutive [C-1, N]``: cos(g_z(θ_c), g_z(θ_{c+1})).
    """
    normalize = _check_normalize(normalize)
    models = list(checkpoints)
    if len(models) < 2:
        raise ValueError("gradient_stability needs at least two checkpoints")
    c_n = len(models)
    ref = reference % c_n
    n = _batch_size(data)
    norms = np.zeros((c_n, n), np.float32)
    cos = np.zeros((c_n, n), np.float32)
    cons = np.zeros((c_n - 1, n), np.float32)

    def unit(g):
        return g / jnp.maximum(jnp.linalg.norm(g, axis=1, keepdims=True), 1e-30)

    for start, nv, batch in padded_batches(data, batch_size):
        gs = [_grads(logra, m, batch, normalize) for m in models]
        us = [unit(g) for g in gs]
        for c in range(c_n):
            norms[c, start:start + nv] = np.asarray(jnp.linalg.norm(gs[c], axis=1))[:nv]
            cos[c, start:start + nv] = np.asarray(jnp.sum(us[c] * us[ref], axis=1))[:nv]
            if c < c_n - 1:
                cons[c, start:start + nv] = np.asarray(jnp.sum(us[c] * us[c + 1], axis=1))[:nv]
    r = rankdata(norms, axis=1)
    rho = pearson(np.broadcast_to(r[:, None], (c_n, c_n, n)), np.broadcast_to(r[None], (c_n, c_n, n)), axis=-1)
    return {"norms": norms, "cosine": cos, "norm_spearman": rho, "cosine_consecutive": cons, "reference": ref}
