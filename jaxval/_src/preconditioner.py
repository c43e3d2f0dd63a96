"""Preconditioners in LoGra's projected space: identity, raw, K-FAC, EK-FAC (block-diagonal over layers).

Per layer, with ``g_b`` the example's projected block ``G_b = Σ_t ã_t s̃_tᵀ`` (``k_in × k_out``), ``ã = P_in x``
and ``s̃ = P_out dy`` per token:

- ``raw``:   ``H = C + λI`` with ``C = (1/N) Σ_b vec(G_b) vec(G_b)ᵀ`` (dense, ``(k_in·k_out)²``).
- ``kfac``:  ``H = A ⊗ S + λI`` with ``A = (1/T) Σ_tokens ã ãᵀ`` (T = number of tokens counted) and
  ``S = (1/N) Σ_tokens s̃ s̃ᵀ``, so that ``A ⊗ S`` approximates the per-example Fisher ``C`` (for one
  token per example, ``A ⊗ S`` is the K-FAC factorisation of ``C`` exactly). A token counts when its
  output cotangent is not exactly zero: padding and positions whose loss is masked out cannot move the
  loss, so they are excluded from ``A`` as they are from ``S``.
- ``ekfac``: the K-FAC eigenbasis ``Q_A, Q_S`` with eigenvalues re-fitted from the examples,
  ``Λ_ij = (1/N) Σ_b (Q_Aᵀ G_b Q_S)_ij²`` (a second pass over the data), ``H = Q (Λ + λ) Qᵀ``.

Damping ``λ`` is per layer: an absolute value, or ``relative_damping = α`` giving ``λ = α ·`` the mean
eigenvalue of that layer's ``H`` without damping (``trace/dim`` for raw). Applying never changes a
preconditioner; ``with_damping`` returns a new one.

The optax-style core: ``init(logra, kind)``, ``update(state, stats)``, ``finalize(state, logra, ...)``;
the statistics of a batch come out of the same compiled step as its gradients (``statistics_step``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxval._src import precision
from jaxval._src.batching import example_keys, iterate_batches, num_examples, shard_batch
from jaxval._src.logra import LoGra, blocks_from_pairs, check_independent_examples, projected_pairs

KINDS = ("identity", "raw", "kfac", "ekfac")
_HI = precision.MATMUL


# ----------------------------------------------------------------------------- statistics

def init(logra: LoGra, kind: str, basis: Mapping | None = None) -> dict:
    """Zero statistics for ``kind``. ``basis`` (``{name: (Q_A, Q_S)}``) selects EK-FAC's second pass."""
    _check_kind(kind)
    st: dict[str, Any] = {"examples": jnp.zeros((), jnp.float32)}
    for l in logra.layers:
        if kind == "raw":
            st[l.name] = {"C": jnp.zeros((l.dim, l.dim), jnp.float32)}
        elif kind in ("kfac", "ekfac") and basis is None:
            st[l.name] = {"A": jnp.zeros((l.k_in, l.k_in), jnp.float32),
                          "S": jnp.zeros((l.k_out, l.k_out), jnp.float32),
                          "tokens": jnp.zeros((), jnp.float32)}
        elif kind == "ekfac":
            st[l.name] = {"L": jnp.zeros((l.k_in, l.k_out), jnp.float32)}
    return st


def update(state: dict, stats: dict) -> dict:
    """Add a batch's statistics (pure)."""
    return jax.tree_util.tree_map(jnp.add, state, stats)


