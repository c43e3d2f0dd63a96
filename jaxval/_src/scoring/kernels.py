"""The scoring engine's jit-compiled block kernels, how a preconditioner enters them, and their one cache.

A preconditioner is classified once per call (:class:`PreconditionerSpec`):

- ``identity``: ``None``;
- ``pytree``: a registered pytree whose leaves are all arrays and that has ``.apply`` (e.g.
  :class:`jaxval.Preconditioner`, or a ``jax.tree_util.register_dataclass``): passed to the kernels as a
  jit *argument*, so compiled kernels are reused across calls (jit caches by the pytree's structure and
  the leaves' shapes) and always see the current arrays;
- ``closure``: any other object with ``.apply``: traced inside jit as a closed-over constant (kernels
  compiled once per call, never cached: the object may change between calls);
- ``eager``: a ``pytree`` or ``closure`` whose ``apply`` cannot be traced (tracing raised one of JAX's
  tracer / concretization errors, e.g. it calls numpy): called outside jit, once per block.

Anything else raises ``TypeError``; any other exception raised by ``apply`` while tracing propagates.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxval._src.scoring.groups import columns

__all__ = ["MODES", "NEEDS_Z_SELF", "NEEDS_Q_SELF", "TRACE_ERRORS", "PreconditionerLike", "PreconditionerSpec",
           "cached_kernel", "parse_precision", "bf16_parts", "native_bf16_dot", "qz_dot", "combine", "block_self", "self_kernel",
           "block_scores",
           "topk_key", "prepare_queries", "as_f32"]

MODES = ("dot", "cosine", "relative", "l2")
NEEDS_Z_SELF = frozenset({"cosine", "relative", "l2"})
NEEDS_Q_SELF = frozenset({"cosine"})

# what tracing a non-traceable apply raises (numpy on a tracer, Python control flow on a traced value)
TRACE_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


class PreconditionerLike(Protocol):
    def apply(self, g: jax.Array) -> jax.Array: ...


def _array_leaves(obj) -> list | None:
    """The leaves of ``obj`` when it is a pytree (not itself a leaf) whose leaves are all arrays."""
    leaves = jax.tree_util.tree_leaves(obj)
    if not leaves or (len(leaves) == 1 and leaves[0] is obj):
        return None
    if all(isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves):
        return leaves
    return None


# (type, treedef, leaf shapes/dtypes, D) -> kind of a pytree preconditioner: "pytree" or "eager"
_PYTREE_KINDS: "OrderedDict[tuple, str]" = OrderedDict()
_PYTREE_KINDS_MAX = 256


class PreconditionerSpec:
    """How ``precond`` enters the kernels: ``kind`` in identity | pytree | closure | eager (module docstring)."""

    def __init__(self, precond, dim: int):
        self.obj = precond
        self.dim = int(dim)
        self.leaves = None
        if precond is None:
            self.kind = "identity"
            return
        apply = getattr(precond, "apply", None)
        if apply is None or not callable(apply):
            raise TypeError(
                "precond must be None (identity) or an object with .apply(g) -> H⁻¹ g for g of shape "
                f"[B, D]; got {type(precond).__name__}"
            )
        self.leaves = _array_leaves(precond)
        if self.leaves is not None:
            treedef = jax.tree_util.tree_structure(precond)
            key = (type(precond), treedef, tuple((np.shape(x), str(x.dtype)) for x in self.leaves), dim)
            try:
                kind = _PYTREE_KINDS.get(key)
            except TypeError:  # unhashable static data: probe on every call
                key, kind = None, None
            if kind is None:
                kind = self._probe(lambda pc, g: pc.apply(g), precond, "pytree")
                if key is not None:
                    _PYTREE_KINDS[key] = kind
                while len(_PYTREE_KINDS) > _PYTREE_KINDS_MAX:
                    _PYTREE_KINDS.popitem(last=False)
            self.kind = kind
        else:
            self.kind = self._probe(lambda pc, g: apply(g), None, "closure")

    def _probe(self, fn, pc, kind: str) -> str:
        """Trace ``apply`` once on a ``[2, D]`` shape: ``kind`` if it traces, "eager" on a tracer error."""
        spec = jax.ShapeDtypeStruct((2, self.dim), jnp.float32)
        try:
            out = jax.eval_shape(fn, pc, spec)
        except TRACE_ERRORS:
            return "eager"
        if getattr(out, "shape", None) != spec.shape:
            raise ValueError(
                f"precond.apply returned shape {getattr(out, 'shape', None)} for gradients of shape {spec.shape}; "
                "it must map [B, D] to [B, D]"
            )
        return kind

    @property
    def arg(self):
        """What the kernels get as their ``pc`` argument."""
        return self.obj if self.kind == "pytree" else None

    def getter(self) -> Callable:
        """``get(pc)`` -> the apply function inside a kernel (None: identity, or applied outside for
        ``eager``).  Holds the preconditioner object only for ``closure`` (whose kernels are not
        cached), so cached kernels never keep a preconditioner alive."""
        kind, obj = self.kind, (self.obj if self.kind == "closure" else None)

        def get(pc):
            if kind == "pytree":
                return pc.apply
            if kind == "closure":
                return obj.apply
            return None

        return get

    def eager(self, x):
        out = jnp.asarray(self.obj.apply(x), dtype=jnp.float32)
        if out.shape != x.shape:
            raise ValueError(f"precond.apply returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        return out


_KERNELS: "OrderedDict[tuple, Callable]" = OrderedDict()
_KERNELS_MAX = 64


def cached_kernel(key: tuple, spec: PreconditionerSpec | None, build: Callable[[], Callable]) -> Callable:
    """``jax.jit(build())``, cached across calls under ``key`` unless it closes over a preconditioner
    object (``closure``); ``spec=None``: a kernel that involves no preconditioner.  ``build`` must depend
    only on what ``key`` (and the spec's kind) names."""
    if spec is not None and spec.kind == "closure":
        return jax.jit(build())
    key = ("none" if spec is None else spec.kind,) + key
    fn = _KERNELS.get(key)
    if fn is None:
        fn = _KERNELS[key] = jax.jit(build())
        while len(_KERNELS) > _KERNELS_MAX:
            _KERNELS.popitem(last=False)
    else:
        _KERNELS.move_to_end(key)
    return fn


def parse_precision(p):
    if p is None or isinstance(p, jax.lax.Precision):
        return p
    return jax.lax.Precision(p) if not isinstance(p, str) else jax.lax.Precision[p.upper()]


def _rowdot(a, b):
    return jnp.sum(a * b, axis=1)


def as_f32(z):
    return z if z.dtype == jnp.float32 else z.astype(jnp.float32)


def bf16_parts(q):
    """float32 [Q, D] -> bfloat16 [3Q, D] with q == p0 + p1 + p2 exactly.

    Each part keeps the top 8 significant bits of what is left (truncation by masking the low 16 bits:
    exact, and nothing a compiler may fold as a float round trip), so three parts hold all 24 bits
    (unless the last parts are subnormal, |q| < ~1e-31, which XLA:CPU flushes to zero)."""
    parts, r = [], q
    for _ in range(3):
        h = jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(r, jnp.uint32) & jnp.uint32(0xFFFF0000), jnp.float32
        )
        parts.append(h.astype(jnp.bfloat16))
        r = r - h
    return jnp.concatenate(parts)


