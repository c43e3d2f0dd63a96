"""Scoring engine: influence scores, streaming top-k and self-influence over a gradient log.

Modules: ``sources`` (training rows, block sizes, devices, the streamed block iteration), ``groups``
(column groups), ``kernels`` (the jit-compiled block kernels, how a preconditioner enters them, their one
cache), ``memo`` (self-influences kept in memory between calls), ``engine`` (:func:`influence`,
:func:`top_k`, :func:`self_influence`), ``cache`` (:func:`cached_self_influence`, on disk).

Conventions
-----------
``g_q`` is a query gradient, ``g_z`` a training gradient (rows of ``[Q, D]`` / ``[N, D]`` arrays, or
rows of a gradient store), ``H`` the preconditioner's (damped) curvature matrix.  The basic score is::

    score(q, z) = g_qᵀ H⁻¹ g_z

and a **positive score means training on z lowers q's loss** (z is a proponent of q).

Inputs
------
``train`` is either an array ``[N, D]`` (numpy, numpy memmap or jax) or any *store-like* object with
``__len__`` (N), ``.dim`` (D) and ``.read(start, stop) -> [stop - start, D]`` (e.g.
:class:`jaxval.store.GradientStore`).  It is streamed through exactly once, in row blocks of
``block_rows`` rows, by jit-compiled float32 GEMMs.  The GEMMs are dispatched asynchronously, so the
next block is read (by the calling thread, or by the store's own ``iter_blocks`` read-ahead when it has
one) while the current block's product runs, and the host copy of a block's scores is taken only after
the next block's product has been dispatched.  ``prefetch=k`` adds a background thread reading ``k``
blocks ahead (for latency-bound stores; on a 2-core CPU machine it measured no faster, and its
cross-thread allocations made glibc's memory arenas grow).

``precond`` is ``None`` (identity, ``H = I``) or any object with ``.apply(g) -> H⁻¹ g`` mapping a
``[B, D]`` batch to ``[B, D]``.  A registered pytree whose leaves are arrays (such as
:class:`jaxval.Preconditioner`) is passed to the compiled kernels as an argument, so repeated calls with
queries of the same shape compile nothing; any other object's ``apply`` is traced into the call's kernels
(compiled per call), and an ``apply`` that cannot be traced (e.g. one calling numpy) is called eagerly once
per block.  Queries are preconditioned once (``q̃ = H⁻¹ g_q``); training rows are preconditioned only when
a mode needs their self-influence ``g_zᵀ H⁻¹ g_z``.

Modes (all in the ``H⁻¹`` metric)
---------------------------------
- ``"dot"``:      ``g_qᵀ H⁻¹ g_z``
- ``"cosine"``:   ``g_qᵀ H⁻¹ g_z / ( sqrt(g_qᵀ H⁻¹ g_q) · sqrt(g_zᵀ H⁻¹ g_z) )`` (both sides normalised;
  in ``[-1, 1]`` for an SPD ``H``)
- ``"relative"``: ``g_qᵀ H⁻¹ g_z / sqrt(g_zᵀ H⁻¹ g_z)`` (RelatIF, Barshan et al. 2020; only the training
  side is normalised, so the ranking of training points for a fixed query equals ``cosine``'s)
- ``"l2"``:       ``g_qᵀ H⁻¹ g_z − ½ g_zᵀ H⁻¹ g_z``

A zero (or, for a non-SPD ``apply``, non-positive) norm in a denominator gives a score of 0 for that
pair instead of ``inf``/``nan``.

Self-influence
--------------
The training self-influence ``s_z = g_zᵀ H⁻¹ g_z`` that ``cosine``/``relative``/``l2`` need is computed
in the same streamed pass (``apply`` on the block, then a rowwise dot), unless the caller passes a
precomputed ``self_influence=[N]`` array (see :func:`self_influence` and
:func:`cached_self_influence`, which stores it beside a store as ``self_influence_<key>.npy``).  When the
rows and the preconditioner are immutable and identified exactly (a jax array or a complete
GradientStore; ``None`` or a pytree preconditioner of jax arrays and numpy scalars), the values computed
are kept in memory and reused by later calls (:mod:`jaxval._src.scoring.memo`): never for numpy rows,
other stores or other preconditioner objects, and never across another preconditioner, damping, rows or
groups.

Layer groups
------------
``groups={name: slice | index array | boolean mask over D}`` returns ``{name: [Q, N]}`` instead of one
matrix: the score restricted to the group's columns, computed as ``(H⁻¹ g_q)[cols] · g_z[cols]`` (and,
for the normalised modes, with the group-restricted self-influences ``g[cols] · (H⁻¹ g)[cols]``).  For a
preconditioner that is block-diagonal per layer (identity, raw per-layer, K-FAC, EK-FAC) and groups that
are unions of whole layer blocks, this is *exactly* the influence computed with only those layers' gradients
and curvature blocks, and in ``dot`` mode the groups of a partition of ``D`` sum to the total score.
For groups that cut through a layer block (or a non-block-diagonal ``H``), the group score is only the
partial sum of the full score's terms over those columns.

Sharding
--------
``mesh=jax.sharding.Mesh(...)``: every training block's rows are sharded over all the mesh's axes
(``NamedSharding(mesh, PartitionSpec(mesh.axis_names, None))``; ``block_rows`` is rounded up to a
multiple of ``mesh.size``), queries are replicated; results equal the single-device ones.  A mesh with
Explicit axes (``jax.make_mesh``'s default) is used with the same devices and axis names as Auto axes, so
``precond.apply`` needs no ``out_sharding`` annotations.

Several processes (``jax.distributed``): the same call on every process; each process scores a contiguous
range of the training rows (whole storage chunks for a store: :func:`jaxval.distributed.owned_range`) on
its own devices (those of ``mesh`` on this process, or its default device), and the results are gathered
on every process (``[Q, N]`` columns in row order; top-k candidates merged with the same tie rule).  Every
process must pass the same queries and the same training rows.

Top-k ties
----------
:func:`top_k` keeps, among equal scores, the **lower training index first** (the order of a stable sort
of ``-scores`` for ``largest=True``, of ``scores`` for ``largest=False``).  Memory is
``O(Q · (k + block_rows))``: the ``[Q, N]`` matrix is never formed.
"""

from jaxval._src.scoring.cache import cached_self_influence
from jaxval._src.scoring.engine import influence, self_influence, top_k
from jaxval._src.scoring.kernels import MODES, PreconditionerLike
from jaxval._src.scoring.sources import StoreLike

__all__ = ["MODES", "StoreLike", "PreconditionerLike", "influence", "top_k", "self_influence",
           "cached_self_influence"]
