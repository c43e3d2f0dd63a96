"""influence / top_k / self_influence: one streamed pass over the training rows per call.

See :mod:`jaxval._src.scoring` for the conventions (sign, modes, groups, sharding, ties).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Mapping

import jax
import numpy as np

from jaxval._src import provenance as _prov
from jaxval._src.errors import ConfigError, IncompleteStoreError
from jaxval._src.scoring import memo
from jaxval._src.scoring.groups import normalize_groups, selectors_key
from jaxval._src.scoring.kernels import (MODES, NEEDS_Z_SELF, PreconditionerSpec, as_f32, block_scores,
                                         cached_kernel, native_bf16_dot, self_kernel, parse_precision,
                                         prepare_queries, topk_key)
from jaxval._src.scoring.sources import (BF16, Placer, TrainRows, device_blocks, pad_rows, progress_bar,
                                         resolve_block_rows)

__all__ = ["influence", "top_k", "self_influence"]


# --------------------------------------------------------------------------------------------------
# several processes


def _process_count() -> int:
    return jax.process_count()


def _local_rows(train: Any, mesh) -> tuple[TrainRows, Any]:
    """This process's rows and devices: all rows and ``mesh`` in one process; under several processes a
    contiguous range (whole storage chunks for a store) and the mesh's devices on this process."""
    full = TrainRows(train)
    if _process_count() == 1:
        return full, mesh
    from jaxval._src.parallel import owned_range

    lo, hi = owned_range(full.total, align=full.chunk_rows or 1)
    if mesh is not None:
        local = [d for d in np.asarray(mesh.devices).flat if d.process_index == jax.process_index()]
        mesh = jax.sharding.Mesh(np.asarray(local), ("rows",)) if local else None
    return TrainRows(train, lo, hi), mesh


def _gather(x: np.ndarray, axis: int) -> np.ndarray:
    """Concatenate every process's ``x`` along ``axis`` in process order (as is in one process)."""
    if _process_count() == 1:
        return x
    from jaxval._src.parallel import allgather_rows

    return allgather_rows(x, axis=axis)


# --------------------------------------------------------------------------------------------------
# provenance and completeness (before any work)


def _checked_inputs(queries, train, precond, *, logra=None, model=None, provenance=None, unchecked=False,
                    allow_incomplete=False, what="influence"):
    """The bare queries and training rows after the provenance check (see :mod:`jaxval._src.provenance`)
    and the completeness check of a store."""
    if provenance is not None and not isinstance(provenance, _prov.Provenance):
        raise TypeError(f"provenance must be a jaxval.Provenance, got {type(provenance).__name__}")
    if logra is not None and provenance is not None:
        raise ConfigError("give logra= (and model=) or provenance=, not both")
    if model is not None and logra is None:
        raise ConfigError("model= describes the query gradients together with logra=: pass both")
    qp = None
    if queries is not None:
        if provenance is not None or logra is not None:
            if isinstance(queries, _prov.ProjectedGrads):
                raise ConfigError("the query gradients carry their provenance already: drop logra=/provenance=")
            qp = provenance if provenance is not None else _prov.Provenance.of(logra, model)
        else:
            qp = queries
    inputs = {"training rows": train, "preconditioner": precond}
    if queries is not None:
        inputs = {"query gradients": qp, **inputs}
    _prov.check(inputs, unchecked=unchecked, what=what)
    if not allow_incomplete and hasattr(train, "is_complete") and hasattr(train, "done_mask"):
        mask = np.asarray(train.done_mask())
        if not mask.all():
            pend = np.flatnonzero(~mask)
            raise IncompleteStoreError(
                f"{what}: the store at {getattr(train, 'path', '?')} is incomplete: {pend.size} of {mask.size} rows "
                f"are not logged yet (first pending rows {pend[:5].tolist()}); finish logging (rerun the same "
                "log_gradients / `jaxval log` call) or pass allow_incomplete=True to score pending rows as zeros")
        if hasattr(train, "check_chunks"):
            train.check_chunks()
    return (None if queries is None else _prov.unwrap(queries)), _prov.unwrap(train)


