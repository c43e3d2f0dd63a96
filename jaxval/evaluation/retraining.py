"""Evaluation of influence scores: retraining harness, LDS, leave-one-out, brittleness.

Sign convention (the whole package): ``score[q, i] > 0`` means training on example ``i`` LOWERS the
loss of query ``q`` (``i`` is a proponent). Hence

- removing ``i`` is predicted to RAISE q's loss by ``score[q, i]`` (leave-one-out: ``Δloss ≈ score``);
- training on a subset ``S`` is predicted to give q a loss ``≈ const − Σ_{i∈S} score[q, i]``, so the
  LDS correlates ``−Σ_{i∈S} score[q, i]`` with the measured loss (a perfect method has LDS = +1).

Retraining harness
------------------
:func:`retrain` trains ``M`` models at once: ``jax.vmap`` over per-model ``(mask [N], seed)`` inside
one jit-compiled ``lax.scan`` over optimisation steps (functional parameters via ``nnx.split`` /
``nnx.merge``, optax optimiser). Model ``m`` starts from ``make_model(nnx.Rngs(seed_m))`` (or from a
shared ``warm_start`` model) and, at each step, draws ``batch_size`` examples uniformly with
replacement from its own subset ``{i : mask[m, i]}`` (``batch_size=None``: full-batch on the subset's
mean loss). Only the outputs of ``eval_fn`` on the evaluation data are kept (not the parameters). They
are cached with orbax (``jaxval.checkpoint``) per chunk of models, under a key that hashes the whole
configuration (data, masks, seeds, model fingerprint, optimiser, steps, evaluation data), so a rerun
or a resumed run only trains what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxval._src import checkpoint
from jaxval._src.logra import model_fingerprint

__all__ = [
    "RetrainConfig", "retrain", "lds_masks", "lds", "LDSResult", "spearman", "pearson",
    "leave_one_out", "loo_correlation", "brittleness_masks", "brittleness", "removal_effect", "subset_seeds",
]


# ----------------------------------------------------------------------------- statistics

def _rank(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Average ranks (ties share their mean rank) along ``axis``."""
    from scipy.stats import rankdata

    return rankdata(a, axis=axis)


