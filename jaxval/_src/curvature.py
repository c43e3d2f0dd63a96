"""Curvature statistics as typed pytrees, and the one fit driver (every scale, from the model or a store).

Per layer, with ``G_b = Σ_t ã_t s̃_tᵀ`` (``k_in × k_out``) an example's projected block, ``ã = P_in x`` and
``s̃ = P_out dy`` per token:

- ``raw``:   ``H = C + λI`` with ``C = (1/N) Σ_b vec(G_b) vec(G_b)ᵀ`` (dense, ``(k_in·k_out)²``).
- ``kfac``:  ``H = A ⊗ S + λI`` with ``A = (1/T) Σ_tokens ã ãᵀ`` (T = tokens counted) and
  ``S = (1/N) Σ_tokens s̃ s̃ᵀ``; a token counts when its output cotangent is not exactly zero (padding and
  masked positions cannot move the loss, so they are excluded from ``A`` as they are from ``S``).
- ``ekfac``: the K-FAC eigenbasis ``Q_A, Q_S`` with eigenvalues re-fitted from the examples,
  ``Λ_ij = (1/N) Σ_b (Q_Aᵀ G_b Q_S)_ij²``, ``H = Q (Λ + λ) Qᵀ``.

optax-style: each kind is a :class:`Curvature` of pure functions ``init / statistics / factors`` over its
own state type (:class:`RawState`, :class:`KFACState`, :class:`EigenState`, :class:`IdentityState`:
NamedTuples of arrays, one ``{layer name: array}`` per statistic); ``update(state, stats, weight)`` adds a
batch; ``finalize(state, logra)`` gives a :class:`~jaxval.Preconditioner`. Dispatch goes through the
``CURVATURES`` table (by kind name) and ``kind_of`` (by state type).

The batch statistics come out of LoGra's one compiled step (``accumulate_batch`` is its ``reduce``).
:func:`fit_preconditioner` runs one or two passes over the model on one device, a local mesh or a mesh
spanning several processes; :func:`fit_from_store` fits from a gradient store (and the K-FAC statistics
logged with it) with no pass through the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxval._src import precision
from jaxval._src.batching import example_keys, is_array_tree, iterate_batches, num_examples, shard_batch
from jaxval._src.parallel import spans_processes
from jaxval._src.preconditioner import Preconditioner

KINDS = ("identity", "raw", "kfac", "ekfac")
FISHERS = ("empirical", "sampled")
_HI = precision.MATMUL


# ----------------------------------------------------------------------------- states

class IdentityState(NamedTuple):
    """No statistics (``H = I``)."""
    examples: jax.Array                      # [] examples counted

    SUMMED = ("examples",)


class RawState(NamedTuple):
    """Raw projected Fisher sums."""
    examples: jax.Array                      # [] examples counted
    C: dict                                  # {layer: [d, d]} Σ_b vec(G_b) vec(G_b)ᵀ

    SUMMED = ("examples", "C")


class KFACState(NamedTuple):
    """K-FAC factor sums."""
    examples: jax.Array                      # [] examples counted
    tokens: dict                             # {layer: []} tokens counted
    A: dict                                  # {layer: [k_in, k_in]} Σ_tokens ã ãᵀ
    S: dict                                  # {layer: [k_out, k_out]} Σ_tokens s̃ s̃ᵀ

    SUMMED = ("examples", "tokens", "A", "S")


class EigenState(NamedTuple):
    """EK-FAC eigenvalue sums in a fixed K-FAC basis (the basis is carried, not summed)."""
    examples: jax.Array                      # [] examples counted
    L: dict                                  # {layer: [k_in, k_out]} Σ_b (Q_Aᵀ G_b Q_S)²
    QA: dict                                 # {layer: [k_in, k_in]} eigenvectors of A (columns)
    QS: dict                                 # {layer: [k_out, k_out]} eigenvectors of S (columns)

    SUMMED = ("examples", "L")


class LayerShape(NamedTuple):
    """What the statistics need of a layer (``jaxval.Layer`` records qualify too)."""
    name: str
    k_in: int
    k_out: int

    @property
    def dim(self) -> int:
        return self.k_in * self.k_out


def _layers(src) -> tuple:
    """The layer records of a LoGra (``.layers``) or a sequence of them."""
    return tuple(src.layers) if hasattr(src, "layers") else tuple(src)


def _offsets(layers) -> dict[str, slice]:
    out, o = {}, 0
    for l in layers:
        out[l.name] = slice(o, o + l.k_in * l.k_out)
        o += l.k_in * l.k_out
    return out


def _zeros(*shape) -> jax.Array:
    return jnp.zeros(shape, jnp.float32)


# ----------------------------------------------------------------------------- per kind: init / statistics / factors

class Curvature(NamedTuple):
    """A kind's pure functions (as optax's ``GradientTransformation``).

    ``init(layers, basis) -> state``; ``statistics(layers, state, g [B, D], pairs | None) -> state`` of one
    batch's sums (traceable; ``pairs``: LoGra's per-layer projected inputs and cotangents, None when only
    stored gradients are at hand); ``factors(layers, state) -> {layer: {...}}`` for a ``Preconditioner``.
    """
    state: type
    init: Callable
    statistics: Callable
    factors: Callable
    needs_pairs: bool


def _identity_init(layers, basis=None):
    return IdentityState(_zeros())


def _identity_statistics(layers, state, g, pairs):
    return IdentityState(jnp.float32(g.shape[0]))


def _raw_init(layers, basis=None):
    return RawState(_zeros(), {l.name: _zeros(l.dim, l.dim) for l in layers})


def _raw_statistics(layers, state, g, pairs):
    offs = _offsets(layers)
    return RawState(jnp.float32(g.shape[0]),
                    {l.name: jnp.matmul(g[:, offs[l.name]].T, g[:, offs[l.name]], precision=_HI) for l in layers})


def _raw_factors(layers, state):
    n = jnp.maximum(state.examples, 1.0)
    out = {}
    for l in layers:
        e, v = jnp.linalg.eigh(state.C[l.name] / n)
        out[l.name] = {"V": v, "e": jnp.maximum(e, 0.0)}
    return out


def _kfac_init(layers, basis=None):
    return KFACState(_zeros(), {l.name: _zeros() for l in layers}, {l.name: _zeros(l.k_in, l.k_in) for l in layers},
                     {l.name: _zeros(l.k_out, l.k_out) for l in layers})


def _kfac_statistics(layers, state, g, pairs):
    if pairs is None:
        raise ValueError("K-FAC statistics need the layers' projected inputs and cotangents, which stored "
                         "gradients do not have: log with stats='kfac' (or fit from the model)")
    tokens, a_sum, s_sum = {}, {}, {}
    for l in layers:
        a_acc, s_acc, t_acc = _zeros(l.k_in, l.k_in), _zeros(l.k_out, l.k_out), _zeros()
        for a, s, cot_is_s in pairs[l.name]:
            cot = s if cot_is_s else a
            m = jnp.any(cot != 0, axis=-1).astype(jnp.float32)  # [B, T] counted tokens
            a_acc += jnp.einsum("btk,btl,bt->kl", a, a, m, precision=_HI)
            s_acc += jnp.einsum("btk,btl,bt->kl", s, s, m, precision=_HI)
            t_acc += m.sum()
        tokens[l.name], a_sum[l.name], s_sum[l.name] = t_acc, a_acc, s_acc
    return KFACState(jnp.float32(g.shape[0]), tokens, a_sum, s_sum)


def kfac_basis(state: KFACState) -> dict:
    """Eigendecompositions of the K-FAC factors: ``{layer: (Q_A, e_A, Q_S, e_S)}`` (float32, ascending)."""
    ex = jnp.maximum(state.examples, 1.0)
    out = {}
    for n in state.A:
        ea, qa = jnp.linalg.eigh(state.A[n] / jnp.maximum(state.tokens[n], 1.0))
        es, qs = jnp.linalg.eigh(state.S[n] / ex)
        out[n] = (qa, jnp.maximum(ea, 0.0), qs, jnp.maximum(es, 0.0))
    return out


def _kfac_factors(layers, state):
    return {n: {"QA": qa, "QS": qs, "L": jnp.outer(ea, es)} for n, (qa, ea, qs, es) in kfac_basis(state).items()}


def _eigen_init(layers, basis=None):
    if basis is None:
        raise ValueError("the EK-FAC eigenvalue pass needs the K-FAC basis {layer: (Q_A, Q_S)} (kfac_basis of "
                         "a K-FAC state); fit_preconditioner(kind='ekfac') runs both passes")
    qa = {l.name: jnp.asarray(basis[l.name][0], jnp.float32) for l in layers}
    qs = {l.name: jnp.asarray(basis[l.name][2 if len(basis[l.name]) == 4 else 1], jnp.float32) for l in layers}
    return EigenState(_zeros(), {l.name: _zeros(l.k_in, l.k_out) for l in layers}, qa, qs)


def _eigen_statistics(layers, state, g, pairs):
    offs, lam = _offsets(layers), {}
    for l in layers:
        qa, qs = state.QA[l.name], state.QS[l.name]
        calls = pairs[l.name] if pairs is not None else None
        t = sum(a.shape[1] for a, _, _ in calls) if calls else None
        if t is not None and t * (l.k_in ** 2 + l.k_out ** 2) < l.k_in * l.k_out * (l.k_in + l.k_out):
            # few tokens: rotate the factors, then contract: Q_Aᵀ (Σ_t a_t s_tᵀ) Q_S = Σ_t (Q_Aᵀa_t)(Q_Sᵀs_t)ᵀ
            # costs T·(k_in² + k_out² + k_in·k_out) per example instead of k_in·k_out·(T + k_in + k_out)
            rot = sum(jnp.einsum("bti,btj->bij", jnp.einsum("btk,ki->bti", a, qa, precision=_HI),
                                 jnp.einsum("btl,lj->btj", c, qs, precision=_HI), precision=_HI)
                      for a, c, _ in calls)
        else:
            gb = g[:, offs[l.name]].astype(jnp.float32).reshape(-1, l.k_in, l.k_out)
            rot = jnp.einsum("ki,bkl,lj->bij", qa, gb, qs, precision=_HI)
        lam[l.name] = jnp.sum(rot * rot, axis=0)
    return state._replace(examples=jnp.float32(g.shape[0]), L=lam)


def _eigen_factors(layers, state):
    n = jnp.maximum(state.examples, 1.0)
    return {l.name: {"QA": state.QA[l.name], "QS": state.QS[l.name], "L": state.L[l.name] / n} for l in layers}


CURVATURES: dict[str, Curvature] = {
    "identity": Curvature(IdentityState, _identity_init, _identity_statistics, lambda layers, s: {}, False),
    "raw": Curvature(RawState, _raw_init, _raw_statistics, _raw_factors, False),
    "kfac": Curvature(KFACState, _kfac_init, _kfac_statistics, _kfac_factors, True),
    "ekfac": Curvature(EigenState, _eigen_init, _eigen_statistics, _eigen_factors, False),
}
_KIND_OF = {c.state: k for k, c in CURVATURES.items()}


def check_kind(kind: str) -> Curvature:
    """The table entry of ``kind``, or a clear error."""
    if kind not in CURVATURES:
        raise ValueError(f"unknown preconditioner kind {kind!r}; choose one of {KINDS}")
    return CURVATURES[kind]


def kind_of(state) -> str:
    """The kind whose state ``state`` is (``ekfac`` for an :class:`EigenState`)."""
    try:
        return _KIND_OF[type(state)]
    except KeyError:
        raise TypeError(f"not a curvature state: {type(state).__name__}; use init(logra, kind)") from None


# ----------------------------------------------------------------------------- the pure API

def init(logra, kind: str, basis: Mapping | None = None):
    """Zero statistics of ``kind`` for a LoGra (or a sequence of layer records). ``kind="ekfac"``: the
    eigenvalue pass, in ``basis`` = ``{layer: (Q_A, Q_S)}`` or ``kfac_basis(...)``."""
    return check_kind(kind).init(_layers(logra), basis)


def batch_statistics(logra, state, g: jax.Array, pairs=None):
    """One batch's sums (traceable), of ``state``'s kind (and, for ``ekfac``, in its basis)."""
    return CURVATURES[kind_of(state)].statistics(_layers(logra), state, g, pairs)


def update(state, stats, weight=1.0):
    """``state + weight · stats`` over the summed fields (pure; an EK-FAC basis is kept)."""
    return state._replace(**{f: jax.tree_util.tree_map(lambda a, b: a + weight * b, getattr(state, f),
                                                       getattr(stats, f)) for f in type(state).SUMMED})


def accumulate_batch(layers, losses, pairs, g, aux):
    """The ``reduce`` of LoGra's compiled step that accumulates statistics: ``aux = (state, weight)``."""
    state, weight = aux
    return update(state, CURVATURES[kind_of(state)].statistics(layers, state, g, pairs), weight)


