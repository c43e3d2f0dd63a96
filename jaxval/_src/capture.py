"""Layers found in the traced computation: the jaxpr of ``loss_fn(params, batch)``.

``analyze`` walks two traces of the loss side by side, one at the batch size ``B`` and one at a probe size
``B' != B`` (same program, other shapes). An axis whose size differs between the two is the example axis;
this is how each product's example axis is found, whatever the layout (``[B, T, C]``, time-major
``[T, B, C]``, a ``jax.vmap`` over single examples inside the loss, equinox's ``W @ x`` under vmap).

A *site* is one product of a parameter leaf with per-example data:

- ``dot_general`` with one operand a view of a parameter leaf (a leaf seen through convert / transpose /
  reshape that merges axes or adds size-1 axes, and through the slicing of ``lax.scan`` over stacked
  parameters); the leaf axes contracted with the data are the layer's input side, the others its output
  side;
- ``conv_general_dilated`` with the kernel a parameter view;
- ``gather`` of rows of a 2-D parameter table (an embedding); the table may also be used in a product
  (a tied head): both sites belong to one layer, the product's roles flipped.

A parameter view added to a site's output (through single-use layout ops) is the layer's bias. Through
``jit``, ``remat``, ``custom_jvp`` / ``custom_vjp`` (their primal is differentiated when a site is inside)
and ``lax.scan``: a leaf sliced by a scan gives one layer per slice (``name/i``); a leaf closed over by a
scan (a recurrent weight) gives one layer whose calls are the iterations.

Refused, with the operation and its source line: a reduction or contraction over the example axis
(examples interact), random numbers (dropout in training mode), a tracked leaf used by any other
operation (its gradient would be incomplete), products with batch dimensions on the parameter side.

``run`` evaluates the trace again with a zero perturbation added to every site's output and each site's
input projected on the fly; the gradient of ``Σ_b loss_b`` w.r.t. the perturbations gives the output
cotangents (see ``jaxval._src.logra``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxval._src import precision

_HI = precision.MATMUL

_JIT = {"jit", "pjit", "closed_call", "core_call"}
_REMAT = {"checkpoint", "remat2", "remat"}
_CUSTOM = {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}
_PASS = {"copy", "copy_p", "sharding_constraint", "optimization_barrier", "reduce_precision", "pvary", "pcast",
         "mesh_cast", "reshard"}
_RNG = {"random_bits", "random_seed", "random_fold_in", "random_split", "threefry2x32", "random_wrap"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax",
           "argmin", "reduce_precision_"}
_CUM = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
STRIP = ("kernel", "embedding", "weight")


class CaptureError(ValueError):
    """The traced loss cannot be captured (examples interact, unsupported use of a parameter, ...)."""


def where(eqn) -> str:
    try:
        from jax.extend import source_info_util  # only for the message

        return source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001
        return "?"


# ----------------------------------------------------------------------------- records

@dataclasses.dataclass(frozen=True)
class View:
    """A value that is parameter leaf ``leaf`` re-laid out: view axis i holds the leaf axes ``groups[i]``
    (merged, in leaf order; ``()`` = an inserted axis of size 1, or a broadcast one when ``bcast``).
    ``stack``: ``(scan eqn id, leaf axis)`` sliced away by enclosing scans, outermost first."""
    leaf: int
    groups: tuple
    stack: tuple = ()
    bcast: bool = False


@dataclasses.dataclass
class Site:
    id: int
    kind: str                 # "dot" | "conv" | "gather"
    leaf: int
    levels: tuple             # per enclosing scan (outermost first): leaf axis it slices, or None
    x_pos: int                # operand index of the data
    w_pos: int                # operand index of the parameter view
    groups: tuple             # the parameter view's groups
    contracted: tuple         # leaf axes contracted with the data (sorted)
    free: tuple               # the other leaf axes (sorted)
    x_feat: tuple             # data axes paired with the parameter (in P order), see _site_layout
    x_ex: int                 # example axis of the data
    y_ex: int                 # example axis of the output
    y_feat: tuple             # output axes from the parameter side (in P order)
    x_perm_groups: tuple      # leaf-axis order of the flattened data features
    y_perm_groups: tuple      # leaf-axis order of the flattened output features
    eqn: Any = None
    flipped: bool = False     # the data meets the layer's output side (a tied head)
    bias: int | None = None   # bias leaf
    bias_perm: tuple = ()     # bias leaf axes in the order of the layer's output axes
    bias_stack: tuple = ()
    vma: tuple = ()
    stack: tuple = ()         # (scan eqn id, leaf axis) of the scans slicing the leaf, outermost first

    @property
    def slicing(self) -> set:
        return {lv for lv, _ in self.stack}

    @property
    def stack_axes(self) -> tuple:
        return tuple(a for _, a in self.stack)


@dataclasses.dataclass
class LeafUse:
    sites: list = dataclasses.field(default_factory=list)
    other: list = dataclasses.field(default_factory=list)    # (primitive, where)
    dots: int = 0                                            # untracked products (castable)
    bias_of: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Plan:
    sites: dict                 # id(eqn) -> Site
    inside: set                 # id(eqn) of higher-order eqns holding sites
    uses: dict                  # leaf -> LeafUse
    leaf_shapes: list
    leaf_dtypes: list
    batch: int
    level_len: dict = dataclasses.field(default_factory=dict)   # scan eqn id -> length


# ----------------------------------------------------------------------------- helpers

def _inner(eqn):
    """``(jaxpr, consts)`` of a call-like eqn (jit, remat, custom_jvp/vjp), else None."""
    name = eqn.primitive.name
    p = eqn.params
    j = p.get("jaxpr") if name in _JIT | _REMAT else p.get("call_jaxpr", p.get("fun_jaxpr")) \
        if name in _CUSTOM else None
    if j is None:
        return None
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, list(j.consts)
    return j, []


def aval_vma(aval) -> tuple:
    """The shard_map mesh axes an abstract value varies along (``()`` outside shard_map)."""
    vma = getattr(aval, "vma", None)                                              # jax >= 0.11
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ()) or ()  # jax 0.10
    return tuple(sorted(vma))


def _live(jaxpr) -> set:
    """ids of the eqns whose results reach the outputs (or that have effects)."""
    live = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
    keep = set()
    for e in reversed(jaxpr.eqns):
        if e.effects or any(o in live for o in e.outvars if not isinstance(o, jcore.DropVar)):
            keep.add(id(e))
            live.update(v for v in e.invars if isinstance(v, jcore.Var))
    return keep


def _shape(v):
    return tuple(getattr(v.aval, "shape", ()))


def _changing(a, b) -> list[int]:
    sa, sb = _shape(a), _shape(b)
    if len(sa) != len(sb):
        return [-1]
    return [i for i, (x, y) in enumerate(zip(sa, sb)) if x != y]


def _reshape_groups(view: View, old: tuple, new: tuple, sizes) -> View | None:
    """Groups after a reshape that only merges consecutive axes and adds / drops size-1 axes."""
    src = [(g, s) for g, s in zip(view.groups, old) if s != 1 or g]
    src = [(g, s) for g, s in src if s != 1]
    out, i = [], 0
    for s in new:
        if s == 1:
            out.append(())
            continue
        acc, grp = 1, ()
        while acc < s and i < len(src):
            acc *= src[i][1]
            grp += src[i][0]
            i += 1
        if acc != s or not grp:
            return None
        if list(grp) != sorted(grp) and len(grp) > 1:
            # merged axes must be consecutive in leaf order to flatten like the leaf
            return None
        out.append(grp)
    if i != len(src):
        return None
    return dataclasses.replace(view, groups=tuple(out))


# ----------------------------------------------------------------------------- analysis

class _Analysis:
    def __init__(self, n_leaves: int, batch: int, probe: int):
        self.plan = Plan({}, set(), {i: LeafUse() for i in range(n_leaves)}, [], [], batch)
        self.b, self.bp = batch, probe

    # -- the example axis of a var (pair of vars from the two traces)
    def ex_axes(self, a, b):
        ch = _changing(a, b)
        if ch == [-1]:
            raise CaptureError("loss_fn traces to differently shaped programs for different batch sizes")
        return ch

    def is_ex(self, a, b, axis):
        return _shape(a)[axis] == self.b and _shape(b)[axis] == self.bp

    def other(self, view: View, eqn):
        self.plan.uses[view.leaf].other.append((eqn.primitive.name, where(eqn)))

    def walk(self, ja, jb, in_views, levels=()):
        """Walk jaxpr ``ja`` (batch B) and ``jb`` (probe) in lockstep. ``in_views``: view per invar (or None).
        Returns (views of outvars, bool: a site lies inside)."""
        env: dict = {}
        for v, w in zip(ja.invars, in_views):
            if w is not None:
                env[v] = w
        uses: dict = {}
        for e in ja.eqns:
            for v in e.invars:
                if isinstance(v, jcore.Var):
                    uses[v] = uses.get(v, 0) + 1
        for v in ja.outvars:
            if isinstance(v, jcore.Var):
                uses[v] = uses.get(v, 0) + 2
        chains: dict = {}   # var -> (site, {var axis: leaf-axis group of the site's free side})
        has_site = False
        if len(ja.eqns) != len(jb.eqns):
            raise CaptureError("loss_fn traces to different programs for different batch sizes (the model "
                               "branches on the batch size); LoGra needs one program for every batch size")
        keep = _live(ja)
        for ea, eb in zip(ja.eqns, jb.eqns):
            if id(ea) not in keep:      # dead code (e.g. RNG streams a bridge draws but never uses)
                continue
            if ea.primitive.name != eb.primitive.name:
                raise CaptureError("loss_fn traces to different programs for different batch sizes "
                                   f"({ea.primitive.name} vs {eb.primitive.name} at {where(ea)})")
            name = ea.primitive.name
            views = [env.get(v) if isinstance(v, jcore.Var) else None for v in ea.invars]
            self._check_interaction(ea, eb)
            if name in _RNG:
                raise CaptureError(
                    f"loss_fn draws random numbers ({name} at {where(ea)}), e.g. dropout in training mode: "
                    "per-example gradients must be deterministic. Call model.eval() (nnx), pass "
                    "deterministic=True / train=False, or remove the randomness")
            if not any(views) and name not in _JIT | _REMAT | _CUSTOM | {"scan"}:
                self._chain(ea, eb, chains, uses, env, views)
                continue
            if name in _JIT | _REMAT | _CUSTOM:
                ia, ib = _inner(ea), _inner(eb)
                outs, inside = self.walk(ia[0], ib[0], self._call_views(ia, views), levels)
                if inside:
                    self.plan.inside.add(id(ea))
                    has_site = True
                for v, w in zip(ea.outvars, outs):
                    if w is not None:
                        env[v] = w
                continue
            if name == "scan":
                has_site |= self._scan(ea, eb, views, env, levels)
                continue
            if name == "convert_element_type" or name in _PASS:
                if views[0] is not None and len(ea.outvars) == 1:
                    env[ea.outvars[0]] = views[0]
                for v in views[1:]:
                    if v is not None:
                        self.other(v, ea)
                continue
            if name == "transpose" and views[0] is not None:
                perm = ea.params["permutation"]
                env[ea.outvars[0]] = dataclasses.replace(views[0], groups=tuple(views[0].groups[p] for p in perm))
                continue
            if name in ("reshape", "squeeze", "expand_dims") and views[0] is not None:
                nv = _reshape_groups(views[0], _shape(ea.invars[0]), _shape(ea.outvars[0]), None)
                if nv is None:
                    self.other(views[0], ea)
                else:
                    env[ea.outvars[0]] = nv
                continue
            if name == "broadcast_in_dim" and views[0] is not None:
                v0, dims, out = views[0], ea.params["broadcast_dimensions"], _shape(ea.outvars[0])
                groups, bc = [()] * len(out), v0.bcast
                for i, d in enumerate(dims):
                    groups[d] = v0.groups[i]
                    if _shape(ea.invars[0])[i] != out[d]:
                        bc = True
                bc = bc or any(out[d] != 1 for d in range(len(out)) if d not in dims)
                env[ea.outvars[0]] = dataclasses.replace(v0, groups=tuple(groups), bcast=bc)
                continue
            if name == "dot_general" and sum(v is not None for v in views[:2]) == 1:
                has_site |= self._dot(ea, eb, views, levels, chains)
                continue
            if name == "conv_general_dilated" and views[1] is not None and views[0] is None:
                has_site |= self._conv(ea, eb, views, levels, chains)
                continue
            if name == "gather" and views[0] is not None and views[1] is None:
                has_site |= self._gather(ea, eb, views, levels, chains)
                continue
            if name == "add" and self._bias(ea, views, chains, uses):
                continue
            for v in views:
                if v is not None:
                    self.other(v, ea)
            self._chain(ea, eb, chains, uses, env, views)
        outs = [env.get(v) if isinstance(v, jcore.Var) else None for v in ja.outvars]
        return outs, has_site

    def _call_views(self, ia, views):
        jaxpr, consts = ia
        n = len(jaxpr.invars) - len(views)
        return [None] * n + list(views)

    def _check_interaction(self, ea, eb):
        name = ea.primitive.name
        if name in _REDUCE or name in _CUM:
            axes = ea.params.get("axes", ea.params.get("axis", ()))
            axes = (axes,) if isinstance(axes, int) else tuple(axes)
            for a, b in zip(ea.invars, eb.invars):
                if isinstance(a, jcore.Var) and any(self.is_ex(a, b, ax) for ax in axes if ax < len(_shape(a))):
                    raise CaptureError(
                        f"examples interact: {name} over the example axis at {where(ea)} (a mean or sum over "
                        "the batch, batch statistics such as BatchNorm in training mode, or the example axis "
                        "moved inside the model). Per-example gradients are not defined; compute each "
                        "example's loss from that example alone (model.eval() for BatchNorm)")
        if name == "dot_general":
            (lc, rc), _ = ea.params["dimension_numbers"]
            for (a, b), cs in zip(zip(ea.invars, eb.invars), (lc, rc)):
                if isinstance(a, jcore.Var) and any(self.is_ex(a, b, c) for c in cs):
                    raise CaptureError(
                        f"examples interact: a product contracts the example axis at {where(ea)} (attention "
                        "or a mixing across the batch). Per-example gradients are not defined")

    # -- chains from site outputs to a bias add (single-use layout ops)
    def _chain(self, ea, eb, chains, uses, env, views):
        name = ea.primitive.name
        if not ea.invars or not isinstance(ea.invars[0], jcore.Var) or ea.invars[0] not in chains:
            return
        src = ea.invars[0]
        site, amap = chains[src]
        if uses.get(src, 0) != 1 or len(ea.outvars) != 1:
            return
        out = ea.outvars[0]
        if name == "convert_element_type" or name in _PASS:
            chains[out] = (site, amap)
        elif name == "transpose":
            perm = ea.params["permutation"]
            chains[out] = (site, {i: amap[p] for i, p in enumerate(perm) if p in amap})

    def _bias(self, ea, views, chains, uses) -> bool:
        ins = ea.invars
        for yi, bi in ((0, 1), (1, 0)):
            y, bview = ins[yi], views[bi]
            if bview is None or not isinstance(y, jcore.Var) or y not in chains or views[yi] is not None:
                continue
            site, amap = chains[y]
            if uses.get(y, 0) != 1 or site.bias is not None or site.kind == "gather" or site.flipped:
                continue
            if bview.bcast or tuple(lv for lv, _ in bview.stack) != tuple(lv for lv, _ in site.stack):
                continue
            bshape, yshape = _shape(ins[bi]), _shape(y)
            if len(bshape) != len(yshape):
                continue
            pairs, ok = [], True
            for ax, g in enumerate(bview.groups):
                if g:
                    if ax not in amap or len(g) != 1 or len(amap[ax]) != 1 or bshape[ax] != yshape[ax]:
                        ok = False
                        break
                    pairs.append((amap[ax][0], g[0]))
                elif bshape[ax] != 1:
                    ok = False
            wshape = self.plan.leaf_shapes[site.leaf]   # size-1 output axes lose their place in a reshape
            if not ok or sorted(p[0] for p in pairs if wshape[p[0]] != 1) != [a for a in site.free if wshape[a] != 1]:
                continue
            leaf_axes = {a for g in bview.groups for a in g}
            nd = len(self.plan.leaf_shapes[bview.leaf])
            bstack = tuple(a for _, a in bview.stack)
            rest = [a for a in range(nd) if a not in leaf_axes and a not in bstack]
            if any(self.plan.leaf_shapes[bview.leaf][a] != 1 for a in rest):
                continue
            site.bias = bview.leaf
            site.bias_perm = tuple(g for _, g in sorted(pairs)) + tuple(rest)
            site.bias_stack = bstack
            self.plan.uses[bview.leaf].bias_of.append(site)
            return True
        return False

    # -- sites
    def _new_site(self, ea, kind, leaf, levels, **kw):
        # a site's id is its discovery order (dicts keyed by it flatten in the same order in every process)
        site = Site(id=len(self.plan.sites), kind=kind, leaf=leaf, levels=levels, eqn=ea, **kw)
        site.vma = aval_vma(ea.outvars[0].aval)
        self.plan.sites[id(ea)] = site
        self.plan.uses[leaf].sites.append(site)
        return site

    def _data_ex(self, ea, eb, pos, what):
        ch = self.ex_axes(ea.invars[pos], eb.invars[pos])
        ok = [c for c in ch if self.is_ex(ea.invars[pos], eb.invars[pos], c)]
        if len(ch) == 1 and len(ok) == 1:
            return ok[0]
        if not ch:
            raise _NoExample(what)
        raise CaptureError(
            f"{what} at {where(ea)}: its input {_shape(ea.invars[pos])} does not keep the example axis as an "
            "axis of its own (examples folded into another axis, e.g. reshape(B*T, C)); keep the example "
            "axis separate up to the product")

    def _dot(self, ea, eb, views, levels, chains) -> bool:
        w_pos = 0 if views[0] is not None else 1
        x_pos = 1 - w_pos
        view = views[w_pos]
        (lc, rc), (lb, rb) = ea.params["dimension_numbers"]
        wc, xc = (lc, rc) if w_pos == 0 else (rc, lc)
        wb, xb = (lb, rb) if w_pos == 0 else (rb, lb)
        if wb or xb or view.bcast:
            self.other(view, ea)
            return False
        try:
            x_ex = self._data_ex(ea, eb, x_pos, "a product with a parameter")
        except _NoExample:
            self.other(view, ea)
            return False
        if any(len(g) == 0 for i, g in enumerate(view.groups) if _shape(ea.invars[w_pos])[i] != 1):
            self.other(view, ea)
            return False
        contracted = tuple(sorted(a for d in wc for a in view.groups[d]))
        free_dims = [d for d in range(len(view.groups)) if d not in wc]
        free = tuple(sorted(a for d in free_dims for a in view.groups[d]))
        nx = len(_shape(ea.invars[x_pos]))
        x_free = [d for d in range(nx) if d not in xc]
        n_wfree = len(free_dims)
        y_wfree = list(range(n_wfree)) if w_pos == 0 else list(range(len(x_free), len(x_free) + n_wfree))
        y_xfree = list(range(n_wfree, n_wfree + len(x_free))) if w_pos == 0 else list(range(len(x_free)))
        y_ex = y_xfree[x_free.index(x_ex)]
        site = self._new_site(
            ea, "dot", view.leaf, levels + (), x_pos=x_pos, w_pos=w_pos, groups=view.groups,
            contracted=contracted, free=free, x_feat=tuple(xc), x_ex=x_ex, y_ex=y_ex, y_feat=tuple(y_wfree),
            x_perm_groups=tuple(a for d in wc for a in view.groups[d]),
            y_perm_groups=tuple(a for d in free_dims for a in view.groups[d]))
        site.stack = view.stack
        chains[ea.outvars[0]] = (site, {y: view.groups[d] for y, d in zip(y_wfree, free_dims)})
        return True

    def _conv(self, ea, eb, views, levels, chains) -> bool:
        view = views[1]
        p = ea.params
        dn = p["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1 or view.bcast or \
                any(len(g) != 1 for g in view.groups):
            self.other(view, ea)
            return False
        try:
            x_ex = self._data_ex(ea, eb, 0, "a convolution with a parameter kernel")
        except _NoExample:
            self.other(view, ea)
            return False
        if x_ex != lhs_spec[0]:
            raise CaptureError(f"convolution at {where(ea)}: the example axis is not the convolution's batch "
                               "axis; keep examples on the batch axis of the convolution")
        out_ax = view.groups[rhs_spec[0]][0]
        in_dims = [d for d in range(len(view.groups)) if d != rhs_spec[0]]
        contracted = tuple(sorted(view.groups[d][0] for d in in_dims))
        site = self._new_site(
            ea, "conv", view.leaf, levels, x_pos=0, w_pos=1, groups=view.groups, contracted=contracted,
            free=(out_ax,), x_feat=(), x_ex=x_ex, y_ex=out_spec[0], y_feat=(out_spec[1],),
            x_perm_groups=(), y_perm_groups=(out_ax,))
        site.stack = view.stack
        chains[ea.outvars[0]] = (site, {out_spec[1]: (out_ax,)})
        return True

    def _gather(self, ea, eb, views, levels, chains) -> bool:
        view = views[0]
        p = ea.params
        dn = p["dimension_numbers"]
        shp = _shape(ea.invars[0])
        out = _shape(ea.outvars[0])
        if len(shp) != 2 or view.bcast or any(len(g) != 1 for g in view.groups) or \
                tuple(dn.collapsed_slice_dims) != tuple(dn.start_index_map) or len(dn.start_index_map) != 1 \
                or getattr(dn, "operand_batching_dims", ()) or tuple(dn.offset_dims) != (len(out) - 1,) \
                or _shape(ea.invars[1])[-1] != 1:
            self.other(view, ea)
            return False
        r = dn.start_index_map[0]
        c = 1 - r
        if tuple(p["slice_sizes"]) != tuple(1 if i == r else shp[c] for i in range(2)):
            self.other(view, ea)
            return False
        ch = self.ex_axes(ea.outvars[0], eb.outvars[0])
        ok = [a for a in ch if self.is_ex(ea.outvars[0], eb.outvars[0], a)]
        if not ch:
            self.other(view, ea)
            return False
        if len(ch) != 1 or len(ok) != 1:
            raise CaptureError(f"embedding lookup at {where(ea)}: the indices {_shape(ea.invars[1])} do not keep "
                               "the example axis as an axis of its own")
        site = self._new_site(
            ea, "gather", view.leaf, levels, x_pos=1, w_pos=0, groups=view.groups,
            contracted=(view.groups[r][0],), free=(view.groups[c][0],), x_feat=(), x_ex=ok[0], y_ex=ok[0],
            y_feat=(len(out) - 1,), x_perm_groups=(view.groups[r][0],), y_perm_groups=(view.groups[c][0],))
        site.stack = view.stack
        return True

    def _scan(self, ea, eb, views, env, levels) -> bool:
        p = ea.params
        nc, ncar = p["num_consts"], p["num_carry"]
        body_a, body_b = p["jaxpr"], eb.params["jaxpr"]
        inner = []
        for i, v in enumerate(views):
            if v is None:
                inner.append(None)
            elif i < nc:
                inner.append(v)
            elif i < nc + ncar:
                self.other(v, ea)
                inner.append(None)
            else:
                if not v.groups or len(v.groups[0]) != 1 or v.bcast:
                    self.other(v, ea)
                    inner.append(None)
                else:
                    inner.append(dataclasses.replace(v, groups=v.groups[1:],
                                                     stack=v.stack + ((id(ea), v.groups[0][0]),)))
        self.plan.level_len[id(ea)] = p["length"]
        outs, inside = self.walk(body_a.jaxpr, body_b.jaxpr, inner, levels + (id(ea),))
        if inside:
            self.plan.inside.add(id(ea))
        return inside


class _NoExample(Exception):
    pass


def analyze(fn, args_a, args_b, n_leaves: int, batch: int, probe: int) -> tuple[Plan, Any]:
    """Trace ``fn(*args)`` at both batch sizes and find the sites. Returns (plan, closed jaxpr at B)."""
    ca = jax.make_jaxpr(fn)(*args_a)
    outs = ca.out_avals
    if len(outs) != 1 or tuple(getattr(outs[0], "shape", ())) != (batch,):
        raise CaptureError(
            f"loss_fn must return per-example losses of shape [B] = [{batch}], got "
            f"{[tuple(getattr(o, 'shape', ())) for o in outs]}; return one loss per example (e.g. the sum of "
            "token losses of each sequence), not their mean or sum")
    cb = jax.make_jaxpr(fn)(*args_b)
    an = _Analysis(n_leaves, batch, probe)
    an.plan.leaf_shapes = [tuple(v.aval.shape) for v in ca.jaxpr.invars[:n_leaves]]
    an.plan.leaf_dtypes = [v.aval.dtype for v in ca.jaxpr.invars[:n_leaves]]
    views = [View(i, tuple((a,) for a in range(len(an.plan.leaf_shapes[i])))) for i in range(n_leaves)]
    views += [None] * (len(ca.jaxpr.invars) - n_leaves)
    an.walk(ca.jaxpr, cb.jaxpr, views)
    outs_a, outs_b = ca.jaxpr.outvars, cb.jaxpr.outvars
    if len(outs_a) == 1 and isinstance(outs_a[0], jcore.Var):
        ch = _changing(outs_a[0], outs_b[0])
        if len(_shape(outs_a[0])) == 1 and ch != [0]:
            raise CaptureError(
                "the losses do not depend on the examples one to one: loss_fn returned a [B] whose entries "
                "do not follow the batch (mixed or reduced over examples)")
    return an.plan, ca


# ----------------------------------------------------------------------------- layers of a plan

@dataclasses.dataclass(frozen=True)
class Group:
    """One parameter leaf's layers: ``stack`` leaf axes (one layer per index), ``in_axes``/``out_axes``."""
    leaf: int
    in_axes: tuple
    out_axes: tuple
    stack: tuple
    kind: str
    bias: int | None
    bias_perm: tuple
    sites: tuple


