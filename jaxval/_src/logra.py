"""LoGra projected per-example gradients, for any JAX model.

Fast path (``LoGra.grads``): inside one jit-compiled step the loss is traced to a jaxpr and the layers are
found in it (``jaxval._src.capture``: every parameter leaf multiplied with per-example data, by
``dot_general``, ``conv_general_dilated`` or an embedding ``gather``). The jaxpr is evaluated again with
every such product's input ``x`` projected right away (``P_in x``) and a zero perturbation added to its
output. One backward pass of ``Σ_b loss_b`` with respect to the perturbations gives each example's
per-token output cotangents ``dy``; they are projected (``P_out dy``) and each example's block is

    block_b = Σ_t (P_in x_t)(P_out dy_t)ᵀ      (k_in × k_out)

which equals ``P_in (∂loss_b/∂W) P_outᵀ`` because ``∂loss_b/∂W = Σ_t x_t dy_tᵀ``. No weight gradient and
no full per-example gradient is ever formed.

Two forms: ``LoGra(model, loss_fn)`` with a flax nnx module and ``loss_fn(model, batch) -> [B]``, or
``LoGra(params, loss_fn, batch=example)`` with any pytree of arrays and ``loss_fn(params, batch) -> [B]``
(flax linen ``variables["params"]``, equinox arrays from ``eqx.partition``, a dict).

Every compiled use of the step (``LoGra.grads``, logging, curvature statistics, streamed scores) goes
through ``LoGra.compiled_step``: one builder, one cache, with a pure ``reduce`` for what a caller keeps.
The first call of a step obtained from ``step_for`` also checks that examples do not interact.

Reference path (``explicit_grads``): ``vmap(grad)`` of the per-example loss with respect to the
parameters, then the projection. For tests and tiny models.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxval._src import autocast, capture, precision
from jaxval._src.batching import batch_size
from jaxval._src.layers import Layer, LayerSelector, discover, leaf_name, matches
from jaxval._src.projection import INITS, Rank, init_projections, resolve_rank
from jaxval._src.provenance import ProjectedGrads, logra_config_hash, wrap_grads

LossFn = Callable[[Any, Any], jax.Array]
Projections = Mapping[str, tuple[jax.Array, jax.Array]]
Pairs = Mapping[str, list[tuple[jax.Array, jax.Array, bool]]]
Reduce = Callable[[Sequence[Layer], jax.Array, Pairs, jax.Array, Any], Any]

_HI = precision.MATMUL


# ----------------------------------------------------------------------------- batch checks

def _check_losses(losses, b: int):
    if not hasattr(losses, "shape") or tuple(losses.shape) != (b,):
        raise ValueError(
            f"loss_fn must return per-example losses of shape [B] = [{b}], got shape "
            f"{getattr(losses, 'shape', type(losses))}; return one loss per example (e.g. the sum of "
            "token losses of each sequence), not their mean or sum"
        )


def check_independent_examples(model):
    """Refuse nnx models whose examples interact in the forward pass (BatchNorm in training mode); other
    interactions are found in the traced computation and by the first batch's check."""
    if not isinstance(model, nnx.Module):
        return
    for path, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm) and not m.use_running_average:
            raise ValueError(
                f"module '{'/'.join(map(str, path))}' is a BatchNorm in training mode: examples interact "
                "through the batch statistics, so per-example gradients are not defined. Put the model in "
                "evaluation mode first (model.eval() or use_running_average=True)"
            )