# --------------------------------------------------------------------------------------------------
# the plan of one call


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")


def _check_queries(queries, dim: int):
    q = queries if isinstance(queries, jax.Array) else np.asarray(queries)
    if q.ndim != 2:
        raise ValueError(f"queries must be a 2-D array [Q, D]; got shape {tuple(q.shape)}")
    if q.shape[1] != dim:
        raise ValueError(f"queries have D={q.shape[1]} columns but the training gradients have D={dim}")
    return q


def _given_self_influence(self_infl, names, src: TrainRows):
    """A user-given self_influence as a list of this process's ``[n]`` float32 arrays (one per group)."""
    if self_infl is None:
        return None
    if names is None:
        if isinstance(self_infl, Mapping):
            raise ValueError("self_influence is a dict but no groups were given; pass an array [N]")
        arrs = [self_infl]
    else:
        if not isinstance(self_infl, Mapping) or set(self_infl) != set(names):
            raise ValueError(
                "with groups, self_influence must be a dict {group name: [N]} with the same keys as groups "
                "(each group needs its own restricted self-influence); or pass None to compute it"
            )
        arrs = [self_infl[k] for k in names]
    out = []
    for a in arrs:
        a = np.asarray(a, dtype=np.float32)
        if a.shape != (src.total,):
            raise ValueError(
                f"self_influence must have shape ({src.total},) (one value per training row); got {a.shape}"
            )
        out.append(a[src.lo:src.hi])
    return out