def batch_statistics(logra: LoGra, kind: str, g: jax.Array, pairs, basis=None) -> dict:
    """Statistics of one batch (traceable): sums, not means."""
    out: dict[str, Any] = {"examples": jnp.float32(g.shape[0])}
    offs = logra.offsets()
    for l in logra.layers:
        if kind == "raw":
            gl = g[:, slice(*offs[l.name])]
            out[l.name] = {"C": jnp.matmul(gl.T, gl, precision=_HI)}
        elif kind in ("kfac", "ekfac") and basis is None:
            a_sum = jnp.zeros((l.k_in, l.k_in), jnp.float32)
            s_sum = jnp.zeros((l.k_out, l.k_out), jnp.float32)
            tokens = jnp.zeros((), jnp.float32)
            for a, s, cot_is_s in pairs[l.name]:
                cot = s if cot_is_s else a
                m = jnp.any(cot != 0, axis=-1).astype(jnp.float32)  # [B, T] counted tokens
                a_sum += jnp.einsum("btk,btl,bt->kl", a, a, m, precision=_HI)
                s_sum += jnp.einsum("btk,btl,bt->kl", s, s, m, precision=_HI)
                tokens += m.sum()
            out[l.name] = {"A": a_sum, "S": s_sum, "tokens": tokens}
        elif kind == "ekfac":
            qa, qs = basis[l.name]
            calls = pairs[l.name] if pairs is not None else None
            t = sum(a.shape[1] for a, _, _ in calls) if calls else None
            if t is not None and t * (l.k_in ** 2 + l.k_out ** 2) < l.k_in * l.k_out * (l.k_in + l.k_out):
                # few tokens: rotate the factors, then contract: Q_Aᵀ (Σ_t a_t s_tᵀ) Q_S = Σ_t (Q_Aᵀa_t)(Q_Sᵀs_t)ᵀ
                # costs T·(k_in² + k_out² + k_in·k_out) per example instead of k_in·k_out·(T + k_in + k_out)
                rot = sum(jnp.einsum("bti,btj->bij", jnp.einsum("btk,ki->bti", a, qa, precision=_HI),
                                     jnp.einsum("btl,lj->btj", c, qs, precision=_HI), precision=_HI)
                          for a, c, _ in calls)
            else:
                gb = g[:, slice(*offs[l.name])].reshape(-1, l.k_in, l.k_out)
                rot = jnp.einsum("ki,bkl,lj->bij", qa, gb, qs, precision=_HI)
            out[l.name] = {"L": jnp.sum(rot * rot, axis=0)}
    return out


def statistics_step(logra: LoGra, model: nnx.Module, kind: str, basis=None,
                    sample_fn: Callable | None = None, return_grads: bool = True) -> Callable:
    """A jitted ``step(state, batch, projections, keys) -> (g [B, D], losses [B], stats)``.

    With ``sample_fn`` the statistics (and ``g``) are those of ``sample_fn(model, batch, keys)``, a batch
    whose labels were drawn from the model (``keys``: one PRNG key per example). ``return_grads=False``:
    ``g`` is None, and the per-example gradients are formed only where a statistic needs them."""
    graphdef, _ = nnx.split(model)
    layers, loss_fn = logra.layers, logra.loss_fn
    dtype = logra.compute_dtype

    @jax.jit
    def step(state, batch, projections, keys, basis):
        if sample_fn is not None:
            batch = sample_fn(nnx.merge(graphdef, state), batch, keys)
        losses, pairs = projected_pairs(graphdef, state, loss_fn, layers, projections, batch, dtype)
        g = blocks_from_pairs(layers, pairs)  # dead code for XLA where nothing below reads it
        stats = batch_statistics(logra, kind, g, pairs, basis)
        return (g if return_grads else None), losses, stats

    def run(state, batch, keys=None):
        return step(state, batch, logra.projections, keys, basis)

    run.jitted = step  # (state, batch, projections, keys, basis): for callers that place inputs themselves
    return run


# ----------------------------------------------------------------------------- the preconditioner

