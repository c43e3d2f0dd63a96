"""Mixed precision for the LoGra step: bfloat16 matrix products with float32 accumulation.

``LoGra(..., compute_dtype="bfloat16")`` runs every ``nnx.Linear`` call and every ``nnx.Embed.attend``
(tied vocabulary heads) of the traced step as a product of bfloat16 operands with float32 accumulation
and a float32 result, forward and backward (the output cotangent is rounded to bfloat16 for the
input-gradient product, as PyTorch's autocast does); everything else (norms, activations, softmax,
the loss, LoGra's projections and per-example blocks) stays float32. No weight gradient is formed: the
custom VJP returns a zero cotangent for the weight, which the compiler removes.

Why: XLA:CPU runs ``dot(bf16, bf16) -> f32`` on the CPU's bfloat16 units (AMX / AVX512-BF16): a
2048×1024×1024 product took 2.7 ms (1.6 TFLOP/s) vs 13.8 ms in float32 on the 2-core benchmark VM,
while ``dot(bf16, bf16) -> bf16`` and mixed ``f32 × bf16`` products run no faster than float32. On GPUs
and TPUs bfloat16 is the usual fast path anyway.

What it costs: the per-example gradients come from bfloat16-rounded activations, weights and
cotangents (relative error ~1e-2 per gradient, not 1e-7); use it where the log is stored in bfloat16
anyway and rankings, not last digits, are the product. The default (``compute_dtype=None``) is float32.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

COMPUTE_DTYPES = ("float32", "bfloat16")


def resolve(compute_dtype) -> str | None:
    """None / "float32" -> None (plain float32); "bfloat16" (or jnp.bfloat16) -> "bfloat16"."""
    if compute_dtype is None:
        return None
    name = jnp.dtype(compute_dtype).name if not isinstance(compute_dtype, str) else compute_dtype
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES} or None; got {compute_dtype!r}")
    return None if name == "float32" else name


def product(x: jax.Array, w: jax.Array, dtype: str) -> jax.Array:
    """``x [..., n] · w [n, m] -> [..., m]`` float32, from ``dtype`` operands (no custom VJP)."""
    return jax.lax.dot_general(x.astype(dtype), w.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, dtype: str) -> jax.Array:
    """:func:`product` whose VJP is also a ``dtype`` product and forms no weight gradient."""
    return product(x, w, dtype)


def _matmul_fwd(x, w, dtype):
    wc = w.astype(dtype)
    return product(x, wc, dtype), (wc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _matmul_bwd(dtype, res, ct):
    wc, x_tag, w_tag = res
    return product(ct, wc.T, dtype).astype(x_tag.dtype), jnp.zeros(wc.shape, w_tag.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def castable(module) -> bool:
    """Modules whose products this module replaces: float32 ``nnx.Linear`` and ``nnx.Embed``."""
    if isinstance(module, nnx.Linear):
        return module.dtype in (None, jnp.float32) and module.kernel[...].ndim == 2
    return isinstance(module, nnx.Embed) and module.dtype in (None, jnp.float32)


def linear(module: nnx.Linear, x: jax.Array, dtype: str) -> jax.Array:
    y = matmul(x, module.kernel[...], dtype)
    if module.bias is not None:
        y = y + module.bias[...].astype(jnp.float32)
    return y


def attend(module: nnx.Embed, query: jax.Array, dtype: str) -> jax.Array:
    return matmul(query, module.embedding[...].T, dtype)


class Cast:
    """Stands in for an untracked ``nnx.Linear`` / ``nnx.Embed`` inside the traced step."""

    def __init__(self, module, dtype: str):
        self._module, self._dtype = module, dtype

    def __getattr__(self, name):
        return getattr(self._module, name)

    def __call__(self, x, *args, **kwargs):
        return call(self._module, x, self._dtype, *args, **kwargs)

    def attend(self, query):
        if not isinstance(self._module, nnx.Embed):
            raise AttributeError("attend")
        return attend(self._module, query, self._dtype)


def cast_kernels(model: nnx.Module, state, dtype: str | None):
    """``state`` (``nnx.split(model)[1]``) with every castable Linear kernel stored in ``dtype``.

    The step would otherwise convert each float32 kernel on every call (SmolLM2-135M: ~100 ms of a
    1 s step on 2 cores); the products read the kernels in ``dtype`` either way, so results are
    identical. Embeddings stay float32 (their rows feed the float32 residual stream)."""
    if dtype is None:
        return state
    paths = {tuple(path) + ("kernel",) for path, m in nnx.iter_modules(model)
             if isinstance(m, nnx.Linear) and castable(m)}
    flat = nnx.to_flat_state(state)
    leaves = [(path, v.replace(v.get_value().astype(dtype)) if tuple(path) in paths else v) for path, v in flat]
    return nnx.from_flat_state(leaves)


def call(module, x, dtype: str | None, *args, **kwargs):
    """``module(x, ...)`` with its product in ``dtype`` where it is a float32 Linear (else as is)."""
    if dtype is not None and not args and not kwargs and isinstance(module, nnx.Linear) and castable(module):
        return linear(module, x, dtype)
    return module(x, *args, **kwargs)