def varying_axes(x) -> tuple[str, ...]:
    """The ``shard_map`` mesh axes along which ``x`` varies (``()`` outside ``shard_map``)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)                                          # jax >= 0.11
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())  # jax 0.10
    return tuple(sorted(vma))


def _varying_zeros(s: jax.ShapeDtypeStruct, axes) -> jax.Array:
    z = jnp.zeros(s.shape, s.dtype)
    return jax.lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


# ----------------------------------------------------------------------------- the traced loss

class Traced:
    """``loss_fn`` as a function of (parameter leaves, other state, batch), for one frontend.

    nnx: ``graphdef`` is an ``nnx.GraphDef`` and the state is ``nnx.split(model)[1]``; the leaves are the
    ``wrt`` part of it. Function form: ``graphdef`` is None and the state is the parameter pytree."""

    def __init__(self, graphdef, loss_fn: LossFn, wrt=None):
        self.graphdef, self.loss_fn = graphdef, loss_fn
        self.wrt = nnx.Param if wrt is None else wrt

    def split(self, state):
        """``(params, rest)``."""
        if self.graphdef is None:
            return state, None
        params, rest = nnx.split_state(state, self.wrt, ...)
        return params, rest

    def fn(self, params, rest, batch):
        if self.graphdef is None:
            return self.loss_fn(params, batch)
        return self.loss_fn(nnx.merge(self.graphdef, params, rest), batch)

    def leaf_paths(self, params) -> list[tuple]:
        return [_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _keys(path) -> tuple:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            out.append(str(k))
    while out and out[-1] in ("value", "raw_value"):
        out.pop()
    return tuple(out)


def _probe_batch(batch, b: int):
    """The type of a batch with one more example (traced, never run), varying over the same shard_map axes."""
    def probe(a):
        try:
            mat = getattr(jax.typeof(a), "manual_axis_type", None)   # shard_map's varying axes (jax 0.10)
        except TypeError:
            mat = None
        if mat is not None and getattr(mat, "varying", None):   # inside shard_map: a local value of that type
            return jnp.concatenate([a, a[:1]])
        return jax.ShapeDtypeStruct((b + 1,) + tuple(a.shape[1:]), a.dtype)

    return jax.tree_util.tree_map(probe, batch)


class Capture:
    """The traced layers of one loss at one batch shape: the plan, its jaxpr and the layer records."""

    def __init__(self, traced: Traced, state, batch):
        b = batch_size(batch)
        self.single = b == 1
        if self.single:   # jnp programs may special-case size-1 axes: trace two copies, keep row 0
            batch = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a]), batch)
            b = 2
        self.batch_arrays = batch
        params, rest = traced.split(state)
        leaves = jax.tree_util.tree_leaves(params)
        self.n = len(leaves)
        self.paths = traced.leaf_paths(params)
        try:
            self.plan, self.closed = capture.analyze(traced.fn, (params, rest, batch),
                                                     (params, rest, _probe_batch(batch, b)), self.n, b, b + 1)
        except capture.CaptureError as e:
            raise ValueError(str(e)) from None
        self.batch = b
        self.groups, self.bad = capture.groups_of(self.plan)
        self.layers: list[Layer] = []
        self.by_name: dict[str, tuple[Layer, capture.Group]] = {}
        shapes = self.plan.leaf_shapes
        for g in self.groups:
            base = leaf_name(self.paths[g.leaf])
            shp = shapes[g.leaf]
            n_in = math.prod(shp[a] for a in g.in_axes) + (g.bias is not None)
            n_out = math.prod(shp[a] for a in g.out_axes)
            stack_shape = tuple(shp[a] for a in g.stack)
            for index in np.ndindex(*stack_shape) if stack_shape else [()]:
                name = "/".join([base] + [str(i) for i in index]) if index else base
                layer = Layer(name, self.paths[g.leaf], g.kind, n_in, n_out, g.bias is not None,
                              leaf=g.leaf, index=tuple(int(i) for i in index))
                self.layers.append(layer)
                self.by_name[name] = (layer, g)
        tracked = {g.leaf for g in self.groups} | {g.bias for g in self.groups if g.bias is not None}
        self.untracked = [leaf_name(self.paths[i]) for i, u in self.plan.uses.items()
                          if i not in tracked and (u.other or u.dots) and not u.sites]
        self.problems = {leaf_name(self.paths[i]): u.other for i, u in self.plan.uses.items()
                         if u.sites and u.other}
        for leaf, why in self.bad.items():
            self.problems.setdefault(leaf_name(self.paths[leaf]), [(why, "")])

    def check_tracked(self, names: Sequence[str]):
        """Refuse tracked layers whose leaf is also used outside the captured products."""
        for name in names:
            layer, g = self.by_name[name]
            for leaf in (g.leaf, g.bias):
                if leaf is None:
                    continue
                probs = self.problems.get(leaf_name(self.paths[leaf]))
                if probs:
                    prim, at = probs[0]
                    raise ValueError(
                        f"layer '{name}': its parameter '{leaf_name(self.paths[leaf])}' is also used by "
                        f"{prim}{' at ' + at if at else ''}, outside the products LoGra captures, so its "
                        "per-example gradient would be incomplete; restructure the model or exclude the layer "
                        "(layers=...)")


def _site_proj(cap: Capture, names: Sequence[str], projections, group, site):
    """``(P_x, P_y, bias column)`` of one site, stacked over the group's layers."""
    layers = [(l, g) for l, g in (cap.by_name[n] for n in names) if g is group]
    shp = cap.plan.leaf_shapes[group.leaf]
    stack_shape = tuple(shp[a] for a in group.stack)
    by_index = {l.index: projections[l.name] for l, _ in layers}
    k_in = {int(p[0].shape[0]) for p in by_index.values()}
    k_out = {int(p[1].shape[0]) for p in by_index.values()}
    if len(k_in) != 1 or len(k_out) != 1:
        raise ValueError(f"the layers stacked in '{leaf_name(cap.paths[group.leaf])}' need equal ranks, got "
                         f"{sorted(k_in)} x {sorted(k_out)}")
    ki, ko = k_in.pop(), k_out.pop()
    n_in = layers[0][0].n_in
    n_out = layers[0][0].n_out
    if stack_shape:
        zi, zo = jnp.zeros((ki, n_in), jnp.float32), jnp.zeros((ko, n_out), jnp.float32)
        pin = jnp.stack([by_index.get(tuple(int(i) for i in ix), (zi, zo))[0]
                         for ix in np.ndindex(*stack_shape)]).reshape(stack_shape + (ki, n_in))
        pout = jnp.stack([by_index.get(tuple(int(i) for i in ix), (zi, zo))[1]
                          for ix in np.ndindex(*stack_shape)]).reshape(stack_shape + (ko, n_out))
    else:
        pin, pout = by_index[()]
    pin, pout = jnp.asarray(pin, jnp.float32), jnp.asarray(pout, jnp.float32)
    pb = None
    if group.bias is not None:
        pin, pb = pin[..., :-1], pin[..., -1]
    in_sorted = tuple(a for a in group.in_axes if a in site.contracted or a in site.free)
    out_sorted = group.out_axes
    if site.kind == "gather":
        return pin, pout, None
    if site.kind == "conv":
        return pin, pout, pb
    if not site.flipped:
        px = capture.perm_projection(pin, shp, site.contracted, site.x_perm_groups)
        py = capture.perm_projection(pout, shp, out_sorted, site.y_perm_groups)
        return px, py, pb
    px = capture.perm_projection(pout, shp, site.contracted, site.x_perm_groups)
    py = capture.perm_projection(pin, shp, in_sorted, site.y_perm_groups)
    return px, py, None