@dataclasses.dataclass(frozen=True)
class Preconditioner:
    """``H⁻¹`` per layer in LoGra's projected space. Immutable: ``apply`` never changes it.

    ``factors[name]``: raw ``{"V" [d, d], "e" [d]}``; kfac/ekfac ``{"QA", "QS", "L" [k_in, k_out]}``
    (``L`` = eigenvalues of ``H`` without damping: ``eA ⊗ eS`` for kfac, re-fitted for ekfac), stored as
    jax arrays. ``damping[name]``: the absolute ``λ`` of that layer, stored as a ``numpy.float64`` scalar
    (0-d, immutable, hashable, equal to the float it was given).

    A registered pytree: the leaves are the factor arrays and the damping scalars; ``kind``, ``names``,
    ``shapes`` and ``config`` are static. So ``jax.jit`` caches compiled code by structure: another
    preconditioner of the same kind and shapes (e.g. ``with_damping``) reuses it, and ``apply`` can be
    called inside jitted code (``jax.jit(lambda pc, g: pc.apply(g))``).
    """

    kind: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    factors: dict
    damping: dict
    config: dict

    def __post_init__(self):
        names = tuple(str(n) for n in self.names)
        shapes = tuple((int(a), int(b)) for a, b in self.shapes)
        factors = {n: {k: v if isinstance(v, jax.core.Tracer) else jnp.asarray(v) for k, v in f.items()}
                   for n, f in dict(self.factors).items()}
        damping = {n: v if isinstance(v, jax.core.Tracer) else np.float64(v) for n, v in dict(self.damping).items()}
        config = dict(self.config or {})
        for field, value in (("names", names), ("shapes", shapes), ("factors", factors), ("damping", damping),
                             ("config", config)):
            object.__setattr__(self, field, value)
        object.__setattr__(self, "_static", _StaticConfig(config))

    @property
    def dim(self) -> int:
        return int(sum(a * b for a, b in self.shapes))

    def check_config(self, config: Mapping | None):
        """Raise if ``config`` (a ``LoGra.config()`` or a store's config) is not the one fitted."""
        if config is None or not self.config:
            return
        mine = {k: self.config.get(k) for k in ("layers", "projection_sha256")}
        theirs = {k: config.get(k) for k in ("layers", "projection_sha256")}
        if mine != theirs:
            raise ValueError("this preconditioner was fitted for another LoGra configuration (layers, ranks "
                             "or projections differ); fit one for these gradients")

    def apply(self, g: jax.Array, config: Mapping | None = None) -> jax.Array:
        """``H⁻¹ g`` for ``g [B, D]`` (or ``[D]``)."""
        self.check_config(config)
        g = jnp.asarray(g, jnp.float32)
        squeeze = g.ndim == 1
        g = g[None] if squeeze else g
        if g.shape[-1] != self.dim:
            raise ValueError(f"gradients have dim {g.shape[-1]} but this preconditioner was fitted for a LoGra "
                             f"configuration of dim {self.dim} (layers {list(self.names)}); use the "
                             "preconditioner fitted with the same LoGra")
        if self.kind == "identity":
            return g[0] if squeeze else g
        h = _apply(self.kind, self.shapes, self.names, self.factors, self.damping, g)
        return h[0] if squeeze else h

    def with_damping(self, damping: float | None = None, relative_damping: float | None = None) -> "Preconditioner":
        return dataclasses.replace(self, damping=_resolve_damping(self.kind, self.names, self.factors, damping,
                                                                  relative_damping))

    def eigenvalues(self, name: str) -> np.ndarray:
        f = self.factors[name]
        return np.asarray(f["e"] if self.kind == "raw" else f["L"]).ravel()

    def save(self, path: str, overwrite: bool = False) -> str:
        from jaxval._src import checkpoint

        meta = {"kind": self.kind, "names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "damping": {k: float(v) for k, v in self.damping.items()}, "config": self.config}
        arrays = {f"{i}/{k}": np.asarray(v) for i, n in enumerate(self.names)
                  for k, v in self.factors.get(n, {}).items()}
        return checkpoint.save(path, arrays or {"empty": np.zeros(1)}, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str) -> "Preconditioner":
        from jaxval._src import checkpoint

        arrays, meta = checkpoint.load(path)
        names = tuple(meta["names"])
        factors: dict = {n: {} for n in names}
        for key, v in arrays.items():
            if key == "empty":
                continue
            i, k = key.split("/")
            factors[names[int(i)]][k] = jnp.asarray(v)
        if meta["kind"] == "identity":
            factors = {}
        return cls(meta["kind"], names, tuple(tuple(s) for s in meta["shapes"]), factors,
                   {k: float(v) for k, v in meta["damping"].items()}, meta.get("config", {}))


class _StaticConfig:
    """A preconditioner's ``config`` dict as static pytree data: hashable (canonical JSON), compared by value."""

    __slots__ = ("config", "_hash")

    def __init__(self, config: dict):
        import json

        self.config = config
        self._hash = hash(json.dumps(config, sort_keys=True, default=str))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _StaticConfig) and self._hash == other._hash and self.config == other.config


def _flatten_preconditioner(pc: Preconditioner):
    return (pc.factors, pc.damping), (pc.kind, pc.names, pc.shapes, pc._static)


def _unflatten_preconditioner(static, children) -> Preconditioner:
    # no __post_init__: the leaves may be tracers or placeholders (jax unflattens with both)
    pc = object.__new__(Preconditioner)
    kind, names, shapes, cfg = static
    factors, damping = children
    for field, value in (("kind", kind), ("names", names), ("shapes", shapes), ("factors", factors),
                         ("damping", damping), ("config", cfg.config), ("_static", cfg)):
        object.__setattr__(pc, field, value)
    return pc


jax.tree_util.register_pytree_node(Preconditioner, _flatten_preconditioner, _unflatten_preconditioner)


@jax.jit
def _apply_raw(v, e, lam, gl):
    return jnp.matmul(jnp.matmul(gl, v, precision=_HI) / (e + lam), v.T, precision=_HI)


