"""Building an nnx model directly from a dict of pretrained weights (no random initialisation)."""

from __future__ import annotations

from typing import Callable, TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def module_from_weights(make: Callable[[], M], weights: dict[str, np.ndarray], dtype) -> M:
    """``make()``'s module holding ``weights`` (``"a/b/c"`` nnx path -> array), cast to ``dtype``.

    The module is traced abstractly (``nnx.eval_shape``), so nothing is randomly initialised. Every
    parameter must be given, with its exact shape; a weight the module does not use is an error."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    pure = nnx.to_pure_dict(state)
    dt = jnp.dtype(dtype)
    seen = set()

    def fill(tree, prefix):
        for k, v in tree.items():
            name = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict):
                fill(v, name)
                continue
            if name not in weights:
                raise KeyError(f"no weight given for parameter {name!r}")
            w = np.asarray(weights[name])
            if tuple(w.shape) != tuple(v.shape):
                raise ValueError(f"weight {name!r} has shape {w.shape}, the model expects {tuple(v.shape)}")
            tree[k] = jnp.asarray(w, dt)
            seen.add(name)

    fill(pure, "")
    extra = sorted(set(weights) - seen)
    if extra:
        raise ValueError(f"weights not used by the model: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def require_positive(cfg, names) -> None:
    """Raise ``ValueError`` naming the first of ``cfg``'s fields ``names`` that is below 1."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{type(cfg).__name__}.{name} must be >= 1, got {getattr(cfg, name)}")


def optional_module(name: str, extra: str = "llm"):
    """``import name`` for an optional dependency; a clear error naming the pip extra when it is missing."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"{name} is needed here but not installed: pip install 'jaxval[{extra}]'") from e