def _sliced(arr, site, index, group, lead_levels):
    """``arr [*levels, ...]`` -> the layer ``index``'s part, repeat levels kept in front."""
    slicing = [lv for lv, _ in site.stack]
    sel = []
    it = iter(index)
    for lv in lead_levels:
        sel.append(next(it) if lv in slicing else slice(None))
    return arr[tuple(sel)] if sel else arr


def _merge_repeats(t, n_rep: int):
    """``[*rep, B, T, k] -> [B, rep·T, k]``."""
    if n_rep == 0:
        return t
    t = jnp.moveaxis(t, n_rep, 0)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def traced_pairs(traced: Traced, state, batch, names: Sequence[str], projections: Projections,
                 compute_dtype: str | None = None, expect: Sequence[Layer] | None = None):
    """Traceable core: per-example losses ``[B]`` and, per layer name and call, ``(a [B,T,k_in],
    s [B,T,k_out], cot_is_s)``: ``a = P_in x`` and ``s = P_out dy`` for a product (``cot_is_s`` True); for a
    tied head the roles flip (``a`` = projected cotangent on the table's input side, ``cot_is_s`` False).
    Call inside ``jax.jit``."""
    cap = Capture(traced, state, batch)
    missing = [n for n in names if n not in cap.by_name]
    if missing:
        raise ValueError(
            f"tracked layers {missing} were not found as products of parameters with the data in the traced "
            f"loss (found: {[l.name for l in cap.layers][:20]}); pass batch= to LoGra to discover the layers "
            "from the traced computation")
    if expect is not None:
        for l in expect:
            t = cap.by_name[l.name][0]
            if (t.n_in, t.n_out, t.has_bias) != (l.n_in, l.n_out, l.has_bias):
                raise ValueError(
                    f"layer '{l.name}': the traced computation uses it as a ({t.n_in}, {t.n_out}) matrix"
                    f"{' with bias' if t.has_bias else ''}, the module structure as ({l.n_in}, {l.n_out}); pass "
                    "batch= to LoGra to discover the layers from the traced computation")
    cap.check_tracked(names)
    plan = cap.plan
    wanted = {cap.by_name[n][1].leaf for n in names}
    groups = {g.leaf: g for g in cap.groups if g.leaf in wanted}
    plan.sites = {sid: s for sid, s in plan.sites.items() if s.leaf in wanted}
    proj = {}
    for g in groups.values():
        for s in g.sites:
            proj[s.id] = _site_proj(cap, names, projections, g, s)
    b = cap.batch
    params, rest = traced.split(state)
    args = jax.tree_util.tree_leaves((params, rest, cap.batch_arrays))
    args = [capture.PV(x) for x in args[:cap.n]] + args[cap.n:]
    closed = cap.closed

    def run(eps):
        r = capture.Runner(plan, proj, eps, compute_dtype)
        outs = r.run(closed.jaxpr, closed.consts, args)
        return outs[0], r

    # the perturbations: one per site, shaped like its output (stacked over enclosing scans), varying like
    # the output and the losses under shard_map (a constant zero is device-invariant: its cotangent would be
    # summed over the devices, mixing examples)
    loss_vma = set(capture.aval_vma(closed.out_avals[0]))
    eps0 = {}
    for sid, site in plan.sites.items():
        aval = site.eqn.outvars[0].aval
        shape = tuple(plan.level_len[lv] for lv in site.levels) + tuple(aval.shape)
        eps0[site.id] = _varying_zeros(jax.ShapeDtypeStruct(shape, aval.dtype), set(site.vma) | loss_vma)

    def total(eps):
        losses, r = run(eps)
        return losses.sum(), (losses, r.rec)

    (_, (losses, rec)), dys = jax.value_and_grad(total, has_aux=True)(eps0)
    pairs: dict = {}
    for name in names:
        layer, g = cap.by_name[name]
        lst = []
        for s in g.sites:
            levels = s.levels
            n_rep = len(levels) - len(s.stack)
            px, py, _ = proj[s.id]
            idx = layer.index
            py_l = py[idx] if idx else py
            dy = _sliced(dys[s.id], s, idx, g, levels)
            f = _sliced(rec[s.id], s, idx, g, levels)
            c = _merge_repeats(capture.project_cot(s, dy, py_l, compute_dtype, lead=n_rep), n_rep)
            f = _merge_repeats(f, n_rep)
            lst.append((c, f, False) if s.flipped else (f, c, True))
        pairs[name] = lst
    if cap.single:
        losses = losses[:1]
        pairs = {n: [(a[:1], c[:1], f) for a, c, f in lst] for n, lst in pairs.items()}
    return losses, pairs


