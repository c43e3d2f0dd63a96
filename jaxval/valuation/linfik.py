"""LinFiK: the linearized future influence kernel (Pan et al., NAACL 2025), from LoGra gradients.

Definition. For a training sample ``z``, a task set ``T = {t_1..t_m}`` with task loss
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
* **``normalize="layer"`` (optional).** Every example's gradient is split into its per-layer blocks and each
  block is scaled to unit L2 norm (pool and task examples alike) before the task mean and the dot product,
  as in the related codebase the notes mention. The value is then ``η Σ_layers ⟨ĝ_z^l, mean_j ĝ_{t_j}^l⟩``,
  a sum of per-layer cosines (bounded by ``η · #layers``): it removes the dominance of a few layers with huge
  gradients (embeddings, output heads) and of samples with large losses (long or noisy texts), which an
  unnormalised dot product rewards regardless of direction. It is no longer a first-order loss change.
* **``checkpoints`` (optional).** A sequence of models (same architecture) ``θ_1..θ_C``: the score is the
  sum ``Σ_c η_c ⟨g_z(θ_c), ḡ_T(θ_c)⟩`` (TracIn-style, each checkpoint with its own task gradient). ``lr`` may
  then be a scalar or one learning rate per checkpoint (the learning rate in effect around θ_c).
  Summing over checkpoints approximates the total first-order effect of ``z`` along a training run.

Proposition tools (the paper's justification for scoring early): :func:`gradient_stability` returns, for
a set of samples and a list of checkpoints, each sample's gradient direction cosine to its direction at a
reference (late) checkpoint, and the Spearman correlations of the per-sample gradient norms between every
pair of checkpoints; :func:`plot_stability` draws both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxval._src import precision
from jaxval._src.batching import batch_size as _batch_size, padded_batches
from jaxval._src.logra import LoGra

__all__ = [
    "linfik",
    "task_gradient",
    "pool_gradients",
    "layer_normalize",
    "gradient_stability",
    "plot_stability",
    "spearman",
    "pearson",
    "rankdata",
    "cli_linfik",
    "add_linfik_parser",
]

_HI = precision.MATMUL


# ----------------------------------------------------------------------------- small statistics

def rankdata(x) -> np.ndarray:
    """Ranks 1..n of ``x`` (ties get their average rank), as ``scipy.stats.rankdata``."""
    x = np.asarray(x, np.float64).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    xs = x[order]
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(a, b) -> float:
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"pearson needs equal lengths, got {a.shape} and {b.shape}")
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(rankdata(a), rankdata(b))


# ----------------------------------------------------------------------------- batching

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
        raise ValueError(f"normalize must be None or 'layer', got {normalize!r}")
    return None if normalize in (None, "none") else normalize


def _grads(logra: LoGra, model, batch, normalize):
    g = logra.grads(model, batch)
    return layer_normalize(logra, g) if normalize == "layer" else g


def pool_gradients(logra: LoGra, model, data, batch_size: int = 64, normalize=None) -> np.ndarray:
    """All ``[N, D]`` projected (optionally layer-normalised) gradients of ``data`` as float32 numpy.
    Memory ``N·D·4`` bytes: for analysis of modest sets; :func:`linfik` streams instead."""
    normalize = _check_normalize(normalize)
    out = []
    for _, nv, batch in padded_batches(data, batch_size):
        out.append(np.asarray(_grads(logra, model, batch, normalize))[:nv])
    return np.concatenate(out, axis=0)


def task_gradient(logra: LoGra, model, task, batch_size: int = 64, normalize=None) -> jax.Array:
    """``ḡ_T [D]``: the mean of the task examples' projected (optionally layer-normalised) gradients."""
    normalize = _check_normalize(normalize)
    m = _batch_size(task)
    total = jnp.zeros((logra.dim,), jnp.float32)
    for _, nv, batch in _batches(task, batch_size):
        g = _grads(logra, model, batch, normalize)
        total = total + jnp.sum(g[:nv], axis=0)
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
           precond=None, normalize: str | None = None, checkpoints: Sequence | None = None,
           return_per_checkpoint: bool = False) -> np.ndarray:
    """LinFiK scores ``[N]`` (float32 numpy) of the pool examples with respect to the task set.

    Args:
      logra: a :class:`jaxval.LoGra` built for the model's architecture.
      model: the checkpoint θ (ignored when ``checkpoints`` is given).
      pool, task: batch pytrees with a leading example axis (e.g. ``{"tokens", "mask"}``).
      lr: the step size η (scalar, or one per checkpoint).
      batch_size: examples per LoGra call (the last batch is padded, not recompiled).
      precond: optional preconditioner (``.apply(g) -> H⁻¹ g``) fitted with the same ``logra``.
      normalize: None (plain kernel) or ``"layer"`` (per-layer unit-normalised gradients).
      checkpoints: optional sequence of models; scores are summed over them.
      return_per_checkpoint: also return the ``[C, N]`` per-checkpoint terms.

    See the module docstring for the meaning and the rationale of each option.
    """
    normalize = _check_normalize(normalize)
    models = _as_models(model, checkpoints)
    lrs = _lrs(lr, len(models))
    n = _batch_size(pool)
    _batch_size(task)
    per = np.zeros((len(models), n), np.float32)
    for c, (m, eta) in enumerate(zip(models, lrs)):
        gt = task_gradient(logra, m, task, batch_size, normalize)
        if precond is not None:
            cfg = logra.config() if hasattr(precond, "check_config") else None
            gt = precond.apply(gt, cfg) if cfg is not None else precond.apply(gt)
        gt = jnp.asarray(gt, jnp.float32).reshape(-1)
        for start, nv, batch in padded_batches(pool, batch_size):
            g = _grads(logra, m, batch, normalize)
            s = eta * jnp.matmul(g, gt, precision=_HI)
            per[c, start:start + nv] = np.asarray(s)[:nv]
    total = per.sum(axis=0)
    return (total, per) if return_per_checkpoint else total


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
    rho = np.array([[spearman(norms[a], norms[b]) for b in range(c_n)] for a in range(c_n)])
    return {"norms": norms, "cosine": cos, "norm_spearman": rho, "cosine_consecutive": cons, "reference": ref}


