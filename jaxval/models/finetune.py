"""Fine-tuning of a (pretrained) nnx model on a small data set, with only some parameters trained.

:func:`finetune` runs the library's jit-compiled AdamW trainer (``jaxval._src.train``) for whole epochs over
``data`` (a dict of arrays with a leading example axis, e.g. ``{"tokens", "mask"}`` of an instruction set whose
mask covers the response tokens only), training the ``nnx.Param`` leaves whose path matches ``trainable`` (a
regular expression searched in ``"blocks/20/mlp/up_proj/kernel"``-style paths; ``None``: every parameter).
Frozen parameters are held fixed, and with a frozen bottom of the network the backward pass stops at the
lowest trained layer (cheaper than full fine-tuning on CPU). ``on_epoch(epoch, model)`` is called after each
epoch with the model holding that epoch's weights (validation curves in one run; the optimiser state carries on).
Fine-tuning copies of one model one after the other (equal graphs, the same ``loss_fn``, pattern and optimiser
settings) compiles the step once: the trainer's step takes them as static arguments and the filter of a pattern
is equal to the filter of the same pattern (:class:`PathMatch`).

:func:`trainable_filter` gives the nnx filter for such a pattern (usable with ``nnx.state`` / ``nnx.split``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np
from flax import nnx

from jaxval._src.errors import ConfigError
from jaxval._src.train import train

__all__ = ["finetune", "trainable_filter", "param_path", "PathMatch"]


def param_path(path) -> str:
    """``"blocks/3/mlp/up_proj/kernel"`` from an nnx path tuple."""
    return "/".join(str(k) for k in path)


@dataclasses.dataclass(frozen=True)
class PathMatch:
    """nnx filter predicate: the variable's path (:func:`param_path`) matches ``pattern`` (``re.search``).
    Equal patterns give equal (hashable) predicates, so compiled steps keyed by the filter are reused."""

    pattern: str

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ConfigError(f"trainable={self.pattern!r} is not a valid regular expression: {e}") from e

    def __call__(self, path, _value) -> bool:
        return re.search(self.pattern, param_path(path)) is not None


def trainable_filter(pattern: str | None):
    """nnx filter: the ``nnx.Param`` leaves whose path (:func:`param_path`) matches the regular expression
    ``pattern`` (``re.search``); every ``nnx.Param`` when ``pattern`` is None."""
    if pattern is None:
        return nnx.Param
    return nnx.All(nnx.Param, PathMatch(pattern))


def finetune(model: nnx.Module, loss_fn: Callable, data: Mapping[str, np.ndarray], *, epochs: int,
             batch_size: int, lr: float, trainable: str | None = None, weight_decay: float = 0.0,
             seed: int = 0, progress: bool = False,
             on_epoch: Callable[[int, nnx.Module], None] | None = None, schedule: str = "constant",
             warmup_steps: int = 0) -> nnx.Module:
    """Fine-tune ``model`` in place on ``data`` for ``epochs`` epochs and return it.

    Objective: the mean over a batch of ``loss_fn(model, batch) -> [B]`` (an LM's per-example loss is the sum of
    its masked token losses). AdamW at learning rate ``lr``, constant or, after ``warmup_steps``, following
    ``schedule`` (``"linear"`` / ``"cosine"`` decay over the run: ``jaxval._src.train.learning_rates``).
    ``N // batch_size`` steps per epoch (batches without replacement, a fresh seeded permutation each epoch, an
    incomplete last batch dropped: every step has the same shape, so the step compiles once: ``jaxval``'s trainer
    with ``steps = epochs × (N // batch_size)``). ``trainable``: see :func:`trainable_filter`. ``on_epoch(e, model)``
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
    bs = min(int(batch_size), n)
    return train(model, loss_fn, data, steps=int(epochs) * (n // bs), batch_size=bs, lr=float(lr), seed=int(seed),
                 weight_decay=float(weight_decay), progress=progress, wrt=trainable_filter(trainable),
                 on_epoch=on_epoch, schedule=schedule, warmup_steps=int(warmup_steps))
