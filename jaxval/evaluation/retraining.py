"""Retraining harness for evaluating influence scores: retrain, leave-one-out, brittleness, removal effect.

The metrics computed from the retrained models' outputs (LDS, LOO correlation, brittleness masks) are in
:mod:`jaxval.evaluation.metrics`; the figures in :mod:`jaxval.evaluation.plots`.

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
from jaxval.evaluation.metrics import brittleness_masks

__all__ = ["RetrainConfig", "retrain", "subset_seeds", "leave_one_out", "brittleness", "removal_effect", "fit", "Cost",
           "masks_n"]


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


def _trainer(trainers: dict, make_model, loss_fn, eval_fn, cfg: RetrainConfig, n: int, warm_start, warm_state):
    """The compiled trainer of these settings, built once per ``trainers`` dict (the calls of one brittleness or
    removal test share it: one compilation per shape instead of one per method)."""
    key = (make_model, loss_fn, eval_fn, cfg, n, id(warm_start))
    if key not in trainers:
        trainers[key] = _build_trainer(make_model, loss_fn, eval_fn, cfg, n, warm_state)
    return trainers[key]


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
    return _retrain(make_model, loss_fn, train, masks, seeds, config, eval_data, eval_fn, warm_start=warm_start,
                    cache_dir=cache_dir, tag=tag, progress=progress, trainers={})


def _retrain(make_model, loss_fn, train, masks, seeds, config, eval_data, eval_fn=None, *, warm_start=None,
             cache_dir=None, tag="", progress=True, trainers: dict) -> dict[str, np.ndarray]:
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
                fn = _trainer(trainers, make_model, loss_fn, eval_fn, config, n, warm_start, warm_state)
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


# ----------------------------------------------------------------------------- brittleness

def _own_removal_outcomes(make_model, loss_fn, train, test_points, methods, ks, seeds, config, eval_fn, key,
                          cache_dir, random_seed, progress, tag, warm_start=None, trainers=None) -> dict:
    """``{name: [Q, K, S]}``: ``eval_fn(...)[key]`` of each test point under the removal of ITS OWN top-``k``
    proponents by each method (``"random"`` added: ``k`` random points), one retrained model per (point, k,
    seed). Retrained with cache tags ``f"{tag}-{name}"``."""
    ks = list(ks)
    seeds = np.asarray(seeds)
    q = jax.tree.leaves(test_points)[0].shape[0]
    n = masks_n(train)
    out, trainers = {}, {} if trainers is None else trainers
    for name, sc in {**methods, "random": None}.items():
        m = brittleness_masks(np.zeros((q, n)) if sc is None else sc, ks, seed=random_seed, random=sc is None)
        rows = np.repeat(m.reshape(q * len(ks), -1), len(seeds), 0)
        res = _retrain(make_model, loss_fn, train, rows, np.tile(seeds, q * len(ks)), config, test_points, eval_fn,
                       warm_start=warm_start, cache_dir=cache_dir, tag=f"{tag}-{name}", progress=progress,
                       trainers=trainers)[key]
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
                   progress=True, warm_start=None) -> dict:
    """The brittleness test for models without a single prediction to flip (language models): the mean
    increase of each test point's own ``eval_fn(...)[key]`` (its loss) when its top-``k`` proponents
    under each method (or ``k`` random points, ``"random"``) are removed and the model retrained, relative
    to the model trained on all data with the same seed. Averaged over points and seeds.

    methods: ``{name: scores [Q, N]}``; warm_start: every model fine-tuned from this model (as in
    :func:`retrain`). Returns ``{name: [K] mean increase}``."""
    seeds = np.asarray(seeds)
    eval_fn = eval_fn or _default_eval(loss_fn)
    trainers: dict = {}
    base = _retrain(make_model, loss_fn, train, np.ones((len(seeds), masks_n(train)), bool), seeds, config,
                    test_points, eval_fn, warm_start=warm_start, cache_dir=cache_dir, tag="removal-base",
                    progress=progress, trainers=trainers)[key]  # [S, Q]
    own = _own_removal_outcomes(make_model, loss_fn, train, test_points, methods, ks, seeds, config, eval_fn,
                                key, cache_dir, random_seed, progress, "removal", warm_start, trainers)
    return {name: (v - base.T[:, None, :]).mean((0, 2)) for name, v in own.items()}


def masks_n(train) -> int:
    """N, the number of training examples of an array pytree."""
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
