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

The statistics and the fit (typed states, ``init / update / finalize``, ``fit_preconditioner``,
``fit_from_store``) live in :mod:`jaxval._src.curvature`; this module holds the preconditioner only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxval._src import precision

_HI = precision.MATMUL


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

    @property
    def provenance(self):
        """The :class:`jaxval.Provenance` (LoGra config hash, model fingerprint) it was fitted with, or None
        for a hand-made preconditioner (empty ``config``). ``fingerprint`` is None for one saved by an older
        jaxval (which recorded none)."""
        from jaxval._src.provenance import of_config

        return of_config(self.config)

    def check_config(self, config: Mapping | None):
        """Raise :class:`jaxval.ProvenanceError` if ``config`` (a ``LoGra.config()`` or a store's config)
        is not the one fitted."""
        from jaxval._src.errors import ProvenanceError

        if config is None or not self.config:
            return
        mine = {k: self.config.get(k) for k in ("layers", "projection_sha256")}
        theirs = {k: config.get(k) for k in ("layers", "projection_sha256")}
        if mine != theirs:
            raise ProvenanceError("this preconditioner was fitted for another LoGra configuration (layers, ranks "
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
        """The preconditioner saved at ``path``; :class:`jaxval.CheckpointError` if it is not one or is
        damaged (a truncated array or meta.json, a factor missing or of the wrong shape)."""
        from jaxval._src import checkpoint
        from jaxval._src.errors import CheckpointError

        arrays, meta = checkpoint.load(path)
        try:
            kind, names = meta["kind"], tuple(meta["names"])
            shapes = tuple((int(a), int(b)) for a, b in meta["shapes"])
            damping = {k: float(v) for k, v in meta["damping"].items()}
            config = meta.get("config", {}) or {}
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is not a jaxval preconditioner checkpoint (meta.json lacks or has a bad "
                                  f"{e}): fit it again (jaxval fit)") from e
        if kind not in ("identity", "raw", "kfac", "ekfac") or len(shapes) != len(names):
            raise CheckpointError(f"{path}: meta.json describes no preconditioner (kind {kind!r}); fit it again")
        factors: dict = {n: {} for n in names}
        for key, v in arrays.items():
            if key == "empty":
                continue
            i, k = key.split("/")
            factors[names[int(i)]][k] = jnp.asarray(v)
        if kind == "identity":
            factors = {}
        want = {"raw": ("V", "e"), "kfac": ("QA", "QS", "L"), "ekfac": ("QA", "QS", "L")}.get(kind, ())
        for n, (ki, ko) in zip(names, shapes):
            f = factors.get(n, {})
            missing = [k for k in want if k not in f]
            if missing:
                raise CheckpointError(f"{path}: layer '{n}' lacks factors {missing}: a damaged preconditioner "
                                      "checkpoint; fit it again")
            if kind in ("kfac", "ekfac") and (tuple(f["QA"].shape) != (ki, ki) or tuple(f["QS"].shape) != (ko, ko)
                                               or tuple(f["L"].shape) != (ki, ko)):
                raise CheckpointError(f"{path}: layer '{n}' factors have shapes {f['QA'].shape}, {f['QS'].shape}, "
                                      f"{f['L'].shape}, not those of a ({ki}, {ko}) block: a damaged checkpoint")
            if kind == "raw" and tuple(f["V"].shape) != (ki * ko, ki * ko):
                raise CheckpointError(f"{path}: layer '{n}' raw factor has shape {f['V'].shape}: a damaged checkpoint")
        return cls(kind, names, shapes, factors, damping, config)


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