def groups_of(plan: Plan) -> tuple[list[Group], dict]:
    """Per tracked leaf its Group; and {leaf: reason} for leaves that cannot be tracked."""
    out, bad = [], {}
    for leaf, use in plan.uses.items():
        if not use.sites:
            continue
        kinds = {s.kind for s in use.sites}
        base = next((s for s in use.sites if s.kind == "gather"), None) or \
            next((s for s in use.sites if s.kind == "conv"), None) or use.sites[0]
        in_axes, out_axes = base.contracted, base.free
        stacks = {s.stack_axes for s in use.sites}
        if len(stacks) != 1:
            bad[leaf] = "sliced differently by scans at different uses"
            continue
        for s in use.sites:
            if s.contracted == in_axes and s.free == out_axes:
                s.flipped = False
            elif s.kind == "dot" and s.contracted == out_axes and s.free == in_axes:
                s.flipped = True
            else:
                bad[leaf] = f"used with different input axes by different products ({where(s.eqn)})"
        biases = {s.bias for s in use.sites if s.bias is not None}
        if len(biases) > 1 or (biases and any(s.bias is None and not s.flipped for s in use.sites)):
            bad[leaf] = "a bias added at some uses only"
        if leaf in bad:
            continue
        bias = next(iter(biases)) if biases else None
        bperm = next((s.bias_perm for s in use.sites if s.bias is not None), ())
        kind = "embed" if "gather" in kinds else ("conv" if "conv" in kinds else "linear")
        if "conv" in kinds and len(kinds) > 1:
            bad[leaf] = "used both as a convolution kernel and otherwise"
            continue
        # leftover leaf axes (size 1, squeezed away) join the input side
        nd = len(plan.leaf_shapes[leaf])
        stack = next(iter(stacks))
        rest = tuple(a for a in range(nd) if a not in in_axes + out_axes + stack)
        out.append(Group(leaf, in_axes + rest, out_axes, stack, kind, bias, bperm, tuple(use.sites)))
    return out, bad


