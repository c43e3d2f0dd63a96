"""Small convolutional classifier for 8x8 digits or 28x28 MNIST-style images (NHWC)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class CNN(nnx.Module):
    """conv3x3(16, SAME) -> relu -> conv3x3(32, stride 2, padding 1) -> relu -> conv3x3(32, SAME)
    -> relu -> global mean pool -> Linear(32, 64) -> relu -> Linear(64, num_classes).

    Global pooling makes the model input-size agnostic (8x8 digits, 28x28 MNIST).
    ``__call__``: x [B, H, W, C] float -> logits [B, num_classes].
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_channels, 16, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), rngs=rngs)
        self.conv3 = nnx.Conv(32, 32, (3, 3), padding="SAME", rngs=rngs)
        self.fc = nnx.Linear(32, 64, rngs=rngs)
        self.head = nnx.Linear(64, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> logits [B, num_classes]."""
        if x.ndim != 4:
            raise ValueError(f"CNN expects NHWC input [B, H, W, C], got shape {x.shape}")
        h = nnx.relu(self.conv1(x))          # [B, H, W, 16]
        h = nnx.relu(self.conv2(h))          # [B, ceil(H/2), ceil(W/2), 32]
        h = nnx.relu(self.conv3(h))          # [B, H/2, W/2, 32]
        h = jnp.mean(h, axis=(1, 2))         # [B, 32]
        h = nnx.relu(self.fc(h))             # [B, 64]
        return self.head(h)                  # [B, num_classes]


def loss_fn(model: CNN, batch: dict[str, jax.Array]) -> jax.Array:
    """Per-example cross-entropy [B]; batch ``{"x": float [B, H, W, C], "y": int [B]}``."""
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def predict(model: CNN, x: jax.Array) -> jax.Array:
    """Predicted class labels, int [B], for x [B, H, W, C]."""
    return jnp.argmax(model(x), axis=-1)