def check_finite(state) -> None:
    """Raise, naming the layer and statistic, if a summed statistic holds NaN or inf."""
    for f in type(state).SUMMED:
        v = getattr(state, f)
        for name, arr in (v.items() if isinstance(v, dict) else [("(all layers)", v)]):
            if not bool(jnp.all(jnp.isfinite(arr))):
                raise ValueError(f"statistics of layer '{name}' ({f}) contain NaN or inf: check the loss and the "
                                 "data of this layer (e.g. a diverged model or inf inputs)")


def check_damping(kind: str, damping, relative_damping) -> None:
    """Refuse bad damping arguments before any pass over the data (same rules as ``with_damping``)."""
    from jaxval._src.errors import ConfigError

    if kind == "identity":
        return
    if (damping is None) == (relative_damping is None):
        raise ConfigError("give exactly one of damping (absolute λ) or relative_damping (α · mean eigenvalue)")
    for name, v in (("damping", damping), ("relative_damping", relative_damping)):
        if v is not None and not (isinstance(v, (int, float, np.floating, np.integer)) and float(v) > 0
                                  and np.isfinite(float(v))):
            raise ConfigError(f"{name} must be > 0 (a finite number) for a '{kind}' preconditioner, got {v!r}")


def finalize(state, logra, damping: float | None = 1e-3, relative_damping: float | None = None, *,
             fingerprint: str | None = None) -> Preconditioner:
    """The :class:`~jaxval.Preconditioner` of accumulated statistics (the kind is the state's).

    ``logra``: the LoGra (or anything with ``.layers`` and ``.config()``, e.g. :func:`store_layout`).
    ``damping``: absolute λ per layer; ``relative_damping = α``: λ = α · the layer's mean eigenvalue.
    ``fingerprint``: the model fingerprint of the weights the statistics come from (recorded in the
    preconditioner's config as ``model_fingerprint``, its provenance)."""
    kind = kind_of(state)
    layers = _layers(logra)
    names = tuple(l.name for l in layers)
    shapes = tuple((l.k_in, l.k_out) for l in layers)
    config = dict(logra.config())
    if fingerprint is not None:
        config["model_fingerprint"] = fingerprint
    if kind == "identity":
        return Preconditioner(kind, names, shapes, {}, {n: 0.0 for n in names}, config)
    check_finite(state)
    factors = CURVATURES[kind].factors(layers, state)
    pc = Preconditioner(kind, names, shapes, factors, {n: 1.0 for n in names}, config)
    return pc.with_damping(None if relative_damping is not None else damping, relative_damping)


