"""Multi-layer perceptron classifier (e.g. sklearn digits: 64 inputs, 10 classes)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class MLP(nnx.Module):
    """Stack of ``nnx.Linear`` layers (with bias), ``activation`` between them, none after the last.

    ``sizes = (in, hidden..., out)``; ``__call__``: x [B, in] float -> logits [B, out].
    """

    def __init__(
        self,
        sizes: Sequence[int] = (64, 128, 10),
        *,
        rngs: nnx.Rngs,
        activation: Callable[[jax.Array], jax.Array] = nnx.relu,
    ):
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least (in, out) sizes, got sizes={sizes}")
        self.sizes = sizes
        self.activation = activation
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, in] -> logits [B, out]."""
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < n - 1:
                x = self.activation(x)
        return x


def loss_fn(model: MLP, batch: dict[str, jax.Array]) -> jax.Array:
    """Per-example cross-entropy [B]; batch ``{"x": float [B, in], "y": int [B]}``."""
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def predict(model: MLP, x: jax.Array) -> jax.Array:
    """Predicted class labels, int [B], for x [B, in]."""
    return jnp.argmax(model(x), axis=-1)