def pearson(a, b, axis: int = 0) -> np.ndarray:
    """Pearson correlation of ``a`` and ``b`` along ``axis`` (nan where one side is constant)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a - a.mean(axis, keepdims=True)
    b = b - b.mean(axis, keepdims=True)
    den = np.sqrt((a * a).sum(axis) * (b * b).sum(axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis) / np.where(den > 0, den, 1), np.nan)


def spearman(a, b, axis: int = 0) -> np.ndarray:
    """Spearman rank correlation of ``a`` and ``b`` along ``axis``."""
    return pearson(_rank(np.asarray(a), axis), _rank(np.asarray(b), axis), axis)


# ----------------------------------------------------------------------------- retraining harness

@dataclasses.dataclass(frozen=True)
class RetrainConfig:
    """How each model is (re)trained. ``optimizer``: ``adam`` | ``sgd`` | ``momentum`` (Nesterov 0.9).

    ``l2``: coupled L2 penalty ``l2/2 ‖θ‖²`` added to the mean loss (the damping of a convex model);
    ``weight_decay``: decoupled (AdamW) decay. ``batch_size=None``: full batch."""

    steps: int
    lr: float
    batch_size: int | None = 64
    optimizer: str = "adam"
    l2: float = 0.0
    weight_decay: float = 0.0
    chunk: int = 32  # models per vmapped, jit-compiled call

    def optax(self) -> optax.GradientTransformation:
        if self.optimizer == "adam":
            return optax.adamw(self.lr, weight_decay=self.weight_decay) if self.weight_decay else optax.adam(self.lr)
        if self.optimizer == "sgd":
            return optax.sgd(self.lr)
        if self.optimizer == "momentum":
            return optax.sgd(self.lr, momentum=0.9, nesterov=True)
        raise ValueError(f"unknown optimizer {self.optimizer!r}; use adam | sgd | momentum")


def _hash_arrays(h, tree) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())


def _default_eval(loss_fn):
    def ev(model, data):
        return {"loss": loss_fn(model, data)}
    return ev


def _build_trainer(make_model, loss_fn, eval_fn, cfg: RetrainConfig, n: int, warm_state):
    tx = cfg.optax()
    template = make_model(nnx.Rngs(0))
    graphdef, _, rest0 = nnx.split(template, nnx.Param, ...)

    def init_params(key):
        if warm_state is not None:
            return warm_state
        m = make_model(nnx.Rngs(key))
        return nnx.split(m, nnx.Param, ...)[1]

    def objective(p, rest, batch, w):
        losses = loss_fn(nnx.merge(graphdef, p, rest), batch)
        obj = jnp.sum(losses * w) / jnp.maximum(jnp.sum(w), 1.0)
        if cfg.l2:
            obj = obj + 0.5 * cfg.l2 * sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p))
        return obj

    def one(mask, seed, train, eval_data):
        key = jax.random.key(seed)
        k_init, k_data = jax.random.split(key)
        params = init_params(k_init)
        opt_state = tx.init(params)
        mask = mask.astype(jnp.float32)
        n_sub = jnp.maximum(jnp.sum(mask), 1.0).astype(jnp.int32)
        order = jnp.argsort(1.0 - mask, stable=True)  # subset's indices first

        def step(carry, t):
            params, opt_state = carry
            if cfg.batch_size is None:
                batch, w = train, mask
            else:
                pos = jax.random.randint(jax.random.fold_in(k_data, t), (cfg.batch_size,), 0, n_sub)
                idx = order[pos]
                batch = jax.tree.map(lambda a: a[idx], train)
                w = jnp.ones((cfg.batch_size,), jnp.float32)
            grads = jax.grad(objective)(params, rest0, batch, w)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, opt_state), jnp.arange(cfg.steps))
        return eval_fn(nnx.merge(graphdef, params, rest0), eval_data)

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))


def retrain(make_model: Callable[[nnx.Rngs], nnx.Module], loss_fn, train: Mapping[str, Any], masks, seeds,
            config: RetrainConfig, eval_data: Mapping[str, Any], eval_fn: Callable | None = None, *,
            warm_start: nnx.Module | None = None, cache_dir: str | None = None, tag: str = "",
            progress: bool = True) -> dict[str, np.ndarray]:
    """Train ``M = len(masks)`` models, model ``m`` on ``{i : masks[m, i]}`` with seed ``seeds[m]``, and
    return ``eval_fn(model_m, eval_data)`` stacked over models: ``{name: [M, ...]}``.

    make_model: ``rngs -> nnx.Module`` (fresh initialisation from the seed) — also fixes the architecture.
    loss_fn: per-example losses ``[B]``; the trained objective is their mean over the subset (+ ``l2``).
    eval_fn: ``(model, eval_data) -> {name: array}`` (default ``{"loss": loss_fn(model, eval_data)}``).
    warm_start: start every model from this model's parameters (then the seed only picks the batches).
    cache_dir: orbax cache of the outputs, one checkpoint per chunk of ``config.chunk`` models.
    """
    masks = np.asarray(masks, bool)
    seeds = np.asarray(seeds, np.int64).astype(np.uint32)
    if masks.ndim != 2:
        raise ValueError(f"masks must be [M, N] booleans, got shape {masks.shape}")
    n = jax.tree.leaves(train)[0].shape[0]
    if masks.shape[1] != n:
        raise ValueError(f"masks have {masks.shape[1]} columns but the training set has N={n} examples")
    if seeds.shape != (masks.shape[0],):
        raise ValueError(f"seeds must be [M]=[{masks.shape[0]}], got {seeds.shape}")
    if config.steps < 1:
        raise ValueError(f"config.steps must be >= 1, got {config.steps}")
    eval_fn = eval_fn or _default_eval(loss_fn)
    train = {k: jnp.asarray(v) for k, v in train.items()}
    eval_data = {k: jnp.asarray(v) for k, v in eval_data.items()}
    warm_state = nnx.split(warm_start, nnx.Param, ...)[1] if warm_start is not None else None

    base = hashlib.sha256()
    base.update(json.dumps({"config": dataclasses.asdict(config), "tag": tag,
                            "model": model_fingerprint(make_model(nnx.Rngs(0))),
                            "warm": model_fingerprint(warm_start) if warm_start is not None else None,
                            "eval_fn": getattr(eval_fn, "__qualname__", str(eval_fn)),
                            "loss_fn": getattr(loss_fn, "__qualname__", str(loss_fn))}, sort_keys=True).encode())
    _hash_arrays(base, {"train": train, "eval": eval_data})

    m_total, c = masks.shape[0], max(1, int(config.chunk))
    fn = None
    outs: list[dict] = []
    bar = tqdm(total=m_total, desc=f"retrain {tag}".strip(), unit="model", disable=not progress, leave=False)
    for start in range(0, m_total, c):
        mk, sd = masks[start:start + c], seeds[start:start + c]
        h = base.copy()
        _hash_arrays(h, {"m": np.packbits(mk, axis=1), "s": sd})
        path = os.path.join(cache_dir, f"retrain-{h.hexdigest()[:24]}") if cache_dir else None
        if path and os.path.exists(os.path.join(path, "meta.json")):
            arrays, _ = checkpoint.load(path)
            outs.append({k: np.asarray(v) for k, v in arrays.items()})
        else:
            if fn is None:
                fn = _build_trainer(make_model, loss_fn, eval_fn, config, n, warm_state)
            k = len(mk)
            pad = c - k if m_total > c else 0  # keep one compiled width
            mk_p = np.concatenate([mk, np.repeat(mk[:1], pad, 0)]) if pad else mk
            sd_p = np.concatenate([sd, np.repeat(sd[:1], pad, 0)]) if pad else sd
            res = fn(jnp.asarray(mk_p), jnp.asarray(sd_p), train, eval_data)
            res = {kk: np.asarray(v)[:k] for kk, v in res.items()}
            if path:
                checkpoint.save(path, res, {"models": k, "tag": tag}, overwrite=True)
            outs.append(res)
        bar.update(len(mk))
    bar.close()
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def subset_seeds(num_subsets: int, num_seeds: int, base: int = 0) -> np.ndarray:
    """Distinct seeds ``[M, S]`` for model (subset m, repeat s)."""
    return (base * 1_000_003 + np.arange(num_subsets * num_seeds)).reshape(num_subsets, num_seeds) % (2**31)


# ----------------------------------------------------------------------------- LDS

def lds_masks(n: int, num_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """``[M, N]`` boolean masks, each selecting exactly ``round(α N)`` examples at random."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    k = int(round(alpha * n))
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_subsets, n), bool)
    for m in range(num_subsets):
        masks[m, rng.choice(n, k, replace=False)] = True
    return masks