def projected_pairs(graphdef, state, loss_fn: LossFn, layers: Sequence[Layer], projections: Projections,
                    batch, compute_dtype: str | None = None, wrt=None):
    """``traced_pairs`` for an nnx ``(graphdef, state)`` (``graphdef`` None: ``state`` is a parameter
    pytree and ``loss_fn(params, batch)``)."""
    return traced_pairs(Traced(graphdef, loss_fn, wrt), state, batch, [l.name for l in layers], projections,
                        compute_dtype)


def blocks_from_pairs(layers: Sequence[Layer], pairs) -> jax.Array:
    """``[B, D]``: per example, ``Σ_calls Σ_t a_t b_tᵀ`` flattened row-major, layers concatenated."""
    out = []
    for layer in layers:
        blk = sum(jnp.einsum("btk,btl->bkl", a, c, precision=_HI) for a, c, _ in pairs[layer.name])
        out.append(blk.reshape(blk.shape[0], -1))
    return jnp.concatenate(out, axis=1)


# ----------------------------------------------------------------------------- public API

def _is_nnx(model) -> bool:
    return isinstance(model, nnx.Module)


def _frontend(model, loss_fn, wrt):
    """``(Traced, graphdef key, state)`` of a model (nnx module) or a parameter pytree."""
    if _is_nnx(model):
        graphdef, state = nnx.split(model)
        return Traced(graphdef, loss_fn, wrt), graphdef, state
    return Traced(None, loss_fn), jax.tree_util.tree_structure(model), model


def _warn_untracked(names):
    if names:
        listing = ", ".join(names[:20])
        more = f" and {len(names) - 20} more" if len(names) > 20 else ""
        warnings.warn(f"jaxval: parameters not tracked by LoGra: {listing}{more}", stacklevel=4)


