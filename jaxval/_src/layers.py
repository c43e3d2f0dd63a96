"""Layer records, layer names, and the module-type view of a flax nnx model's layers.

LoGra finds its layers in the traced computation (``jaxval._src.capture``). This module gives the
``Layer`` record, the naming rule (a parameter leaf's pytree path joined with "/", a trailing
``kernel`` / ``embedding`` / ``weight`` dropped; a slice of a stacked leaf appends its index), and the
layers of an nnx model read from its module types, for a LoGra built without an example batch (the traced
computation is then checked against them at the first step).

A layer's parameter matrix ``W`` has shape ``(n_in, n_out)``:

=================  =================================================================
``nnx.Linear``     kernel ``(in, out)``
``nnx.LinearGeneral``  kernel ``(*in_features, *out_features)`` → ``(prod(in), prod(out))``
``nnx.Einsum``     kernel axes split into input axes (shared with the lhs operand) and
                   output axes (shared with the result), each in kernel order
``nnx.Embed``      embedding ``(vocab, features)``
``nnx.Conv``       kernel ``(*window, c_in, c_out)`` → ``(prod(window)·c_in, c_out)``
=================  =================================================================

A bias, when present, is appended as the last row of ``W`` (the input gets a constant 1), so
``n_in`` counts it.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import graph as nnx_graph

SUPPORTED_TYPES: tuple[type, ...] = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed, nnx.Conv)

LayerSelector = None | str | Sequence[str] | Callable[[str, nnx.Module], bool]


@dataclasses.dataclass(frozen=True)
class Layer:
    """One tracked layer. ``name`` is the nnx path joined with "/"."""

    name: str
    path: tuple
    kind: str  # "linear" (any product) | "embed" (a gathered table, maybe also a tied head) | "conv"
    n_in: int
    n_out: int
    has_bias: bool
    k_in: int = 0
    k_out: int = 0
    leaf: int = -1        # index of the parameter leaf (traced layers)
    index: tuple = ()     # the slice of a stacked leaf

    @property
    def dim(self) -> int:
        return self.k_in * self.k_out

    def replace(self, **kw) -> "Layer":
        return dataclasses.replace(self, **kw)


class EinsumSpec:
    """The parsed ``lhs,rhs->out`` string of an ``nnx.Einsum`` layer, split for LoGra."""

    def __init__(self, einsum_str: str, kernel_shape: Sequence[int], name: str = "?"):
        s = einsum_str.replace(" ", "")
        if "..." in s or "->" not in s or s.count(",") != 1:
            raise ValueError(
                f"layer '{name}': einsum '{einsum_str}' is not supported by LoGra; use an explicit "
                "'lhs,rhs->out' with two operands and no ellipsis"
            )
        operands, out = s.split("->")
        lhs, rhs = operands.split(",")
        in_axes = [c for c in rhs if c in lhs and c not in out]
        out_axes = [c for c in rhs if c in out and c not in lhs]
        shared = [c for c in rhs if c in lhs and c in out]
        if shared or len(in_axes) + len(out_axes) != len(rhs):
            raise ValueError(
                f"layer '{name}': einsum '{einsum_str}' has kernel axes {shared or list(rhs)} that are "
                "both batched and contracted; LoGra needs each kernel axis to be either an input axis "
                "(contracted with the input) or an output axis"
            )
        tok_in = [c for c in lhs if c not in rhs]
        tok_out = [c for c in out if c not in rhs]
        if sorted(tok_in) != sorted(tok_out) or not tok_in or tok_in[0] != lhs[0]:
            raise ValueError(
                f"layer '{name}': einsum '{einsum_str}': the input's non-kernel axes {tok_in} must be "
                f"the result's non-kernel axes {tok_out}, the first one being the example axis"
            )
        size = dict(zip(rhs, kernel_shape))
        self.lhs, self.rhs, self.out = lhs, rhs, out
        self.in_axes, self.out_axes, self.tok_axes = in_axes, out_axes, tok_in
        self.in_shape = tuple(size[c] for c in in_axes)
        self.out_shape = tuple(size[c] for c in out_axes)


def _kind(module) -> str | None:
    for t, k in ((nnx.LinearGeneral, "linear_general"), (nnx.Linear, "linear"), (nnx.Einsum, "einsum"),
                 (nnx.Embed, "embed"), (nnx.Conv, "conv")):
        if isinstance(module, t):
            return k
    return None


def layer_record(name: str, path: tuple, module) -> Layer:
    """The matrix view ``(n_in, n_out)`` of a supported module, refusing what LoGra cannot handle."""
    kind = _kind(module)
    if kind is None:
        raise TypeError(f"layer '{name}' is a {type(module).__name__}, which LoGra does not support")
    if kind == "linear":
        bias = module.bias is not None
        return Layer(name, path, kind, module.in_features + bias, module.out_features, bias)
    if kind == "linear_general":
        if module.batch_axis:
            raise ValueError(f"layer '{name}': LinearGeneral with batch_axis is not supported by LoGra")
        bias = module.bias is not None
        return Layer(name, path, kind, int(np.prod(module.in_features)) + bias,
                     int(np.prod(module.out_features)), bias)
    if kind == "einsum":
        spec = EinsumSpec(module.einsum_str, module.kernel_shape, name)
        bias = module.bias is not None
        if bias and set(spec.out[len(spec.out) - len(module.bias.shape):]) != set(spec.out_axes):
            raise ValueError(
                f"layer '{name}': einsum bias of shape {module.bias.shape} does not span exactly the "
                f"output axes {spec.out_axes}; LoGra cannot treat it as an extra input row"
            )
        return Layer(name, path, kind, int(np.prod(spec.in_shape)) + bias, int(np.prod(spec.out_shape)), bias)
    if kind == "embed":
        return Layer(name, path, kind, module.num_embeddings, module.features, False)
    # conv
    if module.feature_group_count != 1:
        raise ValueError(f"layer '{name}': grouped convolutions (feature_group_count > 1) are not supported")
    if module.mask is not None:
        raise ValueError(f"layer '{name}': masked convolution kernels are not supported")
    if isinstance(module.padding, str) and module.padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
        raise ValueError(
            f"layer '{name}': Conv padding '{module.padding}' is not supported; use 'SAME', 'VALID' or "
            "explicit integer padding"
        )
    bias = module.bias is not None
    n_in = int(np.prod(module.kernel_size)) * module.in_features
    return Layer(name, path, kind, n_in + bias, module.out_features, bias)


def path_name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


STRIP = ("kernel", "embedding", "weight")


def leaf_name(path: tuple) -> str:
    """A layer's name from its parameter leaf's path (``l1/kernel`` -> ``l1``; a root ``kernel`` stays)."""
    path = tuple(path)
    if len(path) > 1 and path[-1] in STRIP:
        path = path[:-1]
    return path_name(path)


def matches(selector, name: str, module=None) -> bool:
    return _matches(selector, name, module)


def _owns_params(module) -> bool:
    """True if the module holds ``nnx.Param`` variables directly (not through a submodule)."""
    try:
        items = nnx_graph.get_node_impl(module).node_dict(module).values()
    except Exception:  # noqa: BLE001 - not a graph node
        return False
    return any(isinstance(v, nnx.Param) for v in items)


def _matches(selector: LayerSelector, name: str, module) -> bool:
    if selector is None:
        return True
    if callable(selector):
        return bool(selector(name, module))
    patterns = [selector] if isinstance(selector, str) else list(selector)
    return any(p == name or re.fullmatch(p, name) or re.search(p, name) for p in patterns)


def _stack_depth(layer: Layer, module) -> int:
    """Leading axes of a module's parameters beyond its layer type's (an ``nnx.vmap`` stack)."""
    kern = module_kernel(module)
    want = {"linear": 2, "embed": 2}.get(layer.kind)
    if layer.kind == "linear_general":
        want = len(module.in_features if isinstance(module.in_features, tuple) else (module.in_features,)) + \
            len(module.out_features if isinstance(module.out_features, tuple) else (module.out_features,))
    elif layer.kind == "einsum":
        want = len(module.kernel_shape)
    elif layer.kind == "conv":
        want = len(module.kernel_size) + 2
    return max(kern.ndim - want, 0)


def _static_record(name, path, module) -> list[Layer]:
    if isinstance(module, nnx.Linear) and module.kernel[...].ndim > 2:
        depth = module.kernel[...].ndim - 2
        stack = module.kernel[...].shape[:depth]
        kin, kout = module.kernel[...].shape[depth:]
        bias = module.bias is not None
        return [Layer("/".join([name] + [str(i) for i in ix]), path, "linear", kin + bias, kout, bias,
                      index=tuple(int(i) for i in ix)) for ix in np.ndindex(*stack)]
    rec = layer_record(name, path, module)
    return [rec.replace(kind="linear" if rec.kind in ("linear_general", "einsum") else rec.kind)]


def _param_of(module, attr, wrt) -> bool:
    v = getattr(module, attr, None)
    if v is None:
        return False
    return nnx.filterlib.to_predicate(wrt)((), v) if wrt is not None else isinstance(v, nnx.Param)


def discover(model: nnx.Module, layers: LayerSelector = None,
             types: Sequence[type] | None = None, wrt=None) -> list[tuple[Layer, Any]]:
    """The layers of ``model`` read from its module types (``Linear`` incl. ``nnx.vmap`` stacks,
    ``LinearGeneral``, ``Einsum``, ``Embed``, ``Conv``, ``LoRA`` adapters), the root module included.

    Args:
      model: an ``nnx.Module``.
      layers: None (every layer), a regex / list of regexes matched against layer names (``re.search``;
        an exact name also matches), or a callable ``(name, module) -> bool``.
      types: optional tuple of nnx layer types to keep (e.g. ``(nnx.Linear,)``).
      wrt: nnx filter of the tracked parameters (default ``nnx.Param``).

    Returns:
      ``[(Layer, module), ...]`` in model traversal order (k_in/k_out still 0).

    Raises:
      ValueError: when a selected module owns parameters but is not a supported layer, or when no
        supported layer is selected.
    Unsupported parameterised modules that are not selected are reported in one warning.
    """
    found, uncovered = [], []
    pred = nnx.filterlib.to_predicate(nnx.Param if wrt is None else wrt)
    for path, module in nnx.iter_modules(model):
        path = tuple(path)
        owned = [k for k, v in _own_vars(module) if pred((), v)]
        if not owned:
            continue
        tname = type(module).__name__
        if isinstance(module, nnx.LoRA) or (isinstance(module, nnx.Linear) and "kernel" not in owned):
            lora = module if isinstance(module, nnx.LoRA) else None
            if lora is None:
                uncovered.append((path_name(path) or "<root>", tname))
                continue
            for attr in ("lora_a", "lora_b"):
                if attr not in owned:
                    continue
                arr = getattr(lora, attr)[...]
                name = path_name(path + (attr,))
                if arr.ndim == 2 and _matches(layers, name, module) and (types is None or isinstance(module, tuple(types))):
                    found.append((Layer(name, path + (attr,), "linear", arr.shape[0], arr.shape[1], False), module))
            continue
        kind = _kind(module)
        name = leaf_name(path + ("kernel" if kind != "embed" else "embedding",)) if path else \
            ("embedding" if kind == "embed" else "kernel")
        selected = _matches(layers, name, module) and (types is None or isinstance(module, tuple(types)))
        if kind is None:
            if selected and layers is not None:
                raise ValueError(
                    f"layer '{path_name(path) or '<root>'}' ({tname}) was selected but LoGra does not "
                    f"support it; supported types: {[t.__name__ for t in SUPPORTED_TYPES]}"
                )
            uncovered.append((path_name(path) or "<root>", tname))
            continue
        if selected:
            for rec in _static_record(name, path, module):
                found.append((rec, module))
        else:
            uncovered.append((name, tname))
    if not found:
        raise ValueError(
            "no supported layer selected in the model (LoGra handles "
            f"{[t.__name__ for t in SUPPORTED_TYPES]}); selector={layers!r}, types={types!r}; for other "
            "models pass batch= to LoGra (layers found in the traced computation)"
        )
    if uncovered:
        listing = ", ".join(f"{n} ({t})" for n, t in uncovered[:20])
        more = f" and {len(uncovered) - 20} more" if len(uncovered) > 20 else ""
        warnings.warn(f"jaxval: parameters of these modules are not tracked by LoGra: {listing}{more}",
                      stacklevel=3)
    return found


def _own_vars(module):
    try:
        items = nnx_graph.get_node_impl(module).node_dict(module).items()
    except Exception:  # noqa: BLE001 - not a graph node
        return []
    return [(k, v) for k, v in items if isinstance(v, nnx.Variable)]


def find_module(model: nnx.Module, path: tuple):
    for p, m in nnx.iter_modules(model):
        if tuple(p) == tuple(path):
            return m
    raise KeyError(f"no module at path {path_name(path)!r}")


def weight_matrix(layer: Layer, module, kernel=None, bias=None) -> jnp.ndarray:
    """``W (n_in, n_out)`` of ``module`` (or of the given kernel/bias arrays shaped like its params)."""
    kernel = module_kernel(module) if kernel is None else kernel
    if layer.has_bias and bias is None:
        bias = module.bias[...]
    if layer.kind == "einsum":
        spec = EinsumSpec(module.einsum_str, module.kernel_shape, layer.name)
        order = [spec.rhs.index(c) for c in spec.in_axes + spec.out_axes]
        w = jnp.transpose(kernel, order).reshape(-1, int(np.prod(spec.out_shape)))
        if layer.has_bias:
            tail = spec.out[len(spec.out) - bias.ndim:]
            bias = jnp.transpose(bias, [tail.index(c) for c in spec.out_axes])
    else:
        w = kernel.reshape(-1, layer.n_out)
    if layer.has_bias:
        w = jnp.concatenate([w, bias.reshape(1, -1)], axis=0)
    return w


def module_kernel(module):
    return module.embedding[...] if isinstance(module, nnx.Embed) else module.kernel[...]