@dataclasses.dataclass
class LDSResult:
    mean: float
    std: float
    per_query: np.ndarray  # [Q] Spearman correlations

    def __str__(self):
        return f"{self.mean:.3f} ± {self.std:.3f}"


def lds(scores, masks, measured) -> LDSResult:
    """Linear datamodeling score.

    scores: ``[Q, N]`` (positive = proponent); masks: ``[M, N]`` subsets; measured: ``[M, Q]`` query
    losses of the models trained on each subset (or ``[M, S, Q]``: averaged over the S seeds first).
    Per query: Spearman over the M subsets between the predicted loss ``−Σ_{i∈S_m} score[q, i]`` and the
    measured loss. Returns mean ± std over queries (nan queries, e.g. constant losses, are dropped)."""
    scores = np.asarray(scores, np.float64)
    masks = np.asarray(masks, np.float64)
    measured = np.asarray(measured, np.float64)
    if measured.ndim == 3:
        measured = measured.mean(1)
    if scores.shape[1] != masks.shape[1] or measured.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"shapes disagree: scores {scores.shape} [Q, N], masks {masks.shape} [M, N], "
                         f"measured {measured.shape} [M, Q]")
    predicted = -(masks @ scores.T)  # [M, Q]
    per = spearman(predicted, measured, axis=0)
    ok = per[np.isfinite(per)]
    return LDSResult(float(ok.mean()) if ok.size else float("nan"), float(ok.std()) if ok.size else float("nan"), per)