class LoGra:
    """LoGra projected per-example gradients of a JAX model.

    Args:
      model: a flax ``nnx.Module`` (``loss_fn(model, batch)``), or any pytree of arrays (``loss_fn(params,
        batch)``: flax linen ``variables["params"]``, equinox arrays from ``eqx.partition``, a dict). Its
        structure fixes the tracked layers; the weights are read again at each ``grads`` call.
      loss_fn: per-example losses ``[B]``.
      rank: int, ``(k_in, k_out)``, a ``{layer name: rank, "default": rank}`` mapping, or None (full);
        clipped to each layer's size.
      init: ``gaussian`` | ``rademacher`` | ``orthogonal`` | ``identity`` (``pca``: pass ``projections``
        from ``jaxval.pca_projections``).
      seed: projection seed; a layer's projection depends only on ``(seed, layer name)``.
      layers: layer selector (regex, list of regexes, or callable ``(name, module) -> bool``; ``module`` is
        None outside nnx).
      types: optional tuple of nnx layer types to keep.
      projections: explicit ``{name: (P_in, P_out)}``, overriding ``init``.
      compute_dtype: None (float32) or ``"bfloat16"``: the step's float32 products with parameters in
        bfloat16 with float32 accumulation (~1e-2 relative gradients; see ``jaxval._src.autocast``).
      wrt: nnx filter of the parameters to track (default ``nnx.Param``; ``nnx.LoRAParam``: the adapters).
      batch: an example batch. Needed for a parameter pytree (the layers are found by tracing
        ``loss_fn``); for an nnx model it makes the traced computation, not the module types, name the
        layers (any module: linen bridged with ``nnx.bridge.ToNNX``, custom modules, ``nnx.scan`` stacks).

    Attributes:
      layers: tuple of ``Layer`` records (``.name .n_in .n_out .k_in .k_out``) in flat-vector order.
      projections: ``{name: (P_in [k_in, n_in], P_out [k_out, n_out])}``.
      dim: ``D = Σ k_in·k_out``.
    """

    def __init__(self, model, loss_fn: LossFn, rank: Rank | Mapping | None = 64,
                 init: str = "gaussian", seed: int = 0, layers: LayerSelector = None,
                 types: Sequence[type] | None = None, projections: Projections | None = None,
                 compute_dtype: str | None = None, wrt=None, batch=None):
        self.compute_dtype = autocast.resolve(compute_dtype)
        if init not in INITS and not (init == "pca" and projections is not None):
            if init == "pca":
                raise ValueError("init='pca' needs fitted projections: pass "
                                 "projections=jaxval.pca_projections(...)")
            raise ValueError(f"unknown projection init {init!r}; choose one of {INITS + ('pca',)}")
        self.nnx = _is_nnx(model)
        self.wrt = wrt
        self.loss_fn = loss_fn
        self._traced_layers = batch is not None
        if batch is not None:
            found = self._discover_traced(model, batch, layers, types)
        elif self.nnx:
            found = [l for l, _ in discover(model, layers, types, wrt=wrt)]
        else:
            raise ValueError("LoGra(params, loss_fn, ...) with a parameter pytree needs an example batch to "
                             "find the layers in the traced loss: pass batch=<a batch of the data>")
        recs = []
        for layer in found:
            if projections is not None and layer.name in projections:
                p_in, p_out = projections[layer.name]
                k_in, k_out = int(p_in.shape[0]), int(p_out.shape[0])
                if p_in.shape[1] != layer.n_in or p_out.shape[1] != layer.n_out:
                    raise ValueError(f"projection of layer '{layer.name}' has shapes {p_in.shape}, "
                                     f"{p_out.shape}; expected [k, {layer.n_in}] and [k, {layer.n_out}]")
            else:
                k_in, k_out = resolve_rank(rank, layer)
            recs.append(layer.replace(k_in=k_in, k_out=k_out))
        self.layers: tuple[Layer, ...] = tuple(recs)
        if projections is None:
            projections = init_projections(self.layers, init, seed)
        else:
            missing = [l.name for l in self.layers if l.name not in projections]
            if missing:
                raise ValueError(f"projections given for some layers but not for {missing}")
        self.projections = {l.name: (jnp.asarray(projections[l.name][0], jnp.float32),
                                     jnp.asarray(projections[l.name][1], jnp.float32)) for l in self.layers}
        self.init, self.seed, self.rank = init, seed, rank
        self.dim = int(sum(l.dim for l in self.layers))
        self._compiled: dict[Any, Callable] = {}
        self._cast: tuple | None = None
        self._checked: set = set()
        self._cast_leaves: frozenset | None = None
        self._config_hash: tuple | None = None      # (ids of the projection arrays, hash)
        self._fingerprints: list = []               # [(weakrefs of the parameter arrays, fingerprint)], newest first

    def _discover_traced(self, model, batch, selector, types) -> list[Layer]:
        traced, _, state = _frontend(model, self.loss_fn, self.wrt)
        batch = jax.tree_util.tree_map(jnp.asarray, batch)
        cap = Capture(traced, state, batch)
        modules = dict((tuple(p), m) for p, m in nnx.iter_modules(model)) if self.nnx else {}
        found, skipped = [], []
        for layer in cap.layers:
            module = modules.get(tuple(layer.path[:-1])) if self.nnx else None
            ok = matches(selector, layer.name, module) and (
                types is None or (module is not None and isinstance(module, tuple(types))))
            (found if ok else skipped).append(layer)
        if not found:
            raise ValueError(f"no supported layer selected in the traced loss (products of parameters with the "
                             f"data); found {[l.name for l in cap.layers][:20]}, selector={selector!r}, "
                             f"types={types!r}")
        cap.check_tracked([l.name for l in found])
        _warn_untracked(cap.untracked + sorted({l.name for l in skipped}))
        uses = cap.plan.uses
        self._cast_leaves = frozenset(
            i for i, u in uses.items() if not u.other and not u.bias_of and
            all(s.kind == "dot" for s in u.sites) and (u.sites or u.dots) and
            cap.plan.leaf_dtypes[i] == jnp.float32)
        return found

    # -- offsets of each layer's block in the flat vector
    def offsets(self) -> dict[str, tuple[int, int]]:
        out, o = {}, 0
        for l in self.layers:
            out[l.name] = (o, o + l.dim)
            o += l.dim
        return out

    def config(self) -> dict:
        """A JSON-able description (stored in gradient-store manifests)."""
        proj_hash = hashlib.sha256()
        for l in self.layers:
            for p in self.projections[l.name]:
                proj_hash.update(np.asarray(p, np.float32).tobytes())
        return {
            "layers": [{"name": l.name, "kind": l.kind, "n_in": l.n_in, "n_out": l.n_out,
                        "k_in": l.k_in, "k_out": l.k_out} for l in self.layers],
            "init": self.init, "seed": int(self.seed), "dim": self.dim,
            "projection_sha256": proj_hash.hexdigest(),
            **({"compute_dtype": self.compute_dtype} if self.compute_dtype else {}),
        }

    def config_hash(self) -> str:
        """sha256 of :meth:`config` (``jaxval.Provenance.config_hash``), cached while the projection arrays
        are the same objects."""
        key = tuple(id(p) for pair in self.projections.values() for p in pair)
        if self._config_hash is None or self._config_hash[0] != key:
            self._config_hash = (key, logra_config_hash(self.config()))
        return self._config_hash[1]

    def fingerprint(self, model) -> str:
        """:func:`model_fingerprint` of ``model``, cached (a few entries) by the identity of its parameter
        arrays: jax arrays are immutable, so the same array objects have the same bytes."""
        leaves = [v for _, v in param_items(model)]
        if all(isinstance(x, jax.Array) for x in leaves):
            for refs, fp in self._fingerprints:
                if len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
                    return fp
        fp = model_fingerprint(model)
        try:
            refs = [weakref.ref(x) for x in leaves]
        except TypeError:
            return fp
        self._fingerprints.insert(0, (refs, fp))
        del self._fingerprints[4:]
        return fp

    def _traced(self, graphdef) -> Traced:
        if isinstance(graphdef, jax.tree_util.PyTreeDef):
            return Traced(None, self.loss_fn)
        return Traced(graphdef, self.loss_fn, self.wrt)

    def compiled_step(self, graphdef, reduce: Reduce | None = None, *, sample_fn: Callable | None = None,
                      grads: bool = True, dtype: Any = None) -> Callable:
        """THE compiled LoGra step (one builder, one cache on this object):

            step(state, batch, projections, keys=None, aux=None) -> (g [B, D] | None, losses [B], out)

        ``graphdef``/``state``: ``nnx.split(model)`` (or ``step_state`` of it), or, for a parameter pytree,
        its treedef and the pytree. ``reduce(layers, losses, pairs, g, aux)``: a pure, traceable function of
        the step's per-layer pairs (see ``traced_pairs``), its gradients ``g [B, D]`` float32 and the caller's
        ``aux`` pytree, giving ``out`` (None without ``reduce``); statistics, accumulators and contractions
        with query gradients are such reductions. The cache key is ``(graphdef, reduce, sample_fn, grads,
        dtype)``: pass module-level functions (or keep the callable), not a fresh lambda per call.
        ``sample_fn(model, batch, keys)``: the step runs on the batch it returns (labels drawn from the model;
        ``keys``: one PRNG key per example). ``grads=False``: ``g`` is not returned (XLA then forms it only
        where ``reduce`` reads it). ``dtype``: ``g`` cast on the device (e.g. a store's bfloat16)."""
        key = (graphdef, reduce, sample_fn, bool(grads), None if dtype is None else jnp.dtype(dtype).name)
        fn = self._compiled.get(key)
        if fn is not None:
            return fn
        layers, compute_dtype = self.layers, self.compute_dtype
        names = [l.name for l in layers]
        traced = self._traced(graphdef)
        expect = None if self._traced_layers else layers
        out_dtype = None if dtype is None else jnp.dtype(dtype)

        @jax.jit
        def fn(state, batch, projections, keys=None, aux=None):
            if sample_fn is not None:
                model = nnx.merge(graphdef, state) if traced.graphdef is not None else state
                batch = sample_fn(model, batch, keys)
            losses, pairs = traced_pairs(traced, state, batch, names, projections, compute_dtype, expect)
            g = blocks_from_pairs(layers, pairs)  # dead code for XLA where nothing reads it
            out = None if reduce is None else reduce(layers, losses, pairs, g, aux)
            if not grads:
                return None, losses, out
            return (g if out_dtype is None or out_dtype == g.dtype else g.astype(out_dtype)), losses, out

        self._compiled[key] = fn
        return fn

    def step_for(self, model, reduce: Reduce | None = None, **kw) -> tuple[Callable, Any]:
        """``(step, step_state)`` for ``model`` (an nnx module or the parameter pytree): the step is
        ``compiled_step(graphdef, reduce, **kw)``; its first call per model structure also checks that
        examples do not interact (example 0 repeated over the batch must give the same row 0)."""
        _, graphdef, state = _frontend(model, self.loss_fn, self.wrt)
        if not any(k[0] == graphdef for k in self._compiled):
            check_independent_examples(model)
        step = self.compiled_step(graphdef, reduce, **kw)
        state = self.step_state(model, state)
        if graphdef in self._checked or kw.get("sample_fn") is not None:
            return step, state
        return self._checking(step, graphdef, state, kw), state

    def _checking(self, step, graphdef, state0, kw):
        return _Checked(self, step, graphdef, kw)

    def _check_batch(self, step, graphdef, state, batch, projections, keys, aux, out, dtype):
        leaves = jax.tree_util.tree_leaves(batch)
        if any(isinstance(a, jax.core.Tracer) for a in leaves + jax.tree_util.tree_leaves(out)):
            return      # called inside a trace (jit, shard_map): checked at the first concrete call
        if not leaves or any(isinstance(a, jax.Array) and not a.is_fully_addressable for a in leaves):
            self._checked.add(graphdef)
            return
        b = leaves[0].shape[0]
        if b < 2:
            return
        g = out[0]
        if step is None:
            step, g = self.compiled_step(graphdef), None
            dtype = None
        if g is None:
            g = step(state, batch, projections)[0]
        alone = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a[:1], a.shape), batch)
        g0 = step(state, alone, projections, keys, aux)[0]
        r, r0 = np.asarray(g[0], np.float64), np.asarray(g0[0], np.float64)
        scale = max(float(np.max(np.abs(r0))), float(np.max(np.abs(r))), 1e-30)
        err = float(np.max(np.abs(r - r0))) / scale
        low = self.compute_dtype is not None or (dtype is not None and jnp.dtype(dtype).itemsize < 4)
        if not np.isfinite(err) or err > (5e-2 if low else 1e-3):
            raise ValueError(
                f"examples interact: example 0's projected gradient changes with the other examples of the "
                f"batch (relative difference {err:.3g} between example 0 in this batch and example 0 "
                "repeated over the batch). The loss of an example must depend on that example alone: no "
                "mean or statistics over the batch inside the model (BatchNorm: model.eval()), no mixing of "
                "examples, the example axis kept an axis of its own")
        self._checked.add(graphdef)

    def grads_and_losses(self, model, batch) -> tuple[jax.Array, jax.Array]:
        """``([B, D] float32 projected gradients, [B] losses)``."""
        batch_size(batch)
        step, state = self.step_for(model)
        g, losses, _ = step(state, batch, self.projections)
        return g, losses

    def step_state(self, model, state=None):
        """The state ``compiled_step`` wants: as is, or with the weights that are only multiplied already in
        ``compute_dtype`` (converted once per set of weights: the last conversion is kept while its weights
        are)."""
        if state is None:
            state = _frontend(model, self.loss_fn, self.wrt)[2]
        if self.compute_dtype is None:
            return state
        leaves = jax.tree_util.tree_leaves(state)
        key = tuple(map(id, leaves))
        if self._cast is None or self._cast[0] != key:
            if _is_nnx(model):
                cast = autocast.cast_kernels(model, state, self.compute_dtype)
            elif self._cast_leaves:
                flat, tdef = jax.tree_util.tree_flatten(state)
                cast = jax.tree_util.tree_unflatten(tdef, [
                    a.astype(self.compute_dtype) if i in self._cast_leaves else a for i, a in enumerate(flat)])
            else:
                cast = state
            self._cast = (key, leaves, cast)
        return self._cast[2]

    def grads(self, model, batch) -> ProjectedGrads:
        """``[B, D]`` float32 projected per-example gradients (jit-compiled fast path), carrying their provenance
        (this LoGra's configuration hash and the model's fingerprint) so that scoring refuses a mismatch."""
        return wrap_grads(self, model, self.grads_and_losses(model, batch)[0])