@functools.cache
def native_bf16_dot() -> bool:
    """Whether the default backend multiplies bfloat16 matrices natively: accelerators do; a CPU only with
    AVX-512 BF16 or AMX. Elsewhere XLA:CPU emulates the bfloat16 GEMM: on the 2-core AVX2 VM of 2026-12-02 the
    3Q-row bfloat16 GEMM took 90 ms where converting the rows and a float32 GEMM took 58 ms
    (Q 64, D 8,832, 1,024 rows)."""
    if jax.default_backend() != "cpu":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def qz_dot(q, z, precision):
    """q [Q, D] float32 · z[B, D]ᵀ -> [Q, B] float32.

    For bfloat16 rows z, q is split exactly into three bfloat16 parts (:func:`bf16_parts`): every product
    of two bfloat16 numbers is exact in float32 and the sums accumulate in float32, so this is the
    float32 product of q with the stored rows (up to summation order) without converting z: one
    bfloat16 GEMM with 3Q rows, 1.3x faster than converting a 75 MB block and a float32 GEMM on a
    2-core CPU with AVX-512 (20 vs 26 ms plus 32 ms of conversion), and the fast path on accelerators. Where
    the backend has no native bfloat16 GEMM (:func:`native_bf16_dot`) the rows are converted to float32
    inside the kernel instead (exact as well)."""
    if z.dtype == jnp.bfloat16 and native_bf16_dot():
        s = jax.lax.dot_general(bf16_parts(q), z, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return s.reshape(3, q.shape[0], -1).sum(0)
    return jnp.dot(q, as_f32(z).T, precision=precision, preferred_element_type=jnp.float32)


def _safe_rsqrt(s):
    return jnp.where(s > 0, jax.lax.rsqrt(jnp.where(s > 0, s, 1.0)), 0.0)


def combine(mode, s, q_self, z_self):
    """Scores ``[Q, B]`` of ``mode`` from the products ``s`` and the self-influences (see the engine)."""
    if mode == "dot":
        return s
    if mode == "cosine":
        return s * _safe_rsqrt(q_self)[:, None] * _safe_rsqrt(z_self)[None, :]
    if mode == "relative":
        return s * _safe_rsqrt(z_self)[None, :]
    if mode == "l2":
        return s - 0.5 * z_self[None, :]
    raise AssertionError(mode)


def _checked(apply, x):
    out = apply(x).astype(jnp.float32)
    if out.shape != x.shape:
        raise ValueError(f"precond.apply returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
    return out


def block_self(z, apply, sels, hz=None):
    """Group-restricted self-influences ``g[cols] · (H⁻¹ g)[cols]`` of the rows of z: tuple of [B]."""
    z = as_f32(z)
    if hz is None:
        hz = z if apply is None else _checked(apply, z)
    return tuple(_rowdot(columns(z, s), columns(hz, s)) for s in sels)


def self_kernel(spec: PreconditionerSpec, sels, sels_key) -> Callable:
    """``kern(spec.arg, z, hz) -> tuple of [B]``: :func:`block_self` of a block (``hz``: ``H⁻¹ z`` computed
    eagerly for an ``eager`` spec, else None)."""
    get = spec.getter()
    return cached_kernel(("self", sels_key), spec, lambda: lambda pc, z, hz: block_self(z, get(pc), sels, hz))


def block_scores(qts, qself, z, zself, *, mode, sels, precision):
    """Scores of one block ``z [B, D]``: tuple of ``[Q, B]`` per group (``zself``: tuple of ``[B]`` or None)."""
    out = []
    for gi, sel in enumerate(sels):
        s = qz_dot(qts[gi], columns(z, sel), precision)
        out.append(combine(mode, s, qself[gi], None if zself is None else zself[gi]))
    return tuple(out)


def topk_key(s, n_valid, start, k, largest):
    """Top-k of one block's [Q, B] scores (rows >= n_valid are padding), global indices."""
    if not largest:
        s = -s
    # XLA's TopK orders by the float total order: make -0.0 equal to +0.0 and rank NaN last
    s = jnp.where(s == 0, 0.0, s)
    cols = jnp.arange(s.shape[1], dtype=jnp.int32)
    s = jnp.where((cols[None, :] < n_valid) & ~jnp.isnan(s), s, -jnp.inf)
    v, i = jax.lax.top_k(s, k)
    return v, i + start


def prepare_queries(q, spec: PreconditionerSpec, sels, sels_key, mode):
    """``(q̃ per group, q self-influence per group or None)`` for queries ``q [Q, D]`` already on device."""
    if spec.kind == "eager":
        qt = spec.eager(q)
        qts = tuple(columns(qt, s) for s in sels)
        qself = tuple(_rowdot(columns(q, s), t) if mode in NEEDS_Q_SELF else None for s, t in zip(sels, qts))
        return qts, qself
    get = spec.getter()

    def build():
        def prep(pc, q):
            apply = get(pc)
            qt = q if apply is None else _checked(apply, q)
            qts = tuple(columns(qt, s) for s in sels)
            qself = tuple(_rowdot(columns(q, s), t) if mode in NEEDS_Q_SELF else None for s, t in zip(sels, qts))
            return qts, qself

        return prep

    return cached_kernel(("queries", mode, sels_key), spec, build)(spec.arg, q)
