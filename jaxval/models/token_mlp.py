"""Token MLP language model: the 2.6M-parameter "token model" used as a CPU speed reference.

Embed(vocab, d) -> n_block pre-LayerNorm residual MLP blocks (Linear d->hidden, GELU,
Linear hidden->d) -> final LayerNorm -> Linear(d, vocab). There is no mixing across positions:
each token predicts the next one from itself. With the defaults (vocab 1000, d 256, 4 blocks,
hidden 1024 = 4*d) the model has 2,617,832 parameters (≈2.6M, matching NOTES.md).

Batch and loss are those of :mod:`jaxval.models.gpt`:
``{"tokens": int [B, T], "mask": float [B, T]}``,
per-example SUM of next-token cross-entropies over target positions with ``mask[:, 1:] == 1``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxval.models.gpt import lm_loss_fn, param_count  # noqa: F401  (param_count re-exported)


class ResidualMLP(nnx.Module):
    """x + Linear(hidden, d)(gelu(Linear(d, hidden)(LayerNorm(x)))). x [B, T, d] -> [B, T, d]."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
        self.ln = nnx.LayerNorm(d_model, epsilon=1e-5, rngs=rngs)
        self.fc = nnx.Linear(d_model, hidden, rngs=rngs)
        self.proj = nnx.Linear(hidden, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.proj(nnx.gelu(self.fc(self.ln(x))))


class TokenMLP(nnx.Module):
    """``__call__``: tokens int [B, T] -> logits [B, T, vocab_size]."""

    def __init__(
        self,
        vocab_size: int = 1000,
        d_model: int = 256,
        n_block: int = 4,
        hidden: int = 1024,
        *,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.blocks = nnx.List([ResidualMLP(d_model, hidden, rngs=rngs) for _ in range(n_block)])
        self.ln_f = nnx.LayerNorm(d_model, epsilon=1e-5, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)                              # [B, T, d]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))                      # [B, T, vocab]


def loss_fn(model: TokenMLP, batch: dict[str, jax.Array]) -> jax.Array:
    """Per-example LM loss [B]: see :func:`jaxval.models.gpt.lm_loss_fn`."""
    return lm_loss_fn(model, batch)


def random_batch(
    batch_size: int = 16, seq_len: int = 128, vocab_size: int = 1000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Uniform random tokens with a full mask: ``{"tokens": int32 [B, T], "mask": float32 [B, T]}``.

    The NOTES.md benchmark shape is 16 x 128.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(batch_size, seq_len), dtype=np.int32)
    return {"tokens": tokens, "mask": np.ones((batch_size, seq_len), np.float32)}
