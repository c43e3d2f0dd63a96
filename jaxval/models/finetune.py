"""Fine-tuning of a (pretrained) nnx model on a small data set, with only some parameters trained.

:func:`finetune` runs a jit-compiled AdamW loop (the batches of the library's trainer) for whole epochs over
``data`` (a dict of arrays with a leading example axis, e.g. ``{"tokens", "mask"}`` of an instruction set whose
mask covers the response tokens only), training the ``nnx.Param`` leaves whose path matches ``trainable`` (a
regular expression searched in ``"blocks/20/mlp/up_proj/kernel"``-style paths; ``None``: every parameter).
Frozen parameters are held fixed, and with a frozen bottom of the network the backward pass stops at the
lowest trained layer (cheaper than full fine-tuning on CPU). ``on_epoch(epoch, model)`` is called after each
epoch with the model holding that epoch's weights (validation curves in one run; the optimiser state carries on).

:func:`trainable_filter` gives the nnx filter for such a pattern (usable with ``nnx.state`` / ``nnx.split``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxval._src.errors import ConfigError

__all__ = ["finetune", "trainable_filter", "param_path"]


def param_path(path) -> str:
    """``"blocks/3/mlp/up_proj/kernel"`` from an nnx path tuple."""
    return "/".join(str(k) for k in path)


def trainable_filter(pattern: str | None):
    """nnx filter: the ``nnx.Param`` leaves whose path (:func:`param_path`) matches the regular expression
    ``pattern`` (``re.search``); every ``nnx.Param`` when ``pattern`` is None."""
    if pattern is None:
        return nnx.Param
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"trainable={pattern!r} is not a valid regular expression: {e}") from e
    return nnx.All(nnx.Param, lambda path, _value: rx.search(param_path(path)) is not None)


_STEPS: dict = {}


def _step(graphdef, loss_fn, lr: float, weight_decay: float, trainable):
    """``(tx, jitted step)`` for one model graph, loss and optimiser: kept, so that fine-tuning copies of one
    model (equal graphs) one after the other traces and compiles the step once."""
    key = (graphdef, loss_fn, lr, weight_decay, trainable)
    if key in _STEPS:
        return _STEPS[key]
    wrt = trainable_filter(trainable)
    tx = optax.adamw(lr, weight_decay=weight_decay)

    @jax.jit
    def step(params, opt_state, rest, batch):
        def objective(p):
            m = nnx.merge(graphdef, p, rest)
            losses = loss_fn(m, batch)
            b = jax.tree.leaves(batch)[0].shape[0]
            if losses.shape != (b,):
                raise ValueError(f"loss_fn must return per-example losses of shape ({b},), got {losses.shape}")
            return jnp.mean(losses), nnx.state(m, nnx.Not(wrt))

        (loss, new_rest), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_rest, loss

    if len(_STEPS) > 16:
        _STEPS.clear()
    _STEPS[key] = tx, step
    return tx, step


def finetune(model: nnx.Module, loss_fn: Callable, data: Mapping[str, np.ndarray], *, epochs: int,
             batch_size: int, lr: float, trainable: str | None = None, weight_decay: float = 0.0,
             seed: int = 0, progress: bool = False,
             on_epoch: Callable[[int, nnx.Module], None] | None = None) -> nnx.Module:
    """Fine-tune ``model`` in place on ``data`` for ``epochs`` epochs and return it.

    Objective: the mean over a batch of ``loss_fn(model, batch) -> [B]`` (an LM's per-example loss is the sum of
    its masked token losses). AdamW with a constant learning rate ``lr``; ``N // batch_size`` steps per epoch
    (batches without replacement, a fresh seeded permutation each epoch, an incomplete last batch dropped:
    every step has the same shape, so the step compiles once; the same batches as ``jaxval``'s trainer with
    ``steps = epochs × (N // batch_size)``). ``trainable``: see :func:`trainable_filter`. ``on_epoch(e, model)``
    (optional) after epoch ``e = 1..epochs``, ``model`` updated to the weights after that epoch.
    """
    if int(epochs) != epochs or epochs < 0:
        raise ConfigError(f"epochs must be a non-negative integer, got {epochs!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    n = len(next(iter(data.values()))) if data else 0
    if n == 0:
        raise ConfigError("data is empty: nothing to fine-tune on")
    if any(len(v) != n for v in data.values()):
        raise ConfigError(f"the arrays of data must share the leading axis; got {[len(v) for v in data.values()]}")
    data = {k: np.asarray(v) for k, v in data.items()}
    bs = min(int(batch_size), n)
    wrt = trainable_filter(trainable)
    graphdef, params, rest = nnx.split(model, wrt, ...)
    if not jax.tree.leaves(params):
        raise ConfigError(f"no parameter matches trainable={trainable!r}: nothing to train")
    tx, step = _step(graphdef, loss_fn, float(lr), float(weight_decay), trainable)
    opt_state = tx.init(params)
    rng = np.random.default_rng(int(seed))
    for e in range(int(epochs)):
        order = rng.permutation(n)
        for j in range(n // bs):
            batch = {k: v[order[j * bs:(j + 1) * bs]] for k, v in data.items()}
            params, opt_state, rest, loss = step(params, opt_state, rest, batch)
        if progress:
            print(f"  epoch {e + 1}/{epochs}: last batch loss {float(loss):.4f}", flush=True)
        if on_epoch is not None:
            nnx.update(model, params, rest)
            on_epoch(e + 1, model)
    nnx.update(model, params, rest)
    return model