# ----------------------------------------------------------------------------- leave-one-out

def leave_one_out(make_model, loss_fn, train, indices, seeds, config: RetrainConfig, eval_data, *,
                  warm_start=None, cache_dir=None, tag="loo", progress=True) -> np.ndarray:
    """``[Q, len(indices)]`` change of each query's loss when example ``indices[j]`` is removed and the
    model retrained (averaged over ``seeds``, each paired with a full-data model of the same seed)."""
    n = jax.tree.leaves(train)[0].shape[0]
    indices = np.asarray(indices)
    seeds = np.asarray(seeds)
    masks = np.ones((len(indices) + 1, n), bool)
    masks[np.arange(1, len(indices) + 1), indices] = False  # row 0: full data
    rows = np.repeat(masks, len(seeds), 0)
    sd = np.tile(seeds, len(indices) + 1)
    out = retrain(make_model, loss_fn, train, rows, sd, config, eval_data, warm_start=warm_start,
                  cache_dir=cache_dir, tag=tag, progress=progress)["loss"]
    out = out.reshape(len(indices) + 1, len(seeds), -1)
    return (out[1:] - out[:1]).mean(1).T


def loo_correlation(scores, deltas) -> dict:
    """Per-query Pearson / Spearman between ``scores [Q, n]`` and LOO loss changes ``deltas [Q, n]``."""
    p = pearson(scores, deltas, axis=1)
    s = spearman(scores, deltas, axis=1)
    return {"pearson_mean": float(np.nanmean(p)), "pearson_min": float(np.nanmin(p)),
            "spearman_mean": float(np.nanmean(s)), "pearson": p, "spearman": s}


# ----------------------------------------------------------------------------- brittleness

def brittleness_masks(scores, ks, seed: int = 0, random: bool = False) -> np.ndarray:
    """``[Q, K, N]`` masks removing, for each query, its top-``k`` proponents (largest scores), or ``k``
    random examples with ``random=True``."""
    scores = np.asarray(scores)
    q, n = scores.shape
    rng = np.random.default_rng(seed)
    out = np.ones((q, len(ks), n), bool)
    for i in range(q):
        order = rng.permutation(n) if random else np.argsort(-scores[i], kind="stable")
        for j, k in enumerate(ks):
            out[i, j, order[:k]] = False
    return out


def _own_removal_outcomes(make_model, loss_fn, train, test_points, methods, ks, seeds, config, eval_fn, key,
                          cache_dir, random_seed, progress, tag) -> dict:
    """``{name: [Q, K, S]}``: ``eval_fn(...)[key]`` of each test point under the removal of ITS OWN top-``k``
    proponents by each method (``"random"`` added: ``k`` random points), one retrained model per (point, k,
    seed). Retrained with cache tags ``f"{tag}-{name}"``."""
    ks = list(ks)
    seeds = np.asarray(seeds)
    q = jax.tree.leaves(test_points)[0].shape[0]
    n = masks_n(train)
    out = {}
    for name, sc in {**methods, "random": None}.items():
        m = brittleness_masks(np.zeros((q, n)) if sc is None else sc, ks, seed=random_seed, random=sc is None)
        rows = np.repeat(m.reshape(q * len(ks), -1), len(seeds), 0)
        res = retrain(make_model, loss_fn, train, rows, np.tile(seeds, q * len(ks)), config, test_points, eval_fn,
                      cache_dir=cache_dir, tag=f"{tag}-{name}", progress=progress)[key]  # [Q*K*S, Q]
        out[name] = res.reshape(q, len(ks), len(seeds), q)[np.arange(q), :, :, np.arange(q)]
    return out


def brittleness(make_model, loss_fn, train, test_points, methods: Mapping[str, np.ndarray], ks, seeds,
                config: RetrainConfig, eval_fn, *, cache_dir=None, random_seed: int = 0, progress=True) -> dict:
    """Fraction of (correctly classified) test points whose prediction flips when each method's top-``k``
    proponents are removed and the model retrained, for each ``k`` (``"random"``: k random points).

    test_points: eval data of the Q chosen points; methods: ``{name: scores [Q, N]}``;
    eval_fn(model, data) must return ``{"correct": bool [Q], ...}``. A point counts as flipped for a seed
    when the retrained model misclassifies it; the rate is averaged over points and seeds.
    Returns ``{name: [K] flip rate}``."""
    own = _own_removal_outcomes(make_model, loss_fn, train, test_points, methods, ks, seeds, config, eval_fn,
                                "correct", cache_dir, random_seed, progress, "brittle")
    return {name: 1.0 - c.mean((0, 2)) for name, c in own.items()}