# ----------------------------------------------------------------------------- passes through the model

def accumulate(logra, model, data, kind: str, batch_size: int = 64, basis: Mapping | None = None,
               fisher: str = "empirical", sample_fn: Callable | None = None, num_samples: int = 1, seed: int = 0,
               mesh=None, progress: bool = True, desc: str | None = None):
    """One pass over ``data`` accumulating ``kind``'s statistics (sums); see :func:`fit_preconditioner`."""
    check_kind(kind)
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}")
    if fisher == "sampled" and sample_fn is None:
        raise ValueError("fisher='sampled' needs sample_fn(model, batch, keys) -> batch with labels drawn "
                         "from the model (keys: one PRNG key per example)")
    sampled = fisher == "sampled"
    step, mstate = logra.step_for(model, accumulate_batch, sample_fn=sample_fn if sampled else None, grads=False)
    state, projections = init(logra, kind, basis), logra.projections
    if mesh is None and jax.process_count() > 1:
        from jaxval._src.parallel import global_mesh

        mesh = global_mesh()
    multi = spans_processes(mesh)
    if multi:
        from jaxval._src.parallel import global_batch, global_rows, replicate, to_host, to_mesh

        if not is_array_tree(data):
            raise ValueError("across processes, data must be the whole dataset as a pytree of arrays with a "
                             "leading axis N (the same on every process; memmaps are read lazily)")
        mstate = to_mesh(mstate, mesh)   # sharded parameters stay sharded; host-local ones are replicated
        projections, state = (replicate(to_host(x), mesh) for x in (projections, state))
        n = num_examples(data)
        batches = ((s, global_rows(data, s, min(s + batch_size, n), mesh)) for s in range(0, n, batch_size))
        place_keys = lambda k: global_batch(k, mesh)  # noqa: E731
    else:
        n = num_examples(data)
        batches = ((s, shard_batch(b, mesh)) for s, b in iterate_batches(data, batch_size))
        place_keys = lambda k: k  # noqa: E731
    with tqdm(total=n, desc=desc or f"{kind} statistics", unit="ex", disable=not progress, leave=False) as bar:
        for start, batch in batches:
            b = jax.tree_util.tree_leaves(batch)[0].shape[0]
            for d in range(num_samples if sampled else 1):
                keys = place_keys(example_keys(seed, d, start, b)) if sampled else None
                _, _, state = step(mstate, batch, projections, keys, (state, np.float32(1.0)))
            bar.update(b)
    if multi:
        state = jax.tree_util.tree_map(jnp.asarray, to_host(state))
    return state