@jax.jit
def _apply_kron(qa, qs, lmat, lam, gb):
    r = jnp.einsum("ki,bkl,lj->bij", qa, gb, qs, precision=_HI) / (lmat + lam)
    return jnp.einsum("ki,bij,lj->bkl", qa, r, qs, precision=_HI)


def _apply(kind, shapes, names, factors, damping, g):
    out, o = [], 0
    for name, (ki, ko) in zip(names, shapes):
        gl = g[:, o:o + ki * ko]
        o += ki * ko
        f, lam = factors[name], jnp.asarray(damping[name], jnp.float32)
        if kind == "raw":
            out.append(_apply_raw(f["V"], f["e"], lam, gl))
        else:
            out.append(_apply_kron(f["QA"], f["QS"], f["L"], lam, gl.reshape(-1, ki, ko)).reshape(-1, ki * ko))
    return jnp.concatenate(out, axis=1)


def _resolve_damping(kind, names, factors, damping, relative_damping) -> dict:
    if kind == "identity":
        return {n: 0.0 for n in names}
    if (damping is None) == (relative_damping is None):
        raise ValueError("give exactly one of damping (absolute λ) or relative_damping (α · mean eigenvalue)")
    out = {}
    for n in names:
        if relative_damping is not None:
            if not relative_damping > 0:
                raise ValueError(f"relative_damping must be > 0 for a '{kind}' solve, got {relative_damping}")
            ev = factors[n]["e"] if kind == "raw" else factors[n]["L"]
            lam = float(relative_damping) * float(jnp.mean(ev))
        else:
            lam = float(damping)
        if not lam > 0:
            raise ValueError(f"damping must be > 0 for a '{kind}' solve (layer '{n}' got λ = {lam}); the "
                             "projected Fisher is usually singular")
        out[n] = lam
    return out


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"unknown preconditioner kind {kind!r}; choose one of {KINDS}")


def _check_finite(state, names):
    for n in names:
        for k, v in state[n].items():
            if not bool(jnp.all(jnp.isfinite(v))):
                raise ValueError(f"statistics of layer '{n}' ({k}) contain NaN or inf: check the loss and the "
                                 "data of this layer (e.g. a diverged model or inf inputs)")


def kfac_basis(state: dict, names) -> dict:
    """Eigendecompositions of the K-FAC factors: ``{name: (QA, eA, QS, eS)}`` (float32)."""
    out = {}
    for n in names:
        t = jnp.maximum(state[n]["tokens"], 1.0)
        ex = jnp.maximum(state["examples"], 1.0)
        ea, qa = jnp.linalg.eigh(state[n]["A"] / t)
        es, qs = jnp.linalg.eigh(state[n]["S"] / ex)
        out[n] = (qa, jnp.maximum(ea, 0.0), qs, jnp.maximum(es, 0.0))
    return out


def finalize(state: dict, logra: LoGra, kind: str, damping: float | None = 1e-3,
             relative_damping: float | None = None, basis: Mapping | None = None) -> Preconditioner:
    """Turn accumulated statistics into a ``Preconditioner``. For ``ekfac`` pass the K-FAC ``basis``
    (``kfac_basis`` of the first pass) that the second pass's state ``L`` was accumulated in."""
    _check_kind(kind)
    names = tuple(l.name for l in logra.layers)
    shapes = tuple((l.k_in, l.k_out) for l in logra.layers)
    if relative_damping is not None:
        damping = None
    if kind != "identity":
        _check_finite(state, names)
    factors: dict = {}
    n_ex = jnp.maximum(state["examples"], 1.0)
    for n in names:
        if kind == "raw":
            e, v = jnp.linalg.eigh(state[n]["C"] / n_ex)
            factors[n] = {"V": v, "e": jnp.maximum(e, 0.0)}
        elif kind == "kfac":
            qa, ea, qs, es = kfac_basis(state, [n])[n]
            factors[n] = {"QA": qa, "QS": qs, "L": jnp.outer(ea, es)}
        elif kind == "ekfac":
            if basis is None:
                raise ValueError("ekfac needs the K-FAC basis of the first pass (see fit_preconditioner)")
            qa, _, qs, _ = basis[n]
            factors[n] = {"QA": qa, "QS": qs, "L": state[n]["L"] / n_ex}
    return Preconditioner(kind, names, shapes, factors,
                          _resolve_damping(kind, names, factors, damping, relative_damping), logra.config())


