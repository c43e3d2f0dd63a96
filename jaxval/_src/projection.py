"""LoGra projection matrices, seeded per layer.

Each layer gets ``P_in [k_in, n_in]`` and ``P_out [k_out, n_out]``. The PRNG key of a layer is derived
from ``(seed, layer name)`` only, so a layer's projection does not depend on which other layers are
tracked, on the device count or on the process.

Initialisers (``k`` is the projection's row count, ``n`` its column count):

- ``gaussian``: entries ``N(0, 1/k)``, so ``E[(Pa)·(Pb)] = a·b``.
- ``rademacher``: entries ``±1/sqrt(k)`` with equal probability (same expectation property).
- ``orthogonal``: orthonormal rows scaled by ``sqrt(n/k)``, so ``E‖Pa‖² = ‖a‖²`` for a random
  direction; at full rank (``k = n``) it is an exact isometry.
- ``identity``: the first ``k`` rows of the identity (full rank: the exact per-example gradient).
- ``pca`` is fitted from data (see ``jaxval.precondition.pca_projections``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxval._src.layers import Layer

INITS = ("gaussian", "rademacher", "orthogonal", "identity")

Rank = int | tuple[int, int]


def layer_key(seed: int, name: str, side: int) -> jax.Array:
    """A key from ``(seed, layer name, side)``; side 0 = input, 1 = output."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    h = int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
    key = jax.random.fold_in(jax.random.key(int(seed)), h)
    return jax.random.fold_in(key, side)


def projection_matrix(init: str, key: jax.Array, k: int, n: int) -> jax.Array:
    """One ``[k, n]`` float32 projection."""
    if init == "gaussian":
        return jax.random.normal(key, (k, n), jnp.float32) / jnp.sqrt(jnp.float32(k))
    if init == "rademacher":
        return jax.random.rademacher(key, (k, n), jnp.float32) / jnp.sqrt(jnp.float32(k))
    if init == "orthogonal":
        a = jax.random.normal(key, (max(n, k), min(n, k)), jnp.float32)
        q, r = jnp.linalg.qr(a)
        q = q * jnp.sign(jnp.diagonal(r))[None, :]  # unique decomposition
        rows = q.T if k <= n else q  # [k, n] with orthonormal rows (k <= n always after clipping)
        return rows * jnp.sqrt(jnp.float32(n) / k)
    if init == "identity":
        return jnp.eye(k, n, dtype=jnp.float32)
    raise ValueError(f"unknown projection init {init!r}; choose one of {INITS + ('pca',)}")


def resolve_rank(rank: Rank | Mapping[str, Rank] | None, layer: Layer) -> tuple[int, int]:
    """``(k_in, k_out)`` for a layer, clipped to its size. ``None`` means full rank."""
    if isinstance(rank, Mapping):
        rank = next((r for pat, r in rank.items() if pat == layer.name), rank.get("default"))
    if rank is None:
        return layer.n_in, layer.n_out
    if isinstance(rank, int):
        k_in = k_out = rank
    elif isinstance(rank, Sequence) and len(rank) == 2:
        k_in, k_out = rank
    else:
        raise ValueError(f"rank must be an int or a pair (k_in, k_out), got {rank!r}")
    for k in (k_in, k_out):
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ValueError(f"rank must be a positive int (or a pair of them), got {rank!r}")
    return min(k_in, layer.n_in), min(k_out, layer.n_out)


def init_projections(layers: Sequence[Layer], init: str = "gaussian",
                     seed: int = 0) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{name: (P_in [k_in, n_in], P_out [k_out, n_out])}`` for layers whose k_in/k_out are set."""
    if init not in INITS:
        raise ValueError(f"unknown projection init {init!r}; choose one of {INITS + ('pca',)}")
    return {
        l.name: (projection_matrix(init, layer_key(seed, l.name, 0), l.k_in, l.n_in),
                 projection_matrix(init, layer_key(seed, l.name, 1), l.k_out, l.n_out))
        for l in layers
    }
