"""Small reference models for jaxval.

Every model module exposes ``loss_fn(model, batch) -> jax.Array [B]`` of per-example losses.
Submodules are not imported eagerly (some, e.g. weight loaders, have heavy optional dependencies);
import them directly::

    from jaxval.models import mlp, cnn, gpt, token_mlp
"""

__all__ = ["mlp", "cnn", "gpt", "token_mlp"]
