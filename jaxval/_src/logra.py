"""LoGra projected per-example gradients.

Fast path (``LoGra.grads``): inside one jit-compiled step, every tracked layer call is intercepted; its
input ``x`` is projected right away (``P_in x``) and a zero perturbation is added to its output. One
backward pass of ``Σ_b loss_b`` with respect to the perturbations gives each example's per-token output
cotangents ``dy``; they are projected (``P_out dy``) and each example's block is

    block_b = Σ_t (P_in x_t)(P_out dy_t)ᵀ      (k_in × k_out)

which equals ``P_in (∂loss_b/∂W) P_outᵀ`` because ``∂loss_b/∂W = Σ_t x_t dy_tᵀ``. No weight gradient and
no full per-example gradient is ever formed.

Every compiled use of the step (``LoGra.grads``, logging, curvature statistics, streamed scores) goes
through ``LoGra.compiled_step``: one builder, one cache, with a pure ``reduce`` for what a caller keeps.

Reference path (``explicit_grads``): ``vmap(grad)`` of the per-example loss with respect to the
parameters, then the projection. For tests and tiny models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import graph as nnx_graph

from jaxval._src import autocast, precision
from jaxval._src.batching import batch_size
from jaxval._src.layers import EinsumSpec, Layer, LayerSelector, discover, weight_matrix
from jaxval._src.projection import INITS, Rank, init_projections, resolve_rank

LossFn = Callable[[nnx.Module, Any], jax.Array]
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


def check_independent_examples(model: nnx.Module):
    """Refuse models whose examples interact in the forward pass (BatchNorm in training mode)."""
    for path, m in nnx.iter_modules(model):
        if isinstance(m, nnx.BatchNorm) and not m.use_running_average:
            raise ValueError(
                f"module '{'/'.join(map(str, path))}' is a BatchNorm in training mode: examples interact "
                "through the batch statistics, so per-example gradients are not defined. Put the model in "
                "evaluation mode first (model.eval() or use_running_average=True)"
            )


# ----------------------------------------------------------------------------- projections of x and dy

def _conv_args(module, n: int):
    def tup(v):
        return (int(v),) * n if isinstance(v, int) or v is None else tuple(int(s) for s in v)

    pad = module.padding
    if isinstance(pad, str):
        pad = pad.upper()
    elif isinstance(pad, int):
        pad = [(pad, pad)] * n
    else:
        pad = [(p, p) if isinstance(p, int) else tuple(p) for p in pad]
    return (tup(module.strides or 1), pad, tup(module.input_dilation or 1), tup(module.kernel_dilation or 1))


def _split_bias(layer: Layer, p: jax.Array):
    if layer.has_bias:
        return p[:, :-1], p[:, -1]
    return p, None


def _tokens_by_rows(x: jax.Array, p: jax.Array, dtype: str | None) -> jax.Array:
    """``x [B, T, n] · pᵀ [n, k] -> [B, T, k]`` float32; with ``dtype``, from ``dtype`` operands."""
    if dtype is None:
        return jnp.matmul(x.astype(jnp.float32), p.T, precision=_HI)
    return autocast.product(x, p.T, dtype)


def project_input(layer: Layer, module, x: jax.Array, p_in: jax.Array,
                  spec: EinsumSpec | None = None, dtype: str | None = None) -> jax.Array:
    """``P_in x`` for every token of every example: ``[B, T, k_in]`` (``dtype``: see ``LoGra``'s
    ``compute_dtype``; used for Linear layers)."""
    b = x.shape[0]
    w, pb = _split_bias(layer, p_in)
    k = p_in.shape[0]
    if layer.kind == "embed":
        return jnp.take(p_in.T, x, axis=0).reshape(b, -1, k)
    if layer.kind == "linear":
        a = _tokens_by_rows(x.reshape(b, -1, x.shape[-1]), w, dtype)
        return a if pb is None else a + pb
    x = x.astype(jnp.float32)
    if layer.kind == "linear_general":
        axes = [ax % x.ndim for ax in module.axis]
        rest = [i for i in range(x.ndim) if i not in axes]
        xt = jnp.transpose(x, rest + axes).reshape(b, -1, int(np.prod(module.in_features)))
        a = jnp.matmul(xt, w.T, precision=_HI)
    elif layer.kind == "einsum":
        spec = spec or EinsumSpec(module.einsum_str, module.kernel_shape, layer.name)
        z = _free_letter(spec)
        pw = w.reshape(k, *spec.in_shape)
        a = jnp.einsum(f"{spec.lhs},{z}{''.join(spec.in_axes)}->{''.join(spec.tok_axes)}{z}", x, pw,
                       precision=_HI).reshape(b, -1, k)
    elif layer.kind == "conv":
        n = len(module.kernel_size)
        if x.ndim != n + 2:
            raise ValueError(f"layer '{layer.name}': Conv input must be [B, *spatial, C] with one example "
                             f"axis, got shape {x.shape}")
        kern = jnp.moveaxis(w.reshape(k, *module.kernel_size, module.in_features), 0, -1)
        strides, pad, lhs_dil, rhs_dil = _conv_args(module, n)
        sp = "DHW"[3 - n:] if n <= 3 else None
        if sp is None:
            raise ValueError(f"layer '{layer.name}': Conv with {n} spatial dims is not supported")
        dn = jax.lax.conv_dimension_numbers(x.shape, kern.shape, (f"N{sp}C", f"{sp}IO", f"N{sp}C"))
        a = jax.lax.conv_general_dilated(x, kern, strides, pad, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
                                         dimension_numbers=dn, precision=_HI).reshape(b, -1, k)
    else:  # pragma: no cover
        raise AssertionError(layer.kind)
    return a if pb is None else a + pb


def project_output(layer: Layer, dy: jax.Array, p_out: jax.Array,
                   spec: EinsumSpec | None = None, dtype: str | None = None) -> jax.Array:
    """``P_out dy`` for every token of every example: ``[B, T, k_out]`` (``spec``: einsum layers;
    ``dtype``: Linear layers, see ``LoGra``'s ``compute_dtype``)."""
    b, k = dy.shape[0], p_out.shape[0]
    if layer.kind == "linear" and dtype is not None:
        return _tokens_by_rows(dy.reshape(b, -1, layer.n_out), p_out, dtype)
    dy = dy.astype(jnp.float32)
    if layer.kind == "einsum":
        z = _free_letter(spec)
        pw = p_out.reshape(k, *spec.out_shape)
        return jnp.einsum(f"{spec.out},{z}{''.join(spec.out_axes)}->{''.join(spec.tok_axes)}{z}", dy, pw,
                          precision=_HI).reshape(b, -1, k)
    return jnp.matmul(dy.reshape(b, -1, layer.n_out), p_out.T, precision=_HI)


def _free_letter(spec: EinsumSpec) -> str:
    used = set(spec.lhs + spec.rhs + spec.out)
    return next(c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkjihgfedcba" if c not in used)


# ----------------------------------------------------------------------------- interception

class _Recorder:
    """Per-trace record of tracked layer calls: output shapes (shape pass) or perturbations (run)."""

    def __init__(self, batch: int, eps: Mapping[str, list] | None):
        self.batch = batch
        self.eps = eps
        self.shapes: dict[str, list] = {}
        self.fwd: dict[str, list] = {}
        self.kinds: dict[str, list] = {}

    def out(self, name: str, y: jax.Array, kind: str, fwd_proj: jax.Array, spec) -> jax.Array:
        if y.shape[0] != self.batch:
            raise ValueError(
                f"layer '{name}' produced an output with leading axis {y.shape[0]}, not the batch size "
                f"{self.batch}: LoGra needs every tracked layer to keep the example axis first (do not "
                "fold examples into other axes before a tracked layer)"
            )
        calls = self.kinds.setdefault(name, [])
        i = len(calls)
        calls.append((kind, spec))
        self.fwd.setdefault(name, []).append(fwd_proj)
        if self.eps is None:
            self.shapes.setdefault(name, []).append((jax.ShapeDtypeStruct(y.shape, y.dtype), varying_axes(y)))
            return y
        return y + self.eps[name][i].astype(y.dtype)


class _Tap:
    """Stands in for a tracked layer inside a traced forward pass."""

    def __init__(self, module, layer: Layer, p_in, p_out, rec: _Recorder, compute_dtype: str | None = None):
        self._module, self._layer, self._p_in, self._p_out, self._rec = module, layer, p_in, p_out, rec
        self._dtype = compute_dtype

    def __getattr__(self, name):
        return getattr(self._module, name)

    def __call__(self, x, *args, **kwargs):
        y = autocast.call(self._module, x, self._dtype, *args, **kwargs)
        spec = None
        if self._layer.kind == "einsum":
            es = kwargs.get("einsum_str", args[0] if args else None) or self._module.einsum_str
            spec = EinsumSpec(es, self._module.kernel_shape, self._layer.name)
        if x.shape[0] != self._rec.batch:
            raise ValueError(f"layer '{self._layer.name}' got an input with leading axis {x.shape[0]}, not "
                             f"the batch size {self._rec.batch}; keep the example axis first")
        a = project_input(self._layer, self._module, x, self._p_in, spec, self._dtype)
        return self._rec.out(self._layer.name, y, "call", a, spec)

    def attend(self, query):
        if self._layer.kind != "embed":
            raise AttributeError("attend")
        if self._dtype is not None and autocast.castable(self._module):
            y = autocast.attend(self._module, query, self._dtype)
        else:
            y = self._module.attend(query)
        # y = query · Eᵀ: the roles flip; the query is the output side (features) of W (vocab, features).
        b = jnp.matmul(query.astype(jnp.float32).reshape(query.shape[0], -1, self._layer.n_out),
                       self._p_out.T, precision=_HI)
        return self._rec.out(self._layer.name, y, "attend", b, None)


def _references(model: nnx.Module, targets: Mapping[int, Any]) -> list[tuple[Any, Any, int]]:
    """Every ``(parent, key, id)`` at which a target module is referenced in the model graph."""
    refs, seen, stack = [], set(), [model]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        try:
            items = list(nnx_graph.get_node_impl(node).node_dict(node).items())
        except Exception:  # noqa: BLE001 - leaves and non-graph values
            continue
        for key, child in items:
            if isinstance(key, str) and key.startswith("_pytree__"):
                continue
            if id(child) in targets:
                refs.append((node, key, id(child)))
            elif nnx_graph.is_graph_node(child):
                stack.append(child)
    return refs


def _install(model, refs, taps):
    for parent, key, tid in refs:
        tap = taps[tid]
        if isinstance(parent, (nnx.List, nnx.Dict)) or isinstance(key, int):
            parent[key] = tap
        else:
            object.__setattr__(parent, key, tap)


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


def projected_pairs(graphdef, state, loss_fn: LossFn, layers: Sequence[Layer], projections: Projections,
                    batch, compute_dtype: str | None = None
                    ) -> tuple[jax.Array, dict[str, list[tuple[jax.Array, jax.Array]]]]:
    """Traceable core: per-example losses ``[B]`` and, per layer and call, ``(a [B,T,k_in], s [B,T,k_out],
    cot_is_s)``: ``a = P_in x`` and ``s = P_out dy`` for a call (``cot_is_s`` True); for ``Embed.attend`` the
    roles flip (``a`` = projected cotangent on the vocabulary side, ``cot_is_s`` False). Call inside
    ``jax.jit``. ``compute_dtype="bfloat16"``: every float32 Linear / Embed.attend product of the step in
    bfloat16 with float32 accumulation (``jaxval.autocast``)."""
    b = batch_size(batch)

    def run(eps):
        model = nnx.merge(graphdef, state)
        rec = _Recorder(b, eps)
        mods = {}
        for path, m in nnx.iter_modules(model):
            mods[tuple(path)] = m
        taps = {}
        for layer in layers:
            m = mods[layer.path]
            taps[id(m)] = _Tap(m, layer, *projections[layer.name], rec, compute_dtype)
        if compute_dtype is not None:
            for m in mods.values():
                if id(m) not in taps and autocast.castable(m):
                    taps[id(m)] = autocast.Cast(m, compute_dtype)
        _install(model, _references(model, taps), taps)
        losses = loss_fn(model, batch)
        _check_losses(losses, b)
        return losses, rec

    shape_rec = {}

    def shapes_only():
        losses, rec = run(None)
        shape_rec["rec"], shape_rec["vma"] = rec, varying_axes(losses)
        return losses

    jax.eval_shape(shapes_only)
    rec0 = shape_rec["rec"]
    missing = [l.name for l in layers if l.name not in rec0.shapes]
    if missing:
        raise ValueError(f"tracked layers {missing} were never called by loss_fn (layers must be applied "
                         "through their __call__, or Embed.attend)")
    # Under shard_map a constant zero is device-invariant: its cotangent would be summed over the devices,
    # mixing each example's gradient with the other devices' examples, silently. So the perturbations vary
    # like the output and the losses (a layer fed a constant, e.g. a position embedding, has an invariant
    # output but per-example cotangents).
    eps0 = {name: [_varying_zeros(s, set(vma) | set(shape_rec["vma"])) for s, vma in ss]
            for name, ss in rec0.shapes.items()}

    def total(eps):
        losses, rec = run(eps)
        return losses.sum(), (losses, rec.fwd)

    (_, (losses, fwd)), dys = jax.value_and_grad(total, has_aux=True)(eps0)
    pairs = {}
    for layer in layers:
        p_in, p_out = projections[layer.name]
        lst = []
        for (kind, spec), f, dy in zip(rec0.kinds[layer.name], fwd[layer.name], dys[layer.name]):
            if kind == "call":
                lst.append((f, project_output(layer, dy, p_out, spec, compute_dtype), True))
            else:  # attend: dy lives on the vocabulary (input) side
                a = jnp.matmul(dy.astype(jnp.float32).reshape(b, -1, layer.n_in), p_in.T, precision=_HI)
                lst.append((a, f, False))
        pairs[layer.name] = lst
    return losses, pairs


def blocks_from_pairs(layers: Sequence[Layer], pairs) -> jax.Array:
    """``[B, D]``: per example, ``Σ_calls Σ_t a_t b_tᵀ`` flattened row-major, layers concatenated."""
    out = []
    for layer in layers:
        blk = sum(jnp.einsum("btk,btl->bkl", a, c, precision=_HI) for a, c, _ in pairs[layer.name])
        out.append(blk.reshape(blk.shape[0], -1))
    return jnp.concatenate(out, axis=1)


# ----------------------------------------------------------------------------- public API

class LoGra:
    """LoGra projected per-example gradients of a flax nnx model.

    Args:
      model: the ``nnx.Module`` (its structure fixes the tracked layers; its weights are read again at
        each ``grads`` call).
      loss_fn: ``loss_fn(model, batch) -> [B]`` per-example losses.
      rank: int, ``(k_in, k_out)``, a ``{layer name: rank, "default": rank}`` mapping, or None (full);
        clipped to each layer's size.
      init: ``gaussian`` | ``rademacher`` | ``orthogonal`` | ``identity`` (``pca``: pass ``projections``
        from ``jaxval.pca_projections``).
      seed: projection seed; a layer's projection depends only on ``(seed, layer name)``.
      layers: layer selector (regex, list of regexes, or callable ``(name, module) -> bool``).
      types: optional tuple of layer types to keep.
      projections: explicit ``{name: (P_in, P_out)}``, overriding ``init``.
      compute_dtype: None (float32) or ``"bfloat16"``: the step's Linear / Embed.attend products in
        bfloat16 with float32 accumulation (``jaxval.autocast``: ~5x faster products on CPUs with
        bfloat16 units and on accelerators; gradients to ~1e-2 relative instead of float32 accuracy).

    Attributes:
      layers: tuple of ``Layer`` records (``.name .n_in .n_out .k_in .k_out``) in flat-vector order.
      projections: ``{name: (P_in [k_in, n_in], P_out [k_out, n_out])}``.
      dim: ``D = Σ k_in·k_out``.
    """

    def __init__(self, model: nnx.Module, loss_fn: LossFn, rank: Rank | Mapping | None = 64,
                 init: str = "gaussian", seed: int = 0, layers: LayerSelector = None,
                 types: Sequence[type] | None = None, projections: Projections | None = None,
                 compute_dtype: str | None = None):
        self.compute_dtype = autocast.resolve(compute_dtype)
        if init not in INITS and not (init == "pca" and projections is not None):
            if init == "pca":
                raise ValueError("init='pca' needs fitted projections: pass "
                                 "projections=jaxval.pca_projections(...)")
            raise ValueError(f"unknown projection init {init!r}; choose one of {INITS + ('pca',)}")
        found = discover(model, layers, types)
        recs = []
        for layer, _ in found:
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
        self.loss_fn = loss_fn
        self.init, self.seed, self.rank = init, seed, rank
        self.dim = int(sum(l.dim for l in self.layers))
        self._compiled: dict[Any, Callable] = {}
        self._cast: tuple | None = None

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

    def compiled_step(self, graphdef, reduce: Reduce | None = None, *, sample_fn: Callable | None = None,
                      grads: bool = True, dtype: Any = None) -> Callable:
        """THE compiled LoGra step (one builder, one cache on this object):

            step(state, batch, projections, keys=None, aux=None) -> (g [B, D] | None, losses [B], out)

        ``state``: ``nnx.split(model)[1]`` (or ``step_state`` of it). ``reduce(layers, losses, pairs, g, aux)``:
        a pure, traceable function of the step's per-layer pairs (see ``projected_pairs``), its gradients
        ``g [B, D]`` float32 and the caller's ``aux`` pytree, giving ``out`` (None without ``reduce``);
        statistics, accumulators and contractions with query gradients are such reductions. The cache key
        is ``(graphdef, reduce, sample_fn, grads, dtype)``: pass module-level functions (or keep the
        callable), not a fresh lambda per call. ``sample_fn(model, batch, keys)``: the step runs on the
        batch it returns (labels drawn from the model; ``keys``: one PRNG key per example).
        ``grads=False``: ``g`` is not returned (XLA then forms it only where ``reduce`` reads it).
        ``dtype``: ``g`` cast on the device (e.g. a store's bfloat16)."""
        key = (graphdef, reduce, sample_fn, bool(grads), None if dtype is None else jnp.dtype(dtype).name)
        fn = self._compiled.get(key)
        if fn is not None:
            return fn
        layers, loss_fn, compute_dtype = self.layers, self.loss_fn, self.compute_dtype
        out_dtype = None if dtype is None else jnp.dtype(dtype)

        @jax.jit
        def fn(state, batch, projections, keys=None, aux=None):
            if sample_fn is not None:
                batch = sample_fn(nnx.merge(graphdef, state), batch, keys)
            losses, pairs = projected_pairs(graphdef, state, loss_fn, layers, projections, batch, compute_dtype)
            g = blocks_from_pairs(layers, pairs)  # dead code for XLA where nothing reads it
            out = None if reduce is None else reduce(layers, losses, pairs, g, aux)
            if not grads:
                return None, losses, out
            return (g if out_dtype is None or out_dtype == g.dtype else g.astype(out_dtype)), losses, out

        self._compiled[key] = fn
        return fn

    def step_for(self, model: nnx.Module, reduce: Reduce | None = None, **kw) -> tuple[Callable, Any]:
        """``(compiled_step(graphdef, reduce, **kw), step_state)`` for ``model``; refuses models whose
        examples interact (checked once per graphdef: BatchNorm's mode is static, part of the graphdef)."""
        graphdef, state = nnx.split(model)
        if not any(k[0] == graphdef for k in self._compiled):
            check_independent_examples(model)
        return self.compiled_step(graphdef, reduce, **kw), self.step_state(model, state)

    def grads_and_losses(self, model: nnx.Module, batch) -> tuple[jax.Array, jax.Array]:
        """``([B, D] float32 projected gradients, [B] losses)``."""
        batch_size(batch)
        step, state = self.step_for(model)
        g, losses, _ = step(state, batch, self.projections)
        return g, losses

    def step_state(self, model: nnx.Module, state):
        """The state ``compiled_step`` wants: as is, or with Linear kernels already in ``compute_dtype``
        (converted once per set of weights: the last conversion is kept while its weights are)."""
        if self.compute_dtype is None:
            return state
        leaves = jax.tree.leaves(state)
        key = tuple(map(id, leaves))
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, leaves, autocast.cast_kernels(model, state, self.compute_dtype))
        return self._cast[2]

    def grads(self, model: nnx.Module, batch) -> jax.Array:
        """``[B, D]`` float32 projected per-example gradients (jit-compiled fast path)."""
        return self.grads_and_losses(model, batch)[0]


def explicit_grads(model: nnx.Module, loss_fn: LossFn, projections: Projections, batch) -> jax.Array:
    """Reference ``[B, D]``: ``vmap(grad)`` of each example's loss w.r.t. the parameters, then
    ``P_in (∂loss_b/∂W) P_outᵀ`` per layer, in the order of ``projections``. Forms full per-example
    gradients: for tests and tiny models only."""
    b = batch_size(batch)
    names = list(projections)
    found = {l.name: (l, m) for l, m in discover(model, lambda n, m: n in projections)}
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"no supported layer named {missing} in the model")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def single(p, example):
        m = nnx.merge(graphdef, p, rest)
        losses = loss_fn(m, jax.tree_util.tree_map(lambda a: a[None], example))
        _check_losses(losses, 1)
        return losses[0]

    per = jax.vmap(jax.grad(single), in_axes=(None, 0))(params, batch)
    flat = {tuple(path): v for path, v in nnx.to_flat_state(per)}

    def leaf(path):
        v = flat[path]
        return v[...] if hasattr(v, "__getitem__") and not isinstance(v, jax.Array) else v

    out = []
    for name in names:
        layer, module = found[name]
        kname = "embedding" if layer.kind == "embed" else "kernel"
        kern = leaf(layer.path + (kname,))
        bias = leaf(layer.path + ("bias",)) if layer.has_bias else None
        w = jax.vmap(lambda k, bb: weight_matrix(layer, module, k, bb))(kern, bias) if layer.has_bias else \
            jax.vmap(lambda k: weight_matrix(layer, module, k, None))(kern)
        p_in, p_out = (jnp.asarray(p, jnp.float32) for p in projections[name])
        blk = jnp.einsum("kn,bnm,lm->bkl", p_in, w.astype(jnp.float32), p_out, precision=_HI)
        out.append(blk.reshape(b, -1))
    return jnp.concatenate(out, axis=1)


def model_fingerprint(model: nnx.Module) -> str:
    """sha256 over the parameter shapes, dtypes and bytes (identifies the checkpoint a log came from)."""
    h = hashlib.sha256()
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = np.asarray(v[...] if not isinstance(v, jax.Array) else v)
        h.update(json.dumps([list(map(str, path)), list(arr.shape), str(arr.dtype)]).encode())
        h.update(arr.tobytes())
    return h.hexdigest()