# ----------------------------------------------------------------------------- driver

def accumulate(logra: LoGra, model: nnx.Module, data, kind: str, batch_size: int = 64, basis=None,
               fisher: str = "empirical", sample_fn: Callable | None = None, num_samples: int = 1, seed: int = 0,
               mesh=None, progress: bool = True, desc: str | None = None) -> dict:
    """One pass over ``data`` accumulating ``kind``'s statistics (sums). See ``fit_preconditioner``."""
    if fisher not in ("empirical", "sampled"):
        raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}")
    if fisher == "sampled" and sample_fn is None:
        raise ValueError("fisher='sampled' needs sample_fn(model, batch, keys) -> batch with labels drawn "
                         "from the model (keys: one PRNG key per example)")
    check_independent_examples(model)
    state_model = nnx.state(model)
    step = statistics_step(logra, model, kind, basis, sample_fn if fisher == "sampled" else None,
                           return_grads=False)
    state = init(logra, kind, basis)
    n = num_examples(data)
    samples = num_samples if fisher == "sampled" else 1
    with tqdm(total=n, desc=desc or f"{kind} statistics", unit="ex", disable=not progress, leave=False) as bar:
        for start, batch in iterate_batches(data, batch_size):
            b = jax.tree_util.tree_leaves(batch)[0].shape[0]
            batch = shard_batch(batch, mesh)
            for s in range(samples):
                keys = example_keys(seed, s, start, b) if fisher == "sampled" else None
                _, _, stats = step(state_model, batch, keys)
                state = update(state, stats)
            bar.update(b)
    return state


def fit_preconditioner(logra: LoGra, model: nnx.Module, data, kind: str = "ekfac", damping: float | None = 1e-3,
                       relative_damping: float | None = None, batch_size: int = 64, fisher: str = "empirical",
                       sample_fn: Callable | None = None, num_samples: int = 1, seed: int = 0, mesh=None,
                       progress: bool = True) -> Preconditioner:
    """Fit ``kind`` (identity | raw | kfac | ekfac) over ``data`` (a pytree with leading axis N, or an
    iterable of batches): one pass (two for ekfac: factors, then eigenvalues in their basis).

    ``fisher="sampled"``: statistics from ``sample_fn(model, batch, keys)`` (labels drawn from the model,
    ``num_samples`` draws per example, keys derived from ``(seed, draw, example index)`` so the result does
    not depend on the batch size). ``mesh``: shard each batch over the mesh's first axis; statistics are
    summed across devices by the compiled step.
    """
    _check_kind(kind)
    if kind == "identity":
        return finalize(init(logra, kind), logra, kind)
    common = dict(batch_size=batch_size, fisher=fisher, sample_fn=sample_fn, num_samples=num_samples, seed=seed,
                  mesh=mesh, progress=progress)
    if kind == "ekfac":
        first = accumulate(logra, model, data, "kfac", desc="ekfac factors", **common)
        _check_finite(first, [l.name for l in logra.layers])
        full = kfac_basis(first, [l.name for l in logra.layers])
        basis = {n: (qa, qs) for n, (qa, _, qs, _) in full.items()}
        second = accumulate(logra, model, data, "ekfac", basis=basis, desc="ekfac eigenvalues", **common)
        return finalize(second, logra, kind, damping, relative_damping, basis=full)
    state = accumulate(logra, model, data, kind, **common)
    return finalize(state, logra, kind, damping, relative_damping)


def pca_projections(model: nnx.Module, loss_fn, data, rank=64, layers=None, batch_size: int = 64,
                    progress: bool = True) -> dict:
    """LoGra projections from the top eigenvectors of each layer's un-projected K-FAC factors
    ``E[x xᵀ]`` and ``E[dy dyᵀ]``, from one pass that never forms per-example gradients.
    Use as ``LoGra(model, loss_fn, init="pca", projections=pca_projections(...))``."""
    full = LoGra(model, loss_fn, rank=None, init="identity", layers=layers)
    state = accumulate(full, model, data, "kfac", batch_size=batch_size, progress=progress, desc="pca factors")
    from jaxval._src.projection import resolve_rank

    out = {}
    for l in full.layers:
        k_in, k_out = resolve_rank(rank, l)
        qa, _, qs, _ = kfac_basis(state, [l.name])[l.name]
        # eigh sorts ascending: the top-k eigenvectors are the last k columns
        out[l.name] = (qa[:, ::-1][:, :k_in].T, qs[:, ::-1][:, :k_out].T)
    return out
