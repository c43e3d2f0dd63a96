"""Provenance: which LoGra configuration and which model weights an artifact's gradients come from.

Every artifact jaxval makes records a :class:`Provenance` ``(config_hash, fingerprint)``:

* ``config_hash``: sha256 of the canonical JSON of ``LoGra.config()`` (layers, ranks, init, seed, the
  projection matrices' sha256, compute dtype): two LoGras with the same ``config_hash`` project alike.
* ``fingerprint``: ``model_fingerprint(model)``, sha256 over the parameters' names, shapes and bytes.

Where each artifact keeps it: a :class:`~jaxval.GradientStore` in its manifest's config (``logra`` and
``model_fingerprint``, written by :func:`jaxval.log_gradients`); a :class:`~jaxval.Preconditioner` in its
``config`` (``LoGra.config()`` plus ``model_fingerprint``); query gradients in a :class:`ProjectedGrads`
(an array wrapper, a registered pytree whose provenance is static); an ALinFiK student in its meta.

Consumers (``influence``, ``top_k``, ``self_influence``, ``linfik``, the CLI) call :func:`check` with every
input they were given and raise :class:`~jaxval.ProvenanceError` when two known provenances differ, or when
one input carries provenance and another is a bare array whose origin is unknown, unless the caller opts
out explicitly (``unchecked=True``). A wrong score that looks right is worse than an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxval._src.errors import ProvenanceError

__all__ = ["Provenance", "ProjectedGrads", "wrap_grads", "of", "of_config", "of_store", "of_precond", "provenance_of",
           "with_provenance", "unwrap", "check", "logra_config_hash"]


def _canonical(obj) -> str:
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=default)


def logra_config_hash(config: Mapping) -> str:
    """sha256 of a ``LoGra.config()`` dict (without any ``model_fingerprint`` entry), as hex."""
    cfg = {k: v for k, v in dict(config).items() if k != "model_fingerprint"}
    return hashlib.sha256(_canonical(cfg).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Provenance:
    """``(config_hash, fingerprint)`` of a set of gradients; ``fingerprint`` None: the weights are unknown
    (an artifact made by an older jaxval, or ``logra=`` given without ``model=``)."""

    config_hash: str
    fingerprint: str | None = None

    @classmethod
    def of(cls, logra, model=None, *, fingerprint: str | None = None) -> "Provenance":
        """The provenance of ``logra.grads(model, ...)`` (both hashes cached on the LoGra)."""
        if fingerprint is None and model is not None:
            fingerprint = logra.fingerprint(model)
        return cls(logra.config_hash(), fingerprint)

    def short(self) -> str:
        fp = self.fingerprint[:10] + "…" if self.fingerprint else "unknown"
        return f"LoGra config {self.config_hash[:10]}…, model {fp}"


def of(logra, model=None) -> Provenance:
    """``Provenance.of(logra, model)``."""
    return Provenance.of(logra, model)


def of_config(config: Mapping | None, fingerprint: str | None = None) -> Provenance | None:
    """The provenance recorded in a LoGra config dict (a preconditioner's ``config``) or None."""
    if not isinstance(config, Mapping) or "layers" not in config:
        return None
    fp = fingerprint if fingerprint is not None else config.get("model_fingerprint")
    return Provenance(logra_config_hash(config), fp)


def of_store(store) -> Provenance | None:
    """The provenance recorded in a gradient store's config (``jaxval.log_gradients`` stores), or None."""
    cfg = getattr(store, "config", None)
    if not isinstance(cfg, Mapping):
        return None
    return of_config(cfg.get("logra"), cfg.get("model_fingerprint")) if isinstance(cfg.get("logra"), Mapping) \
        else None


def of_precond(precond) -> Provenance | None:
    if precond is None:
        return None
    p = getattr(precond, "provenance", None)
    return p if isinstance(p, Provenance) else None


# ---------------------------------------------------------------------------------------------- the wrapper

class ProjectedGrads:
    """``[B, D]`` projected gradients with their :class:`Provenance`; behaves as an array where it matters
    (``np.asarray(g)``, ``jnp.asarray(g)``, ``g[i]``, ``g.shape``, ``len(g)``) and is a registered pytree
    (the array is the leaf, the provenance static), so it passes through ``jax.jit`` unchanged."""

    __slots__ = ("array", "provenance")
    __array_priority__ = 100

    def __init__(self, array, provenance: Provenance):
        if not isinstance(provenance, Provenance):
            raise TypeError(f"provenance must be a jaxval Provenance, got {type(provenance).__name__}")
        if isinstance(array, ProjectedGrads):
            array = array.array
        self.array = array
        self.provenance = provenance

    @property
    def shape(self):
        return tuple(self.array.shape)

    @property
    def dtype(self):
        return self.array.dtype

    @property
    def ndim(self):
        return len(self.array.shape)

    def __len__(self):
        return int(self.array.shape[0])

    def __getitem__(self, i):
        return ProjectedGrads(self.array[i], self.provenance)

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.array)
        return a if dtype is None else a.astype(dtype)

    def __jax_array__(self):
        return self.array

    def astype(self, dtype):
        return ProjectedGrads(self.array.astype(dtype), self.provenance)

    def __repr__(self):
        return f"ProjectedGrads(shape={self.shape}, dtype={self.dtype}, {self.provenance.short()})"

    def __getattr__(self, name):   # .T, .sharding, .block_until_ready(), .reshape(...): the array's own
        if name in ("array", "provenance") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.array, name)

    # arithmetic gives bare arrays (a result is no longer the gradients the provenance describes)
    def __matmul__(self, o):
        return self.array @ unwrap(o)

    def __rmatmul__(self, o):
        return unwrap(o) @ self.array

    def __add__(self, o):
        return self.array + unwrap(o)

    def __radd__(self, o):
        return unwrap(o) + self.array

    def __sub__(self, o):
        return self.array - unwrap(o)

    def __rsub__(self, o):
        return unwrap(o) - self.array

    def __mul__(self, o):
        return self.array * unwrap(o)

    def __rmul__(self, o):
        return unwrap(o) * self.array

    def __truediv__(self, o):
        return self.array / unwrap(o)

    def __neg__(self):
        return -self.array