def fit_preconditioner(logra, model, data, kind: str = "ekfac", damping: float | None = 1e-3,
                       relative_damping: float | None = None, batch_size: int = 64, fisher: str = "empirical",
                       sample_fn: Callable | None = None, num_samples: int = 1, seed: int = 0, mesh=None,
                       progress: bool = True) -> Preconditioner:
    """Fit ``kind`` (identity | raw | kfac | ekfac) over ``data``: one pass through the model (two for
    ekfac: factors, then eigenvalues in their basis).

    ``data``: a pytree with leading axis N, or (one process) an iterable of batches. ``fisher="sampled"``:
    statistics of ``sample_fn(model, batch, keys)`` (labels drawn from the model, ``num_samples`` draws per
    example, keys from ``(seed, draw, example index)``, so the result does not depend on the batch size).
    ``mesh``: batches split over the mesh's first axis; a mesh spanning several processes (the default
    under ``jax.distributed``: ``jaxval.distributed.global_mesh()``) builds each global batch with
    ``global_batch``, every process reading only its own rows. Statistics are summed across devices
    inside the compiled step, so every scale gives the same result up to float summation order.
    """
    check_kind(kind)
    check_damping(kind, damping if relative_damping is None else None, relative_damping)
    from jaxval._src.provenance import Provenance

    try:
        fp = Provenance.of(logra, model).fingerprint
    except Exception:  # noqa: BLE001 - parameters this process cannot read whole: no fingerprint recorded
        fp = None
    if kind == "identity":
        return finalize(init(logra, kind), logra, fingerprint=fp)
    common = dict(batch_size=batch_size, fisher=fisher, sample_fn=sample_fn, num_samples=num_samples, seed=seed,
                  mesh=mesh, progress=progress)
    if kind == "ekfac":
        first = accumulate(logra, model, data, "kfac", desc="ekfac factors", **common)
        check_finite(first)
        second = accumulate(logra, model, data, "ekfac", basis=kfac_basis(first), desc="ekfac eigenvalues",
                            **common)
        return finalize(second, logra, damping, relative_damping, fingerprint=fp)
    return finalize(accumulate(logra, model, data, kind, **common), logra, damping, relative_damping, fingerprint=fp)