def layer_matrix(g: Group, shape, leaf_arr, bias_arr, index: tuple, bias_stack: tuple = ()):
    """``W (n_in, n_out)`` of one layer from its leaf (and bias) arrays (or their gradients)."""
    perm = g.stack + g.in_axes + g.out_axes
    w = jnp.transpose(leaf_arr, perm)[index] if index else jnp.transpose(leaf_arr, perm)
    n_in = math.prod(shape[a] for a in g.in_axes)
    n_out = math.prod(shape[a] for a in g.out_axes)
    w = w.reshape(n_in, n_out)
    if g.bias is not None:
        b = jnp.transpose(bias_arr, tuple(bias_stack) + g.bias_perm)
        b = b[index] if index else b
        w = jnp.concatenate([w, b.reshape(1, n_out)], axis=0)
    return w


# ----------------------------------------------------------------------------- the cast product

def _dg_dx(ct, w, dn, w_pos, nx, dtype):
    """Cotangent of the data operand of ``dot_general`` (no batch dims), as a ``dtype`` product."""
    (lc, rc), _ = dn
    wc, xc = (lc, rc) if w_pos == 0 else (rc, lc)
    nw = w.ndim
    w_free = [d for d in range(nw) if d not in wc]
    x_free = [d for d in range(nx) if d not in xc]
    ct_wfree = list(range(len(w_free))) if w_pos == 0 else list(range(len(x_free), len(x_free) + len(w_free)))
    raw = jax.lax.dot_general(ct.astype(dtype), w.astype(dtype), ((ct_wfree, w_free), ((), ())),
                              preferred_element_type=jnp.float32)
    src = x_free + [xc[list(wc).index(d)] for d in sorted(wc)]
    return jnp.transpose(raw, np.argsort(src))