jax.tree_util.register_pytree_node(ProjectedGrads, lambda g: ((g.array,), g.provenance),
                                   lambda prov, ch: ProjectedGrads(ch[0], prov))


def with_provenance(array, logra=None, model=None, *, provenance: Provenance | None = None) -> ProjectedGrads:
    """Wrap bare gradients with the provenance of ``logra`` (and ``model``) or the ``provenance`` given."""
    if provenance is None:
        if logra is None:
            raise ProvenanceError("with_provenance needs logra= (and model=) or provenance=")
        provenance = Provenance.of(logra, model)
    return ProjectedGrads(array, provenance)


def wrap_grads(logra, model, g) -> ProjectedGrads:
    """``g`` (what ``logra``'s step gave for ``model``) with its provenance: what ``LoGra.grads`` returns.
    Weights this process cannot read whole (parameters sharded across processes) give a provenance without
    fingerprint (the LoGra configuration is still checked)."""
    try:
        p = Provenance.of(logra, model)
    except Exception:  # noqa: BLE001
        p = Provenance.of(logra)
    return ProjectedGrads(g, p)


def provenance_of(x) -> Provenance | None:
    """The provenance ``x`` carries: a ProjectedGrads, a store, a preconditioner, a Provenance, or None."""
    if isinstance(x, Provenance):
        return x
    if isinstance(x, ProjectedGrads):
        return x.provenance
    p = getattr(x, "provenance", None)
    if isinstance(p, Provenance):
        return p
    if hasattr(x, "read") and hasattr(x, "dim"):
        return of_store(x)
    return None


def unwrap(x):
    """The bare array of a ProjectedGrads (anything else as is)."""
    return x.array if isinstance(x, ProjectedGrads) else x


# ---------------------------------------------------------------------------------------------- the check

def check(inputs: Mapping[str, Any], *, unchecked: bool = False, what: str = "scoring") -> Provenance | None:
    """Compare the provenance of every named input (``{"query gradients": q, "training rows": store,
    "preconditioner": pc}``, values: anything :func:`provenance_of` takes, or None for "not given").

    Raises :class:`ProvenanceError` when two known provenances differ (naming the inputs and whether the
    LoGra configuration or the model weights differ), or when some inputs carry provenance and another
    (a bare array) does not, unless ``unchecked=True``. Returns the common provenance (or None)."""
    known: dict[str, Provenance] = {}
    bare: list[str] = []
    for name, x in inputs.items():
        if x is None:
            continue
        p = provenance_of(x)
        if p is None:
            bare.append(name)
        else:
            known[name] = p
    if unchecked or not known:
        return next(iter(known.values()), None)
    names = list(known)
    ref_name, ref = names[0], known[names[0]]
    for name in names[1:]:
        p = known[name]
        if p.config_hash != ref.config_hash:
            raise ProvenanceError(
                f"{what}: the {name} and the {ref_name} come from different LoGra configurations "
                f"(config hash {p.config_hash[:12]}… vs {ref.config_hash[:12]}…: layers, ranks, init, seed or "
                "projections differ): compute both with the same LoGra (or pass unchecked=True if you are sure)")
    fps = {n: p.fingerprint for n, p in known.items()}
    have = {n: f for n, f in fps.items() if f is not None}
    if len(set(have.values())) > 1:
        first = next(iter(have))
        other = next(n for n in have if have[n] != have[first])
        raise ProvenanceError(
            f"{what}: the {other} and the {first} come from different model weights (fingerprint "
            f"{have[other][:12]}… vs {have[first][:12]}…): use gradients, statistics and preconditioner of one "
            "checkpoint (or pass unchecked=True if you are sure)")
    if have and len(have) < len(fps):
        missing = [n for n in fps if fps[n] is None]
        raise ProvenanceError(
            f"{what}: the {', '.join(missing)} record(s) no model fingerprint while the {list(have)[0]} does "
            "(made by an older jaxval, or logra= given without model=): re-create it, pass model=, or pass "
            "unchecked=True if you are sure it comes from the same weights")
    if bare:
        raise ProvenanceError(
            f"{what}: the {', '.join(bare)} are bare arrays while the {', '.join(known)} record(s) their "
            f"provenance ({ref.short()}): pass what LoGra.grads returned as is (a ProjectedGrads), or "
            "logra=/model= (or provenance=) for the bare arrays, or unchecked=True to score without the check")
    return ref