class _Plan:
    """Everything shared by influence / top_k for one call (on this process's rows)."""

    def __init__(self, queries, src: TrainRows, mesh, precond, mode, block_rows, self_infl, groups, precision,
                 min_rows=1):
        self.mode = mode
        self.src = src
        self.n, self.dim = src.n, src.dim
        self.placer = Placer(mesh)
        self.block_rows = resolve_block_rows(block_rows, self.n, self.dim, self.placer.mesh, min_rows,
                                             src.chunk_rows, src.native)
        self.names, self.sels = normalize_groups(groups, self.dim)
        self.sels_key = selectors_key(self.sels)
        self.resident, self.resident_dtype = self._resident_identity(src)
        self.pre = PreconditionerSpec(precond, self.dim)
        self.precision = parse_precision(precision)
        q = _check_queries(queries, self.dim)
        q = self.placer.replicated(q.astype(np.float32))
        self.qts, self.qself = prepare_queries(q, self.pre, self.sels, self.sels_key, mode)
        self.nq = int(q.shape[0])
        needs = mode in NEEDS_Z_SELF
        given = _given_self_influence(self_infl, self.names, src)  # validated even when unused
        self.ident = None
        if needs and given is None:
            self.ident = memo.identify(src, self.pre, self.sels_key)
            given = memo.lookup(self.ident)
        given = given if needs else None
        self.extra = given or []
        # where the train self-influence comes from: given (or cached) / computed per block (jit or eager)
        self.z_self_source = (
            "none" if not needs else ("given" if given else ("eager" if self.pre.kind == "eager" else "jit"))
        )
        # computed in this pass and worth keeping for later calls
        self.keep_z_self = self.ident is not None and self.z_self_source in ("jit", "eager")
        self.z_self_parts: list = []
        # one score kernel whatever the source of the self-influence (a second call served from the cache
        # compiles nothing new); the self-influence kernel is the one self_influence() uses
        self.key = (mode, self.sels_key, str(self.precision))
        sels = self.sels
        self.score_kw = dict(mode=mode, sels=sels, precision=self.precision)
        if self.z_self_source in ("jit", "eager"):
            self._self_kernel = self_kernel(self.pre, sels, self.sels_key)

    def blocks(self, prefetch):
        """(start, stop, block, extra) on the device; a complete local store's blocks are served from, or
        kept in, the resident-rows cache (:mod:`memo`), converted to float32 where bfloat16 is emulated."""
        if self.resident is None:
            yield from device_blocks(self.src, self.block_rows, self.placer, self.extra, prefetch)
            return
        cached = memo.rows_lookup(self.resident)
        if cached is not None:
            for start, stop, block in cached:
                yield start, stop, block, tuple(
                    self.placer.vector(pad_rows(np.asarray(e[start:stop], np.float32), self.block_rows))
                    for e in self.extra)
            return
        kept = []
        for start, stop, block, ex in device_blocks(self.src, self.block_rows, self.placer, self.extra, prefetch):
            if block.dtype != self.resident_dtype:
                block = cached_kernel(("to_f32",), None, lambda: as_f32)(block)
            kept.append((start, stop, block))
            yield start, stop, block, ex
        if len(kept) == self.n_blocks:
            memo.rows_remember(self.resident, kept)

    def _resident_identity(self, src: TrainRows):
        """Where the rows may stay on the device between calls: one device, a complete local store, and
        the blocks within the budget (else None)."""
        if self.placer.mesh is not None or src.kind != "store":
            return None, None
        dtype = np.dtype(BF16) if (src.native and native_bf16_dot()) else np.dtype(np.float32)
        if self.n_blocks * self.block_rows * self.dim * dtype.itemsize > memo.ROWS_MAX_BYTES:
            return None, None
        return memo.rows_identity(src, self.block_rows, dtype), dtype

    def z_self(self, block, ex):
        """zself tuple for the kernel (or None)."""
        if self.z_self_source == "given":
            return tuple(ex)
        if self.z_self_source == "eager":
            return self._self_kernel(None, block, self.placer.block(self.pre.eager(as_f32(block))))
        if self.z_self_source == "jit":
            return self._self_kernel(self.pre.arg, block, None)
        return None

    def keep(self, start, stop, zself):
        """Collect a block's train self-influences (device arrays; copied to the host at the end)."""
        if self.keep_z_self:
            self.z_self_parts.append((stop - start, zself))

    def finish(self):
        """Cache the self-influences this pass computed."""
        if self.keep_z_self and self.z_self_parts:
            values = [np.concatenate([np.asarray(z[g])[:m] for m, z in self.z_self_parts])
                      for g in range(len(self.sels))]
            memo.remember(self.ident, values)

    @property
    def n_blocks(self):
        return -(-self.n // self.block_rows)


# --------------------------------------------------------------------------------------------------
# public API


def influence(
    queries,
    train,
    precond=None,
    mode: str = "dot",
    block_rows: int | None = None,
    self_influence=None,
    *,
    groups: Mapping[str, Any] | None = None,
    mesh=None,
    precision="highest",
    prefetch: int | None = None,
    progress: bool | None = None,
    logra=None,
    model=None,
    provenance=None,
    unchecked: bool = False,
    allow_incomplete: bool = False,
):
    """Influence scores of every training row on every query: ``g_qᵀ H⁻¹ g_z`` (positive: z is a proponent).

    Args:
      queries: ``[Q, D]`` query gradients (numpy or jax).
      train: ``[N, D]`` array, or a store with ``__len__``, ``.dim``, ``.read(start, stop)``.
      precond: ``None`` (identity), a pytree with ``.apply`` (e.g. :class:`jaxval.Preconditioner`: compiled
        kernels are reused across calls), or any object with ``.apply(g [B, D]) -> H⁻¹ g``.
      mode: ``"dot" | "cosine" | "relative" | "l2"`` (see :mod:`jaxval._src.scoring` for the formulas).
      block_rows: training rows per streamed block (default: ~16 MiB of float32 per block, clipped to
        [256, 65536] rows, rounded to whole ``train.chunk_rows`` when the store has them, and to N;
        always rounded up to a multiple of the mesh size).
      self_influence: optional precomputed ``[N]`` train self-influence ``g_zᵀ H⁻¹ g_z`` (for
        ``cosine``/``relative``/``l2``; with ``groups``, a dict ``{name: [N]}``); skips computing it.
        Without it, it is computed in the same pass and, for a jax array or a complete GradientStore and
        a pytree (or no) preconditioner, kept in memory for later calls over the same rows.
      groups: optional ``{name: slice | index array | bool mask over D}``; returns a dict of ``[Q, N]``.
      mesh: optional ``jax.sharding.Mesh``; block rows are sharded over it, queries replicated.  Under
        several processes (``jax.distributed``) each process scores a contiguous range of rows (whole
        chunks of a store) on its own devices of ``mesh`` and the result is gathered on every process.
      precision: ``jax.lax.Precision`` for the GEMMs (default ``"highest"``: true float32 also on
        accelerators whose default float32 matmul is TF32/bf16; ``"default"`` is faster there).
      prefetch: ``None`` (default): blocks are read in the calling thread and the reads overlap the
        previous block's GEMM through jax's asynchronous dispatch (a store's own ``iter_blocks``
        read-ahead is used when it has one); ``k > 0``: a background thread reads ``k`` blocks ahead
        (for slow, latency-bound stores); ``0``: plain ``store.read`` in the calling thread.
      progress: show a tqdm bar (default: when there are more than 8 blocks).
      logra, model, provenance: where bare query gradients come from (``logra.grads(model, ...)``, or a
        :class:`jaxval.Provenance`); not needed for what ``LoGra.grads`` returns (a ``ProjectedGrads``).
        The queries', the training rows' (a store's manifest) and the preconditioner's provenance must
        agree, else :class:`jaxval.ProvenanceError`; a bare array beside inputs that record provenance is
        refused too.
      unchecked: skip the provenance check (explicit opt-out, e.g. for hand-made arrays).
      allow_incomplete: score a store with rows not logged yet (they read as zeros); default: refused
        (:class:`jaxval.IncompleteStoreError`).

    Returns:
      ``np.ndarray`` float32 ``[Q, N]`` (or ``{group name: [Q, N]}`` with ``groups``), on every process.
    """
    _check_mode(mode)
    queries, train = _checked_inputs(queries, train, precond, logra=logra, model=model, provenance=provenance,
                                     unchecked=unchecked, allow_incomplete=allow_incomplete, what="influence")
    src, local_mesh = _local_rows(train, mesh)
    if src.total == 0:
        raise ValueError("train has no rows")
    if src.n == 0:  # more processes than row ranges: this process contributes nothing
        names, sels = normalize_groups(groups, src.dim)
        nq = int(_check_queries(queries, src.dim).shape[0])
        outs = [np.zeros((nq, 0), np.float32) for _ in sels]
    else:
        plan = _Plan(queries, src, local_mesh, precond, mode, block_rows, self_influence, groups, precision)
        names, outs = plan.names, _influence_local(plan, prefetch, progress)
    outs = [_gather(o, axis=1) for o in outs]
    return outs[0] if names is None else dict(zip(names, outs))


def _influence_local(plan: _Plan, prefetch, progress) -> list[np.ndarray]:
    kw = plan.score_kw
    # the preconditioner is applied outside this kernel (queries once, rows in the self-influence kernel)
    score = cached_kernel(("influence",) + plan.key, None,
                          lambda: lambda qts, qself, z, zself: block_scores(qts, qself, z, zself, **kw))
    outs = [np.empty((plan.nq, plan.n), dtype=np.float32) for _ in plan.sels]
    bar = progress_bar(plan.n_blocks, progress, "influence")

    def dispatch(start, stop, block, ex):
        zself = plan.z_self(block, ex)
        res = score(plan.qts, plan.qself, block, zself)  # async dispatch
        plan.keep(start, stop, zself)
        return res

    def collect(start, stop, res):
        for o, r in zip(outs, res):
            o[:, start:stop] = np.asarray(r)[:, : stop - start]

    _pipelined(plan.blocks(prefetch), dispatch, collect, bar)
    plan.finish()
    return outs


def _pipelined(blocks, dispatch, collect, bar) -> None:
    """``dispatch`` each block (asynchronously); ``collect`` a block's result only once the next block has
    been dispatched, so the host copy of one block overlaps the next block's GEMM."""
    pending = None
    try:
        for start, stop, block, ex in blocks:
            res = dispatch(start, stop, block, ex)
            if pending is not None:
                collect(*pending)
                if bar is not None:
                    bar.update(1)
            pending = (start, stop, res)
        if pending is not None:
            collect(*pending)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def top_k(
    queries,
    train,
    k: int,
    precond=None,
    mode: str = "dot",
    largest: bool = True,
    block_rows: int | None = None,
    self_influence=None,
    *,
    logra=None,
    model=None,
    provenance=None,
    unchecked: bool = False,
    allow_incomplete: bool = False,
    mesh=None,
    precision="highest",
    prefetch: int | None = None,
    progress: bool | None = None,
):
    """The ``k`` highest (``largest=True``: proponents) or lowest (opponents) scoring training rows per query.

    Streams ``train`` once; memory is ``O(Q · (k + block_rows))``, never ``O(Q · N)``.  Each block's
    scores are reduced to their own top-k and merged with the running top-k (``jax.lax.top_k`` on the
    concatenation, jit-compiled).  Scores are as in :func:`influence` (same ``mode``/``precond``/``mesh``;
    under several processes each process keeps the top-k of its rows and the ``P·k`` candidates are merged
    on every process).

    Ties: among equal scores the lower training index comes first (same order as a stable sort of
    ``-scores`` for ``largest=True`` and of ``scores`` for ``largest=False``; ``-0.0 == 0.0``).  A NaN
    score (from a NaN gradient) ranks last and is reported as ``-inf`` (``+inf`` for ``largest=False``).

    ``logra`` / ``model`` / ``provenance`` / ``unchecked`` / ``allow_incomplete``: as in :func:`influence`.

    Returns:
      ``(values [Q, k] float32, indices [Q, k] int64)``, sorted best first.
    """
    _check_mode(mode)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise ConfigError(f"k must be a positive integer (the number of rows kept per query), got {k}")
    queries, train = _checked_inputs(queries, train, precond, logra=logra, model=model, provenance=provenance,
                                     unchecked=unchecked, allow_incomplete=allow_incomplete, what="top_k")
    src, local_mesh = _local_rows(train, mesh)
    if not 1 <= k <= src.total:
        raise ValueError(f"k must be between 1 and the number of training rows ({src.total}); got {k}")
    kk = min(k, src.n)
    if kk > 0:
        plan = _Plan(queries, src, local_mesh, precond, mode, block_rows, self_influence, None, precision,
                     min_rows=kk)
        values, idx = _top_k_local(plan, kk, bool(largest), prefetch, progress)
        idx = idx + src.lo
    else:
        nq = int(_check_queries(queries, src.dim).shape[0])
        values, idx = np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
    if _process_count() == 1:
        return values, idx
    values, idx = _gather(values, axis=1), _gather(idx, axis=1)
    order = np.lexsort((idx, -values if largest else values), axis=-1)[:, :k]  # ties: lower index first
    return np.take_along_axis(values, order, 1), np.take_along_axis(idx, order, 1)


def _top_k_local(plan: _Plan, k: int, largest: bool, prefetch, progress):
    kw = plan.score_kw

    def build_first():
        def first(qts, qself, z, zself, n_valid, start):
            (s,) = block_scores(qts, qself, z, zself, **kw)
            return topk_key(s, n_valid, start, k, largest)

        return first

    def build_merge():
        def merge(vals, idx, qts, qself, z, zself, n_valid, start):
            (s,) = block_scores(qts, qself, z, zself, **kw)
            bv, bi = topk_key(s, n_valid, start, k, largest)
            # running entries (all lower indices) first: top_k keeps the lower position among equal
            # values, so ties resolve to the lower training index
            v, pos = jax.lax.top_k(jax.numpy.concatenate([vals, bv], axis=1), k)
            return v, jax.numpy.take_along_axis(jax.numpy.concatenate([idx, bi], axis=1), pos, axis=1)

        return merge

    first = cached_kernel(("topk_first", k, largest) + plan.key, None, build_first)
    merge = cached_kernel(("topk_merge", k, largest) + plan.key, None, build_merge)
    bar = progress_bar(plan.n_blocks, progress, "top_k")
    vals = idx = None
    inflight: deque = deque()
    try:
        for start, stop, block, ex in plan.blocks(prefetch):
            zself = plan.z_self(block, ex)
            n_valid = np.int32(stop - start)
            st = np.int32(start)
            if vals is None:
                vals, idx = first(plan.qts, plan.qself, block, zself, n_valid, st)
            else:
                vals, idx = merge(vals, idx, plan.qts, plan.qself, block, zself, n_valid, st)
            plan.keep(start, stop, zself)
            # back-pressure: wait for the previous block's merge once this one is queued, so at most
            # two blocks are in flight and memory stays O(Q · (k + block_rows))
            inflight.append(vals)
            if len(inflight) > 1:
                inflight.popleft().block_until_ready()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    plan.finish()
    values = np.asarray(vals, dtype=np.float32)
    if not largest:
        values = -values
    return values, np.asarray(idx).astype(np.int64)


def self_influence(
    train,
    precond=None,
    block_rows: int | None = None,
    *,
    groups: Mapping[str, Any] | None = None,
    mesh=None,
    prefetch: int | None = None,
    progress: bool | None = None,
    unchecked: bool = False,
    allow_incomplete: bool = False,
):
    """Self-influence ``g_zᵀ H⁻¹ g_z`` of every training row, ``np.ndarray`` float32 ``[N]``.

    With ``groups``, ``{name: [N]}`` of the group-restricted ``g_z[cols] · (H⁻¹ g_z)[cols]`` (the form
    :func:`influence` accepts as ``self_influence`` together with the same ``groups``).  Shares
    :func:`influence`'s in-memory cache (jax-array or complete-GradientStore rows, pytree or no
    preconditioner) and its handling of ``mesh`` and of several processes. The rows' and the
    preconditioner's provenance must agree (``unchecked=True``: no check); an incomplete store is refused
    unless ``allow_incomplete=True``.
    """
    _, train = _checked_inputs(None, train, precond, unchecked=unchecked, allow_incomplete=allow_incomplete,
                               what="self_influence")
    src, local_mesh = _local_rows(train, mesh)
    names, sels = normalize_groups(groups, src.dim)
    if src.n == 0:
        outs = [np.zeros((0,), np.float32) for _ in sels]
    else:
        outs = _self_influence_local(src, local_mesh, precond, block_rows, sels, prefetch, progress)
    outs = [_gather(o, axis=0) for o in outs]
    return outs[0] if names is None else dict(zip(names, outs))


def _self_influence_local(src, mesh, precond, block_rows, sels, prefetch, progress) -> list[np.ndarray]:
    placer = Placer(mesh)
    sk = selectors_key(sels)
    pre = PreconditionerSpec(precond, src.dim)
    ident = memo.identify(src, pre, sk)
    cached = memo.lookup(ident)
    if cached is not None:
        return [np.array(c) for c in cached]  # writable copies: the cache stays intact
    br = resolve_block_rows(block_rows, src.n, src.dim, placer.mesh, 1, src.chunk_rows)
    kern = self_kernel(pre, sels, sk)
    if pre.kind == "eager":
        fn = lambda z: kern(None, z, placer.block(pre.eager(as_f32(z))))  # noqa: E731
    else:
        fn = lambda z: kern(pre.arg, z, None)  # noqa: E731
    outs = [np.empty((src.n,), np.float32) for _ in sels]
    bar = progress_bar(-(-src.n // br), progress, "self_influence")

    def collect(start, stop, res):
        for o, r in zip(outs, res):
            o[start:stop] = np.asarray(r)[: stop - start]

    _pipelined(device_blocks(src, br, placer, (), prefetch), lambda s, e, z, ex: fn(z), collect, bar)
    memo.remember(ident, outs)
    return outs
