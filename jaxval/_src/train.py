"""Generic jit-compiled trainer for nnx models with per-example losses.

``loss_fn(model, batch) -> [B]`` (the jaxval contract); the optimised objective is the MEAN over the
batch. The step is a pure function of ``(params, opt_state, rest, batch)`` built with
``nnx.split`` / ``nnx.merge`` (no ``nnx.jit`` graph traversal per step), jitted once with the graph, the loss,
the trained-variable filter and the optimiser's settings as static arguments: training several copies of one
model (equal graphs, an equal filter) one after the other compiles the step once. The loop over steps is
Python.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxval._src.errors import ConfigError

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array]], jax.Array]


def _mean_loss(loss_fn: LossFn, model: nnx.Module, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean of per-example losses, checking the [B] contract at trace time."""
    losses = loss_fn(model, batch)
    b = jax.tree.leaves(batch)[0].shape[0]
    if losses.shape != (b,):
        raise ValueError(
            f"loss_fn must return per-example losses of shape [B]=({b},), got {losses.shape}; "
            "return one loss per example (do not reduce over the batch)"
        )
    return jnp.mean(losses)


def _check_data(data: Mapping[str, np.ndarray]) -> int:
    if not isinstance(data, Mapping) or not data:
        raise ValueError("data must be a non-empty dict of arrays sharing a leading axis N")
    ns = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in data.items()}
    if None in ns.values() or len(set(ns.values())) != 1:
        raise ValueError(
            f"all arrays in data must share the leading axis N; got leading sizes {ns}"
        )
    n = next(iter(ns.values()))
    if n == 0:
        raise ValueError("data is empty (N = 0)")
    return n


def _adamw(weight_decay: float) -> optax.GradientTransformation:
    """AdamW without its learning rate: ``optax.adamw(lr)`` is this chain followed by ``scale(-lr)``."""
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_fn", "wrt", "weight_decay"))
def _adamw_step(params, opt_state, rest, batch, lr, *, graphdef, loss_fn, wrt, weight_decay):
    """One AdamW step at learning rate ``lr`` (a traced scalar: a schedule compiles once) on the mean loss:
    ``(params, opt_state, rest, loss)`` after it."""
    tx = _adamw(weight_decay)

    def objective(p):
        m = nnx.merge(graphdef, p, rest)
        loss = _mean_loss(loss_fn, m, batch)
        return loss, nnx.state(m, nnx.Not(wrt))

    (loss, new_rest), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, new_rest, loss


def learning_rates(lr: float, steps: int, schedule: str = "constant", warmup_steps: int = 0) -> np.ndarray:
    """The learning rate of each of ``steps`` steps ``[steps]``: ``warmup_steps`` rising linearly to ``lr``
    (step ``i < w`` at ``lr (i + 1) / w``), then, over the remaining ``d`` steps ``j = 0..d-1``, ``"constant"``
    (``lr``), ``"linear"`` (``lr (1 - j / d)``) or ``"cosine"`` (``lr (1 + cos(π j / d)) / 2``): optax's
    ``linear_schedule`` / ``cosine_decay_schedule`` towards 0."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ConfigError(f"schedule must be 'constant', 'linear' or 'cosine', got {schedule!r}")
    if not 0 <= warmup_steps <= steps:
        raise ConfigError(f"warmup_steps must be in [0, steps={steps}], got {warmup_steps}")
    warm = (np.arange(warmup_steps) + 1.0) / warmup_steps
    d = steps - warmup_steps
    frac = np.arange(d) / max(d, 1)
    rest = {"constant": np.ones(d), "linear": 1.0 - frac, "cosine": 0.5 * (1.0 + np.cos(np.pi * frac))}[schedule]
    return np.concatenate([warm, rest]) * float(lr)


def train(
    model: nnx.Module,
    loss_fn: LossFn,
    data: Mapping[str, np.ndarray],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = True,
    wrt: nnx.filterlib.Filter = nnx.Param,
    on_epoch: Callable[[int, nnx.Module], None] | None = None,
    schedule: str = "constant",
    warmup_steps: int = 0,
) -> nnx.Module:
    """Train ``model`` in place with AdamW on the mean per-example loss and return it.

    ``wrt``: nnx filter of the variables that are trained (default every ``nnx.Param``); the others
    (e.g. frozen lower blocks, see :func:`jaxval.models.finetune.finetune`) are held fixed. It is a static
    argument of the compiled step: pass an equal (hashable) filter to reuse the compiled step.

    data: dict of arrays with a shared leading axis N. Batches of ``min(batch_size, N)`` rows are
    drawn without replacement, epoch by epoch (a fresh permutation from ``seed`` each epoch; the
    last incomplete batch of an epoch is dropped), so the same seed gives the same run.
    ``on_epoch(e, model)``: called after each complete epoch ``e = 1, 2, ...`` (``N // batch_size`` steps) with
    ``model`` holding the weights after it (validation curves in one run; the optimiser state carries on).
    ``schedule`` / ``warmup_steps``: the learning rate of each step, :func:`learning_rates` (default constant).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = _check_data(data)
    bs = min(batch_size, n)
    data = {k: np.asarray(v) for k, v in data.items()}

    graphdef, params, rest = nnx.split(model, wrt, ...)
    if not jax.tree.leaves(params):
        raise ConfigError(f"no variable of the model matches wrt={wrt!r}: nothing to train")
    weight_decay = float(weight_decay)
    rates = learning_rates(float(lr), steps, schedule, int(warmup_steps)).astype(np.float32)
    opt_state = _adamw(weight_decay).init(params)
    step = functools.partial(_adamw_step, graphdef=graphdef, loss_fn=loss_fn, wrt=wrt, weight_decay=weight_decay)

    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(n), 0
    per_epoch = n // bs
    bar = tqdm(range(steps), disable=not progress, desc="train", leave=False)
    for i in bar:
        if pos + bs > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos : pos + bs]
        pos += bs
        batch = {k: v[idx] for k, v in data.items()}
        params, opt_state, rest, loss = step(params, opt_state, rest, batch, rates[i])
        if progress and (i % 20 == 0 or i == steps - 1):
            bar.set_postfix(loss=f"{float(loss):.4f}")
        if on_epoch is not None and (i + 1) % per_epoch == 0:
            nnx.update(model, params, rest)
            on_epoch((i + 1) // per_epoch, model)
    bar.close()
    nnx.update(model, params, rest)
    return model


def train_step_fn(
    model: nnx.Module, loss_fn: LossFn
) -> Callable[[nnx.State, Mapping[str, jax.Array]], tuple[jax.Array, nnx.State]]:
    """A jitted ``step(state, batch) -> (loss, grads)``: forward + backward of the mean loss.

    ``state`` is ``nnx.state(model)`` (or ``nnx.state(model, nnx.Param)`` for a model with only
    parameters); ``grads`` has the structure of its ``nnx.Param`` part. No update is applied:
    this is the reference cost of one training step for benchmarks.
    """
    graphdef = nnx.graphdef(model)

    @jax.jit
    def step(state: nnx.State, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, nnx.State]:
        params, rest = nnx.split_state(state, nnx.Param, ...)

        def objective(p):
            return _mean_loss(loss_fn, nnx.merge(graphdef, p, rest), batch)

        return jax.value_and_grad(objective)(params)

    return step
