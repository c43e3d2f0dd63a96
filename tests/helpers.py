"""Builders and references that a test module and the subprocesses it starts both need.

A subprocess script imports them from here (``sys.path.insert(0, tests_dir); from helpers import ...``), never
from the test module itself (no private names across modules; test modules never import each other). Only numpy,
JAX, flax and jaxval are imported, at call time, so that importing this module is cheap.
"""

import warnings

import numpy as np


# ------------------------------------------------------------------------------------ tests/test_pipeline.py

CRASH_ROWS = 4096       # rows of crash_setup's dataset: 64 blocks of 64; a killed child logs at most ~10


def small_mlp(n=200, seed=0, sizes=(8, 16, 4), rank=4, logra_seed=0):
    """A small MLP, its LoGra and ``n`` random examples: ``(model, logra, data)``."""
    from flax import nnx

    import jaxval as jv
    from jaxval.models import mlp

    model = mlp.MLP(sizes, rngs=nnx.Rngs(seed))
    logra = jv.LoGra(model, mlp.loss_fn, rank=rank, seed=logra_seed)
    rng = np.random.default_rng(seed)
    data = {"x": rng.normal(size=(n, sizes[0])).astype(np.float32),
            "y": rng.integers(0, sizes[-1], n).astype(np.int32)}
    return model, logra, data


def crash_setup(n=CRASH_ROWS):
    """A tiny token model whose logging takes a second or two on a busy 2-core machine:
    ``(model, logra, data, ids)``."""
    from flax import nnx

    import jaxval as jv
    from jaxval.models import token_mlp

    model = token_mlp.TokenMLP(vocab_size=64, d_model=64, n_block=2, hidden=256, rngs=nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logra = jv.LoGra(model, token_mlp.loss_fn, rank=8)
    rng = np.random.default_rng(0)
    data = {"tokens": rng.integers(0, 64, (n, 32)).astype(np.int32), "mask": np.ones((n, 32), np.float32)}
    ids = [f"seq-{i:05d}" for i in range(n)]
    return model, logra, data, ids


# ------------------------------------------------------------------------------------ tests/test_influence.py

def spd(d, seed):
    """A random symmetric positive definite ``d × d`` matrix (float64), eigenvalues in about [1, 5]."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d))
    return A @ A.T / d + np.eye(d)


class SolvePrecond:
    """H⁻¹ g by solving with an explicit SPD matrix H (pure jax, traceable)."""

    def __init__(self, H):
        import jax.numpy as jnp

        self.H = jnp.asarray(H, jnp.float32)

    def apply(self, g):
        import jax.numpy as jnp

        return jnp.linalg.solve(self.H, g.T).T


def influence_reference(q, z, H=None, mode="dot"):
    """Scores of queries ``q`` against rows ``z`` in float64 numpy (``H``: the preconditioner's matrix)."""
    q, z = q.astype(np.float64), z.astype(np.float64)
    Hinv = np.eye(q.shape[1]) if H is None else np.linalg.inv(H)
    s = q @ Hinv @ z.T
    qs = np.einsum("qd,de,qe->q", q, Hinv, q)
    zs = np.einsum("nd,de,ne->n", z, Hinv, z)
    if mode == "dot":
        return s
    if mode == "cosine":
        return s / np.sqrt(qs)[:, None] / np.sqrt(zs)[None, :]
    if mode == "relative":
        return s / np.sqrt(zs)[None, :]
    if mode == "l2":
        return s - 0.5 * zs[None, :]
    raise ValueError(mode)