def removal_effect(make_model, loss_fn, train, test_points, methods: Mapping[str, np.ndarray], ks, seeds,
                   config: RetrainConfig, eval_fn=None, *, key: str = "loss", cache_dir=None, random_seed: int = 0,
                   progress=True) -> dict:
    """The brittleness test for models without a single prediction to flip (language models): the mean
    increase of each test point's own ``eval_fn(...)[key]`` (its loss) when its top-``k`` proponents
    under each method (or ``k`` random points, ``"random"``) are removed and the model retrained, relative
    to the model trained on all data with the same seed. Averaged over points and seeds.

    methods: ``{name: scores [Q, N]}``. Returns ``{name: [K] mean increase}``."""
    seeds = np.asarray(seeds)
    eval_fn = eval_fn or _default_eval(loss_fn)
    base = retrain(make_model, loss_fn, train, np.ones((len(seeds), masks_n(train)), bool), seeds, config,
                   test_points, eval_fn, cache_dir=cache_dir, tag="removal-base", progress=progress)[key]  # [S, Q]
    own = _own_removal_outcomes(make_model, loss_fn, train, test_points, methods, ks, seeds, config, eval_fn,
                                key, cache_dir, random_seed, progress, "removal")
    return {name: (v - base.T[:, None, :]).mean((0, 2)) for name, v in own.items()}


def masks_n(train) -> int:
    return jax.tree.leaves(train)[0].shape[0]


# ----------------------------------------------------------------------------- cost measurement

class Cost:
    """Wall time and peak memory of a block: ``with Cost() as c: ...`` then ``c.seconds``, ``c.peak_mb``.

    ``peak_mb``: the highest resident set size (RSS) of the process sampled every 5 ms during the block,
    minus the RSS at its start (the extra host memory the block needed; on CPU that includes XLA's
    buffers). ``process_peak_mb``: the process's high-water mark (``ru_maxrss``) after the block."""

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self._rss0 = _rss_mb()
        self._peak = self._rss0

        def poll():
            while not self._stop.wait(0.005):
                self._peak = max(self._peak, _rss_mb())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import resource

        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self._peak, _rss_mb()) - self._rss0
        self.process_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return False


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- single model, reports

def fit(make_model, loss_fn, train, config: RetrainConfig, seed: int = 0, warm_start=None) -> nnx.Module:
    """Train one model on all of ``train`` with exactly the harness's training program (same batches as
    ``retrain`` with an all-ones mask and the same seed) and return it."""
    n = masks_n(train)
    model = make_model(nnx.Rngs(0)) if warm_start is None else warm_start
    warm_state = nnx.split(warm_start, nnx.Param, ...)[1] if warm_start is not None else None
    fn = _build_trainer(make_model, loss_fn, lambda m, d: nnx.split(m, nnx.Param, ...)[1], config, n, warm_state)
    train = {k: jnp.asarray(v) for k, v in train.items()}
    params = fn(jnp.ones((1, n), bool), jnp.asarray([seed], jnp.uint32), train, train)
    params = jax.tree.map(lambda a: a[0], params)
    out = make_model(nnx.Rngs(0))
    nnx.update(out, params)
    return out


def plot_brittleness(curves: Mapping[str, np.ndarray], ks, path: str, title: str = "",
                     ylabel: str = "fraction of test predictions flipped") -> str:
    """Flip rate (or ``ylabel``) vs k, one line per method (``random`` dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, ys in curves.items():
        ax.plot(list(ks), np.asarray(ys), "--" if name == "random" else "-o", label=name, ms=4,
                color="gray" if name == "random" else None)
    ax.set_xlabel("k = training points removed")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "brittleness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