def plot_stability(stats: Mapping, path: str, steps: Sequence[int] | None = None, title: str = "") -> str:
    """Two panels: (left) distribution of cos(g_z(θ_c), g_z(θ_ref)) per checkpoint (median and 10–90%
    band); (right) Spearman of gradient norms of every checkpoint vs the reference and vs the first.
    Saved to ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cos = np.asarray(stats["cosine"])
    rho = np.asarray(stats["norm_spearman"])
    ref = int(stats.get("reference", cos.shape[0] - 1))
    c_n = cos.shape[0]
    x = np.asarray(steps if steps is not None else np.arange(c_n))
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    med = np.median(cos, axis=1)
    lo, hi = np.percentile(cos, 10, axis=1), np.percentile(cos, 90, axis=1)
    ax[0].fill_between(x, lo, hi, alpha=0.3, label="10–90%")
    ax[0].plot(x, med, "o-", label="median")
    if "cosine_consecutive" in stats:
        cc = np.median(np.asarray(stats["cosine_consecutive"]), axis=1)
        ax[0].plot(x[1:], cc, "s--", label="median cos to previous ckpt")
    ax[0].set_xlabel("checkpoint (training step)")
    ax[0].set_ylabel(f"cos(g(θ_c), g(θ_{x[ref]}))")
    ax[0].set_title("gradient direction vs reference")
    ax[0].legend(fontsize=8)
    ax[1].plot(x, rho[:, ref], "o-", label=f"vs step {x[ref]}")
    ax[1].plot(x, rho[:, 0], "s--", label=f"vs step {x[0]}")
    ax[1].set_ylim(min(0.0, float(np.nanmin(rho)) - 0.05), 1.02)
    ax[1].set_xlabel("checkpoint (training step)")
    ax[1].set_ylabel("Spearman of per-sample ‖g‖")
    ax[1].set_title("rank stability of gradient norms")
    ax[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- LM pipeline + CLI

def lm_setup(cfg: Mapping) -> dict:
    """Build the WikiText-style LM valuation setup from a config dict (used by ``jaxval linfik`` and
    ``experiments/linfik_wikitext.py``).

    Keys (defaults): ``pool_corpus`` ("wikitext-2-valid"), ``task_corpus`` ("wikitext-2-test"),
    ``offdomain_corpus`` (None, e.g. "tinyshakespeare"), ``offdomain_fraction`` (0.2), ``vocab_size``
    (4096), ``block_len`` (128), ``max_pool`` (None), ``n_task`` (64), ``n_task_eval`` (128), ``seed`` (0).
    Tokenizer: word level, vocab from the pool corpus only (the task corpus is unseen). Returns
    ``{"tok", "pool", "pool_texts", "pool_source", "task", "task_eval", "task_texts"}``; pool blocks are
    shuffled with the seed; off-domain blocks are marked ``pool_source == 1``.
    """
    from jaxval.data import load_text
    from jaxval.data.text import WordTokenizer, make_blocks

    seed = int(cfg.get("seed", 0))
    rng = np.random.default_rng(seed)
    blen = int(cfg.get("block_len", 128))
    pool_text = load_text(cfg.get("pool_corpus", "wikitext-2-valid"))
    tok = WordTokenizer.from_text(pool_text, vocab_size=int(cfg.get("vocab_size", 4096)), eos="<eos>")
    pool = make_blocks(tok.encode(pool_text), blen)
    src = np.zeros(len(pool["tokens"]), np.int32)
    off = cfg.get("offdomain_corpus")
    if off:
        ob = make_blocks(tok.encode(load_text(off)), blen)
        k = int(round(float(cfg.get("offdomain_fraction", 0.2)) * len(src) / (1 - float(cfg.get("offdomain_fraction", 0.2)))))
        k = min(k, len(ob["tokens"]))
        pick = np.sort(rng.choice(len(ob["tokens"]), k, replace=False))
        pool = {key: np.concatenate([pool[key], ob[key][pick]]) for key in pool}
        src = np.r_[src, np.ones(k, np.int32)]
    perm = rng.permutation(len(src))
    if cfg.get("max_pool"):
        perm = perm[: int(cfg["max_pool"])]
    pool = {k: v[perm] for k, v in pool.items()}
    src = src[perm]
    task_all = make_blocks(tok.encode(load_text(cfg.get("task_corpus", "wikitext-2-test"))), blen)
    tperm = rng.permutation(len(task_all["tokens"]))
    nt, ne = int(cfg.get("n_task", 64)), int(cfg.get("n_task_eval", 128))
    task = {k: v[tperm[:nt]] for k, v in task_all.items()}
    task_eval = {k: v[tperm[nt:nt + ne]] for k, v in task_all.items()}
    texts = [tok.decode(t) for t in pool["tokens"]]
    return {"tok": tok, "pool": pool, "pool_texts": texts, "pool_source": src, "task": task,
            "task_eval": task_eval, "task_texts": [tok.decode(t) for t in task["tokens"]]}


def load_config(path: str | None, overrides: Sequence[str] = ()) -> dict:
    """YAML config plus ``key=value`` overrides (values parsed as YAML)."""
    import yaml

    cfg = {}
    if path:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    for ov in overrides or ():
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like key=value")
        k, v = ov.split("=", 1)
        cfg[k] = yaml.safe_load(v)
    return cfg


def add_linfik_parser(sub) -> None:
    """Register ``jaxval linfik`` on an argparse sub-parser collection."""
    p = sub.add_parser("linfik", help="LinFiK scores of an LM text pool w.r.t. a task set (from a YAML config)")
    p.add_argument("--config", required=True, help="YAML config (see configs/linfik_wikitext.yaml)")
    p.add_argument("--out", required=True, help="output folder: pool.jsonl (texts), linfik.npy, meta.json")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=cli_linfik)


def cli_linfik(args) -> int:
    """``jaxval linfik --config C --out DIR``: train the small GPT of the config on its pool for
    ``warmup_steps`` (the early checkpoint), compute LinFiK of every pool block w.r.t. the task blocks and
    write ``DIR/pool.jsonl`` ({"id", "text", "source"} per line), ``DIR/linfik.npy`` and ``DIR/meta.json``."""
    import json
    import os

    from flax import nnx

    from jaxval.models.gpt import GPT, GPTConfig, loss_fn
    from jaxval._src.train import train

    cfg = load_config(args.config, getattr(args, "set", ()))
    setup = lm_setup(cfg)
    seed = int(cfg.get("seed", 0))
    gcfg = GPTConfig(vocab_size=setup["tok"].vocab_size, block_size=int(cfg.get("block_len", 128)),
                     d_model=int(cfg.get("d_model", 128)), n_layer=int(cfg.get("n_layer", 2)),
                     n_head=int(cfg.get("n_head", 4)))
    model = GPT(gcfg, rngs=nnx.Rngs(seed))
    train(model, loss_fn, setup["pool"], steps=int(cfg.get("warmup_steps", 200)),
          batch_size=int(cfg.get("train_batch", 16)), lr=float(cfg.get("train_lr", 3e-3)), seed=seed, progress=False)
    logra = LoGra(model, loss_fn, rank=int(cfg.get("rank", 16)), seed=seed, layers=cfg.get("layers"))
    v = linfik(logra, model, setup["pool"], setup["task"], lr=float(cfg.get("linfik_lr", 1.0)),
               batch_size=int(cfg.get("batch_size", 32)), normalize=cfg.get("normalize"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pool.jsonl"), "w") as f:
        for i, (t, s) in enumerate(zip(setup["pool_texts"], setup["pool_source"])):
            f.write(json.dumps({"id": i, "text": t, "source": int(s)}) + "\n")
    np.save(os.path.join(args.out, "linfik.npy"), v)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump({"config": cfg, "n_pool": int(len(v)), "logra": logra.config()}, f, indent=1, default=str)
    print(f"wrote {len(v)} LinFiK scores to {args.out}")
    return 0