def pca_projections(model, loss_fn, data, rank=64, layers=None, batch_size: int = 64, progress: bool = True) -> dict:
    """LoGra projections from the top eigenvectors of each layer's un-projected K-FAC factors
    ``E[x xᵀ]`` and ``E[dy dyᵀ]``, from one pass that never forms per-example gradients.
    Use as ``LoGra(model, loss_fn, init="pca", projections=pca_projections(...))``."""
    from jaxval._src.logra import LoGra
    from jaxval._src.projection import resolve_rank

    full = LoGra(model, loss_fn, rank=None, init="identity", layers=layers)
    basis = kfac_basis(accumulate(full, model, data, "kfac", batch_size=batch_size, progress=progress,
                                  desc="pca factors"))
    out = {}
    for l in full.layers:
        k_in, k_out = resolve_rank(rank, l)
        qa, _, qs, _ = basis[l.name]
        out[l.name] = (qa[:, ::-1][:, :k_in].T, qs[:, ::-1][:, :k_out].T)  # eigh is ascending: last k columns
    return out


# ----------------------------------------------------------------------------- from a gradient store

class StoreLayout(NamedTuple):
    """A store's LoGra layers and config (stands in for the LoGra in ``init`` / ``finalize``)."""
    layers: tuple
    logra_config: dict

    def config(self) -> dict:
        return self.logra_config