def cast_dot(x, w, dn, w_pos: int, dtype: str, out_dtype):
    """``dot_general`` of data ``x`` and parameter ``w`` from ``dtype`` operands, float32 accumulation; its
    VJP is a ``dtype`` product too and forms no parameter gradient."""

    @jax.custom_vjp
    def f(x, w):
        a, b = (w, x) if w_pos == 0 else (x, w)
        return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dn,
                                   preferred_element_type=jnp.float32).astype(out_dtype)

    def fwd(x, w):
        wc = w.astype(dtype)
        return f(x, w), (wc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))

    def bwd(res, ct):
        wc, xt, wt = res
        return _dg_dx(ct, wc, dn, w_pos, x.ndim, dtype).astype(xt.dtype), jnp.zeros(wc.shape, wt.dtype)

    f.defvjp(fwd, bwd)
    return f(x, w)


# ----------------------------------------------------------------------------- the instrumented run

class Runner:
    """Evaluate a closed jaxpr with the plan's sites instrumented.

    ``proj[site.id]``: ``(P_x [*stack, k, n_x], P_y [*stack, k', n_y], bias column or None)`` where ``P_x``
    acts on the site's data features (flattened in the site's data order) and ``P_y`` on its output
    features; ``eps[site.id]``: perturbation ``[*levels, *y.shape]`` or None (shape pass)."""

    def __init__(self, plan: Plan, proj, eps, dtype: str | None, cast_leaves=frozenset()):
        self.plan, self.proj, self.eps, self.dtype = plan, proj, eps, dtype
        self.idx: list = []
        self.levels: list = []
        self.rec: dict = {}
        self.shapes: dict = {}
        self.cast_leaves = cast_leaves

    def run(self, jaxpr, consts, args, eps_local=None, rec=None):
        env: dict = {}
        precast: set = set()   # vars holding a `dtype` value where the jaxpr has float32 (cast weights)
        pview: set = set()     # vars that are parameter views (for the cast products)
        eps_local = self.eps if eps_local is None else eps_local
        rec = self.rec if rec is None else rec

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, a in zip(jaxpr.invars, args):
            if isinstance(a, PV):
                a = a.value
                pview.add(v)
            env[v] = a
            if self.dtype is not None and getattr(a, "dtype", None) == jnp.dtype(self.dtype) and \
                    v.aval.dtype == jnp.float32:
                precast.add(v)
        for e in jaxpr.eqns:
            name = e.primitive.name
            ins = [read(v) for v in e.invars]
            isview = [isinstance(v, jcore.Var) and v in pview for v in e.invars]
            site = self.plan.sites.get(id(e))
            if site is not None:
                outs = [self._site(site, e, ins, eps_local, rec, [isinstance(v, jcore.Var) and v in precast
                                                                  for v in e.invars])]
            elif id(e) in self.plan.inside and name == "scan":
                outs = self._scan(e, ins, isview, eps_local, rec)
            elif id(e) in self.plan.inside:
                j, cs = _inner(e)
                n = len(j.invars) - len(ins)
                outs = self.run(j, cs, [PV(a) if iv else a for a, iv in zip(ins, isview)], eps_local, rec) \
                    if n == 0 else self.run(j, cs, ins, eps_local, rec)
            elif self.dtype is not None and name == "dot_general" and sum(isview[:2]) == 1 and \
                    not e.params["dimension_numbers"][1][0] and e.outvars[0].aval.dtype == jnp.float32:
                w_pos = 0 if isview[0] else 1
                outs = [cast_dot(ins[1 - w_pos], ins[w_pos], e.params["dimension_numbers"], w_pos, self.dtype,
                                 jnp.float32)]
            elif name == "pvary" and "axes" in e.params:
                outs = [self._pvary(e, a) for a in ins]   # a value may already vary (it met a perturbation)
            elif name in ("convert_element_type",) and e.invars and isinstance(e.invars[0], jcore.Var) and \
                    e.invars[0] in precast and e.params["new_dtype"] == jnp.float32:
                outs = [ins[0]]
                precast.add(e.outvars[0])
            elif name in ("transpose", "reshape", "squeeze", "broadcast_in_dim") and e.invars and \
                    isinstance(e.invars[0], jcore.Var) and e.invars[0] in precast:
                outs = self._bind(e, ins)
                precast.add(e.outvars[0])
            else:
                ins = [a.astype(v.aval.dtype) if isinstance(v, jcore.Var) and v in precast else a
                       for a, v in zip(ins, e.invars)]
                outs = self._bind(e, ins)
            for v, o in zip(e.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
            if any(isview) and name in ("convert_element_type", "transpose", "reshape", "squeeze",
                                        "broadcast_in_dim") + tuple(_PASS):
                pview.add(e.outvars[0])
        return [read(v).astype(v.aval.dtype) if isinstance(v, jcore.Var) and v in precast else read(v)
                for v in jaxpr.outvars]

    def _pvary(self, e, a):
        cur = set(aval_vma(jax.typeof(a)))
        axes = tuple(x for x in e.params["axes"] if x not in cur)
        if not axes:
            return a
        out = e.primitive.bind(a, **dict(e.params, axes=axes))
        return out[0] if e.primitive.multiple_results else out

    def _bind(self, e, ins):
        params = e.primitive.get_bind_params(e.params)
        subfuns, params = params if isinstance(params, tuple) else ((), params)
        ctx = getattr(getattr(e, "ctx", None), "manager", None)
        if ctx is None:
            out = e.primitive.bind(*subfuns, *ins, **params)
        else:
            with ctx:
                out = e.primitive.bind(*subfuns, *ins, **params)
        return out if e.primitive.multiple_results else [out]

    # -- one site
    def _site(self, site: Site, e, ins, eps_local, rec, precast):
        x = ins[site.x_pos]
        w = ins[site.w_pos]
        if site.kind == "dot" and self.dtype is not None and e.outvars[0].aval.dtype == jnp.float32:
            y = cast_dot(x, w, e.params["dimension_numbers"], site.w_pos, self.dtype, jnp.float32)
        else:
            if precast[site.w_pos]:
                w = w.astype(e.invars[site.w_pos].aval.dtype)
            xs = list(ins)
            xs[site.w_pos] = w
            y = self._bind(e, xs)[0]
        idx = tuple(i for i, lv in zip(self.idx, self.levels) if lv in site.slicing)
        px, py, pb = (p[idx] if (p is not None and idx) else p for p in self.proj[site.id])
        rec[site.id] = project_data(site, e, x, px, pb, self.dtype)
        if eps_local is None:
            self.shapes[site.id] = jax.ShapeDtypeStruct(y.shape, y.dtype)
            return y
        return y + eps_local[site.id].astype(y.dtype)

    # -- a scan with sites inside
    def _scan(self, e, ins, isview, eps_local, rec):
        p = e.params
        nc, ncar, length = p["num_consts"], p["num_carry"], p["length"]
        body = p["jaxpr"]
        consts, carry, xs = ins[:nc], ins[nc:nc + ncar], ins[nc + ncar:]
        inner_sites = [s for s in self.plan.sites.values() if id(e) in s.levels]
        eps_in = {s.id: eps_local[s.id] for s in inner_sites} if eps_local is not None else None
        cview = [isview[i] for i in range(nc)]
        xview = isview[nc + ncar:]
        shapes = {}

        def f(c, xx):
            x_slices, it, ee = xx
            self.idx.append(it)
            self.levels.append(id(e))
            r = {}
            args = [(PV(a) if iv else a) for a, iv in zip(consts, cview)] + list(c) + \
                [(PV(a) if iv else a) for a, iv in zip(x_slices, xview)]
            outs = self.run(body.jaxpr, body.consts, args, ee, r)
            self.idx.pop()
            self.levels.pop()
            for s in inner_sites:
                if s.id in self.shapes:
                    shapes[s.id] = self.shapes[s.id]
            return outs[:ncar], (outs[ncar:], r)

        carry_out, (ys, r) = jax.lax.scan(f, list(carry), (list(xs), jnp.arange(length), eps_in), length=length,
                                          reverse=p["reverse"], unroll=p["unroll"])
        for sid, v in r.items():
            rec[sid] = v
        for sid, s in shapes.items():
            self.shapes[sid] = jax.ShapeDtypeStruct((length,) + s.shape, s.dtype)
        return list(carry_out) + list(ys)


class PV:
    """Marks an argument as a parameter view (for the cast products inside inlined calls)."""

    def __init__(self, value):
        self.value = value


# ----------------------------------------------------------------------------- projections of data and cotangents

def _tok(arr, ex, feat, lead: int = 0):
    """``arr`` -> ``[*lead, B, T, n]``: example axis first, ``feat`` axes flattened last (in order)."""
    ex, feat = ex + lead, [f + lead for f in feat]
    rest = [d for d in range(lead, arr.ndim) if d != ex and d not in feat]
    t = jnp.transpose(arr, list(range(lead)) + [ex] + rest + feat)
    shp = t.shape
    return t.reshape(shp[:lead] + (shp[lead], math.prod(shp[lead + 1:lead + 1 + len(rest)]),
                                   math.prod(shp[lead + 1 + len(rest):])))


def _rows(x, p, dtype):
    """``[..., n] · pᵀ -> [..., k]`` float32 (``dtype``: from ``dtype`` operands)."""
    if dtype is None:
        return jnp.matmul(x.astype(jnp.float32), jnp.swapaxes(p, -1, -2), precision=_HI)
    return jax.lax.dot_general(x.astype(dtype), p.astype(dtype), (((x.ndim - 1,), (p.ndim - 1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def project_data(site: Site, e, x, px, pb, dtype):
    """The data side of a site, projected: ``[B, T, k]`` (``P_in x`` or, flipped, ``P_out x``)."""
    if site.kind == "gather":
        idx = x[..., 0]
        mode = "clip" if "CLIP" in str(e.params.get("mode")) or "PROMISE" in str(e.params.get("mode")) else "fill"
        a = jnp.take(px.T, idx, axis=0, mode=mode, fill_value=0)
        return _tok(a, site.y_ex, [a.ndim - 1])
    if site.kind == "conv":
        p = e.params
        dn = p["dimension_numbers"]
        w_shape = tuple(e.invars[1].aval.shape)
        k = px.shape[0]
        in_dims = [d for d in range(len(w_shape)) if d != dn.rhs_spec[0]]
        # px [k, n_in] flattened over the in leaf axes in leaf order -> kernel in the view's layout
        order = sorted(range(len(in_dims)), key=lambda i: site.groups[in_dims[i]][0])
        pk = px.reshape((k,) + tuple(w_shape[in_dims[i]] for i in order))
        # dims of pk: k, then in_dims in leaf order; place them at the view's positions
        src = {in_dims[i]: j + 1 for j, i in enumerate(order)}
        perm = [0 if d == dn.rhs_spec[0] else src[d] for d in range(len(w_shape))]
        kern = jnp.transpose(pk, perm)
        a = jax.lax.conv_general_dilated(
            x.astype(jnp.float32), kern, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"],
            dn, precision=_HI, preferred_element_type=jnp.float32)
        a = _tok(a, dn.out_spec[0], [dn.out_spec[1]])
        return a if pb is None else a + pb
    a = _rows(_tok(x, site.x_ex, list(site.x_feat)), px, dtype if not site.flipped else dtype)
    return a if pb is None else a + pb


def project_cot(site: Site, dy, py, dtype, lead: int = 0):
    """The output side of a site's cotangent ``dy [*lead, *y]``, projected: ``[*lead, B, T, k]``."""
    if site.kind == "conv":
        t = _tok(dy, site.y_ex, list(site.y_feat), lead)
    else:
        t = _tok(dy, site.y_ex, list(site.y_feat), lead)
    return _rows(t, py, dtype if site.kind == "dot" else None)


def perm_projection(p, shape, axes_sorted: Sequence[int], order: Sequence[int]):
    """``p [*stack, k, n]`` over leaf axes ``axes_sorted`` (flattened in leaf order) -> columns in ``order``."""
    if list(order) == list(axes_sorted):
        return p
    lead = p.shape[:-1]
    q = p.reshape(lead + tuple(shape[a] for a in axes_sorted))
    nl = len(lead)
    perm = list(range(nl)) + [nl + list(axes_sorted).index(a) for a in order]
    return jnp.transpose(q, perm).reshape(lead + (p.shape[-1],))