class _Checked:
    """A compiled step whose first call also checks that examples do not interact (the rest: the step's)."""

    def __init__(self, logra, step, graphdef, kw):
        self._logra, self._step, self._graphdef, self._kw = logra, step, graphdef, kw

    def __getattr__(self, name):
        return getattr(self._step, name)

    def __call__(self, state, batch, projections, keys=None, aux=None):
        out = self._step(state, batch, projections, keys, aux)
        lg = self._logra
        if self._graphdef not in lg._checked:
            plain = self._step if self._kw.get("grads", True) else None
            lg._check_batch(plain, self._graphdef, state, batch, projections, keys, aux, out, self._kw.get("dtype"))
        return out


def explicit_grads(model, loss_fn: LossFn, projections: Projections, batch, wrt=None) -> jax.Array:
    """Reference ``[B, D]``: ``vmap(grad)`` of each example's loss w.r.t. the parameters, then
    ``P_in (∂loss_b/∂W) P_outᵀ`` per layer, in the order of ``projections`` (layer names as ``LoGra``'s;
    ``model``: an nnx module or a parameter pytree). Forms full per-example gradients: for tests and tiny
    models only."""
    b = batch_size(batch)
    names = list(projections)
    traced, _, state = _frontend(model, loss_fn, wrt)
    cap = Capture(traced, state, batch)
    missing = [n for n in names if n not in cap.by_name]
    if missing:
        raise ValueError(f"no supported layer named {missing} in the model")
    params, rest = traced.split(state)

    # the loss of one example as a pure function of the leaves (a traced program: no module state is
    # mutated under grad / vmap, e.g. the RNG counters a linen bridge advances)
    one = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((1,) + tuple(a.shape[1:]), a.dtype), batch)
    closed = jax.make_jaxpr(traced.fn)(params, rest, one)
    _check_losses(closed.out_avals[0], 1)
    fun = jax.extend.core.jaxpr_as_fun(closed)
    pleaves, rleaves = jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(rest)

    def single(p, example):
        return fun(*p, *rleaves, *jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a: a[None], example)))[0][0]

    flat = jax.vmap(jax.grad(single), in_axes=(None, 0))(pleaves, batch)
    shapes = cap.plan.leaf_shapes
    out = []
    for name in names:
        layer, g = cap.by_name[name]
        bias = flat[g.bias] if g.bias is not None else None
        bstack = tuple(a for _, a in next((s.stack for s in g.sites if s.bias is not None), ())) \
            if g.bias is not None else ()
        w = jax.vmap(lambda k, bb: capture.layer_matrix(g, shapes[g.leaf], k, bb, layer.index, bstack))(
            flat[g.leaf], bias if bias is not None else jnp.zeros((b,)))
        p_in, p_out = (jnp.asarray(p, jnp.float32) for p in projections[name])
        blk = jnp.einsum("kn,bnm,lm->bkl", p_in, w.astype(jnp.float32), p_out, precision=_HI)
        out.append(blk.reshape(b, -1))
    return jnp.concatenate(out, axis=1)


def param_items(model) -> list[tuple[tuple, Any]]:
    """``[(path, array)]`` of a model's parameters: an nnx module's ``nnx.Param`` state, or a pytree's leaves."""
    if _is_nnx(model):
        return [(path, v[...] if not isinstance(v, jax.Array) else v)
                for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    return [(_keys(p), v) for p, v in jax.tree_util.tree_flatten_with_path(model)[0]]


def model_fingerprint(model) -> str:
    """sha256 over the parameter shapes, dtypes and bytes (identifies the checkpoint a log came from)."""
    h = hashlib.sha256()
    for path, v in param_items(model):
        arr = np.asarray(v)
        h.update(json.dumps([list(map(str, path)), list(arr.shape), str(arr.dtype)]).encode())
        h.update(arr.tobytes())
    return h.hexdigest()