def store_layout(store) -> StoreLayout:
    """The :class:`StoreLayout` recorded in a gradient store's config (``jaxval.log_gradients`` stores)."""
    cfg = (store.config or {}).get("logra")
    if not isinstance(cfg, dict) or "layers" not in cfg:
        raise ValueError(f"the store at {store.path} records no LoGra configuration (not written by "
                         "jaxval.log_gradients): fit from the model instead")
    layers = tuple(LayerShape(l["name"], int(l["k_in"]), int(l["k_out"])) for l in cfg["layers"])
    if sum(l.dim for l in layers) != store.dim:
        raise ValueError(f"the store's LoGra layers give D = {sum(l.dim for l in layers)}, its rows {store.dim}")
    return StoreLayout(layers, cfg)


def _provenance(store) -> dict:
    from jaxval._src.store import config_hash

    ids = np.asarray(store.ids)
    return {"store_config_hash": store.config_hash, "logra_config_hash": config_hash(store.config.get("logra")),
            "model_fingerprint": store.config.get("model_fingerprint"), "num_rows": len(store),
            "ids_sha256": config_hash({"ids": ids.tolist()})}


def save_statistics(path: str, state, store, overwrite: bool = False) -> str:
    """Save ``state`` (orbax, via ``jaxval.checkpoint``) recording the store it was logged with (its config
    hash, LoGra config hash, model fingerprint, rows and ids); :func:`load_statistics` refuses any other
    store."""
    from jaxval._src import checkpoint

    names = list(next(v for v in state if isinstance(v, dict)).keys()) if len(state) > 1 else []
    arrays = {"examples": np.asarray(state.examples)}
    for f in state._fields[1:]:
        arrays.update({f"{f}/{i}": np.asarray(getattr(state, f)[n]) for i, n in enumerate(names)})
    meta = {"format": "jaxval.curvature", "kind": kind_of(state), "names": names, **_provenance(store)}
    return checkpoint.save(path, arrays, meta, overwrite=overwrite)


def load_statistics(path: str, store=None):
    """The state saved by :func:`save_statistics`; with ``store``, refuse statistics logged with another
    store (config, LoGra configuration or model weights differ)."""
    from jaxval._src import checkpoint
    from jaxval._src.store import StoreError

    arrays, meta = checkpoint.load(path)
    if meta.get("format") != "jaxval.curvature":
        raise StoreError(f"{path} holds no jaxval curvature statistics")
    if store is not None:
        mine = _provenance(store)
        bad = [k for k, v in mine.items() if meta.get(k) != v]
        if bad:
            raise StoreError(f"the statistics at {path} were logged with another store than {store.path} "
                             f"({', '.join(bad)} differ): log the statistics again with this store "
                             "(jaxval log with log.stats: kfac)")
    cls, names = CURVATURES[meta["kind"]].state, meta["names"]
    fields = {f: {n: jnp.asarray(arrays[f"{f}/{i}"]) for i, n in enumerate(names)} for f in cls._fields[1:]}
    return cls(jnp.asarray(arrays["examples"]), **fields)


def accumulate_rows(layout, rows, kind: str, basis: Mapping | None = None, block_rows: int = 1024,
                    progress: bool = False):
    """``kind``'s statistics (raw, or ekfac eigenvalues in ``basis``) from stored gradient rows: ``rows``
    a :class:`~jaxval.GradientStore` or an array ``[N, D]``."""
    if check_kind(kind).needs_pairs:
        raise ValueError(f"{kind} statistics cannot be fitted from stored gradients: log with stats='{kind}'")
    layers = _layers(layout)
    state = init(layers, kind, basis)
    step = _row_step(layers)
    blocks = rows.iter_blocks(block_rows) if hasattr(rows, "iter_blocks") else \
        ((s, np.asarray(rows[s:s + block_rows], np.float32)) for s in range(0, len(rows), block_rows))
    n = len(rows)
    with tqdm(total=n, desc=f"{kind} from stored rows", unit="ex", disable=not progress, leave=False) as bar:
        for _, g in blocks:
            state = step(state, jnp.asarray(g, jnp.float32))
            bar.update(len(g))
    return state


_ROW_STEPS: dict[tuple, Callable] = {}


def _row_step(layers) -> Callable:
    key = tuple((l.name, l.k_in, l.k_out) for l in layers)
    fn = _ROW_STEPS.get(key)
    if fn is None:
        shapes = tuple(LayerShape(*k) for k in key)
        fn = _ROW_STEPS[key] = jax.jit(
            lambda state, g: update(state, CURVATURES[kind_of(state)].statistics(shapes, state, g, None)))
    return fn


def fit_from_store(store, stats=None, kind: str = "ekfac", damping: float | None = 1e-3,
                   relative_damping: float | None = None, block_rows: int = 1024,
                   progress: bool = False) -> Preconditioner:
    """Fit ``kind`` from a complete gradient store with no pass through the model.

    ``raw``: from the stored rows; ``kfac``: from ``stats`` (the K-FAC statistics of the logging pass:
    ``log_gradients(..., stats="kfac")``, a :class:`KFACState` or the path :func:`save_statistics` wrote);
    ``ekfac``: the basis from ``stats``, the eigenvalues re-fitted from the stored rows. A path is checked
    against ``store`` (refused for another store). With float32 stores the result equals the model-pass
    fit up to float summation order; bfloat16 rows move raw and EK-FAC eigenvalues by ~1e-2 relative.
    """
    from jaxval._src.store import GradientStore, StoreError

    store = GradientStore.open(store) if not hasattr(store, "read") else store
    if not store.is_complete():
        raise StoreError(f"the store at {store.path} is incomplete ({store.num_done()}/{len(store)} rows): "
                         "finish logging first")
    check_kind(kind)
    check_damping(kind, damping if relative_damping is None else None, relative_damping)
    layout = store_layout(store)
    fp = (store.config or {}).get("model_fingerprint")
    if kind == "identity":
        return finalize(init(layout, kind), layout, fingerprint=fp)
    if kind == "raw":
        return finalize(accumulate_rows(layout, store, "raw", block_rows=block_rows, progress=progress), layout,
                        damping, relative_damping, fingerprint=fp)
    if stats is None:
        raise ValueError(f"{kind} from a store needs the K-FAC statistics of its logging pass: log with "
                         "stats='kfac' (jaxval log: log.stats: kfac), or fit from the model")
    if isinstance(stats, str) or hasattr(stats, "__fspath__"):
        stats = load_statistics(str(stats), store)
    if not isinstance(stats, KFACState):
        raise TypeError(f"stats must be a KFACState or a path to saved K-FAC statistics, got {type(stats).__name__}")
    want = {l.name: (l.k_in, l.k_out) for l in layout.layers}
    got = {n: (stats.A[n].shape[0], stats.S[n].shape[0]) for n in stats.A}
    if want != got:
        raise ValueError(f"the statistics' layers {got} are not the store's {want}")
    check_finite(stats)
    if kind == "kfac":
        return finalize(stats, layout, damping, relative_damping, fingerprint=fp)
    second = accumulate_rows(layout, store, "ekfac", kfac_basis(stats), block_rows=block_rows, progress=progress)
    return finalize(second, layout, damping, relative_damping, fingerprint=fp)
