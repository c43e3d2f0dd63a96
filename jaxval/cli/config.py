"""YAML experiment configs -> model, data and LoGra objects (used by ``jaxval log`` and experiments).

A config has four sections (see ``configs/digits_mlp.yaml``)::

    seed: 0                      # default seed of every section below
    model:
      kind: mlp                  # mlp | cnn | gpt | token_mlp
      sizes: [64, 128, 10]       # mlp; cnn: in_channels, num_classes; gpt: size (small|medium|large) and/or
                                 #   vocab_size, block_size, d_model, n_layer, n_head, d_mlp, tie_embeddings;
                                 #   token_mlp: d_model, n_block, hidden (gpt/token_mlp vocab: the tokenizer's)
      checkpoint: null           # a model checkpoint written by save_model; null: train as below
      train: {steps: 300, batch_size: 64, lr: 0.003}   # used when no checkpoint (deterministic)
      save_trained: null         # optional: write the trained model here (save_model)
    data:
      kind: digits               # digits | mnist | fashion-mnist | text
      split: train               # train | test (| all for text)
      limit: null                # keep the first `limit` examples
      # digits: test_fraction; mnist/fashion-mnist: data_dir; text: corpus (name or file), data_dir,
      #   tokenizer (char | word), vocab_size (word), block_len, stride, test_fraction
    logra: {rank: 64, init: gaussian, seed: 0, layers: null}
    log: {output: out/x.store, dtype: bfloat16, batch_size: 64, chunk_rows: null}

Relative paths are taken relative to the current directory.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import numpy as np
import yaml
from flax import nnx

SECTIONS = ("name", "seed", "model", "data", "logra", "log", "fit", "score")
MODEL_KINDS = ("mlp", "cnn", "gpt", "token_mlp")
DATA_KINDS = ("digits", "mnist", "fashion-mnist", "text")


class ConfigError(ValueError):
    """A config file is missing something or has a bad value (the message names the key)."""


def load_config(path: str | os.PathLike) -> dict:
    """Read and check a YAML config; returns a plain dict with defaults filled in."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    return normalize_config(cfg, where=path)


def normalize_config(cfg: Any, where: str = "config") -> dict:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with sections {SECTIONS}")
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown top-level keys {unknown}; allowed: {list(SECTIONS)}")
    cfg = copy.deepcopy(cfg)
    seed = int(cfg.get("seed", 0))
    cfg["seed"] = seed
    for sec in ("model", "data", "logra", "log"):
        if not isinstance(cfg.get(sec, {}), dict):
            raise ConfigError(f"{where}: section '{sec}' must be a mapping")
    m = cfg.setdefault("model", {})
    if m.get("kind") not in MODEL_KINDS:
        raise ConfigError(f"{where}: model.kind must be one of {MODEL_KINDS}, got {m.get('kind')!r}")
    m.setdefault("seed", seed)
    d = cfg.setdefault("data", {})
    if d.get("kind") not in DATA_KINDS:
        raise ConfigError(f"{where}: data.kind must be one of {DATA_KINDS}, got {d.get('kind')!r}")
    d.setdefault("split", "train")
    if d["split"] not in ("train", "test", "all"):
        raise ConfigError(f"{where}: data.split must be train, test or all, got {d['split']!r}")
    d.setdefault("seed", seed)
    lg = cfg.setdefault("logra", {})
    lg.setdefault("rank", 64)
    lg.setdefault("init", "gaussian")
    lg.setdefault("seed", seed)
    lg.setdefault("layers", None)
    lo = cfg.setdefault("log", {})
    if not lo.get("output"):
        raise ConfigError(f"{where}: log.output (the store path) is required")
    lo.setdefault("dtype", "bfloat16")
    lo.setdefault("batch_size", 64)
    lo.setdefault("chunk_rows", None)
    ft = cfg.setdefault("fit", {}) or {}
    cfg["fit"] = ft
    ft.setdefault("kind", "ekfac")
    ft.setdefault("damping", None)
    ft.setdefault("relative_damping", None if ft.get("damping") is not None else 0.1)
    ft.setdefault("fisher", "empirical")
    ft.setdefault("num_samples", 1)
    ft.setdefault("batch_size", lo["batch_size"])
    ft.setdefault("output", f"{lo['output'].rstrip('/')}.{ft['kind']}.precond")
    sc = cfg.setdefault("score", {}) or {}
    cfg["score"] = sc
    sc.setdefault("split", "test")
    sc.setdefault("queries_output", os.path.join(os.path.dirname(lo["output"].rstrip("/")) or ".", "queries.store"))
    sc.setdefault("mode", "cosine")
    sc.setdefault("top_k", 10)
    sc.setdefault("output", os.path.join(os.path.dirname(lo["output"].rstrip("/")) or ".", "scores"))
    return cfg


# ----------------------------------------------------------------------------------------------- data

def build_data(dcfg: dict, *, for_model: str | None = None) -> tuple[dict, np.ndarray | None, dict]:
    """``(data, ids, info)``: the split to log / train on as a dict of arrays, its ids, and extra info
    (``vocab_size`` for text)."""
    kind, split = dcfg["kind"], dcfg.get("split", "train")
    limit = dcfg.get("limit")
    info: dict[str, Any] = {}
    if kind == "digits":
        from jaxval.data.digits import load_digits

        d = load_digits(test_fraction=float(dcfg.get("test_fraction", 0.2)), seed=int(dcfg.get("seed", 0)))
        sp = "test" if split == "test" else "train"
        x, y, ids = d[f"x_{sp}"], d[f"y_{sp}"], d[f"idx_{sp}"]
        if for_model == "cnn":
            x = x.reshape(-1, 8, 8, 1)
        data = {"x": x, "y": y}
    elif kind in ("mnist", "fashion-mnist"):
        from jaxval.data.idx import load_idx_dataset

        d = load_idx_dataset(kind, data_dir=dcfg.get("data_dir"), flatten=for_model != "cnn", limit=limit)
        sp = "test" if split == "test" else "train"
        x, y = d[f"x_{sp}"], d[f"y_{sp}"]
        if for_model == "cnn":
            x = x[..., None]
        data, ids = {"x": x, "y": y}, np.arange(len(y), dtype=np.int64)
    else:  # text
        from jaxval.data.text import CharTokenizer, WordTokenizer, load_text, make_blocks

        if not dcfg.get("corpus"):
            raise ConfigError("data.corpus (a corpus name such as tinyshakespeare, or a text file) is required "
                              "for data.kind: text")
        text = load_text(dcfg["corpus"], data_dir=dcfg.get("data_dir"))
        tk = dcfg.get("tokenizer", "char")
        if tk == "char":
            tok = CharTokenizer.from_text(text)
        elif tk == "word":
            tok = WordTokenizer.from_text(text, vocab_size=dcfg.get("vocab_size"))
        else:
            raise ConfigError(f"data.tokenizer must be char or word, got {tk!r}")
        blocks = make_blocks(tok.encode(text), int(dcfg.get("block_len", 64)), dcfg.get("stride"))
        n = blocks["tokens"].shape[0]
        ids = np.arange(n, dtype=np.int64)
        if split != "all":
            n_test = int(round(float(dcfg.get("test_fraction", 0.1)) * n))
            sl = slice(n - n_test, n) if split == "test" else slice(0, n - n_test)
            blocks = {k: v[sl] for k, v in blocks.items()}
            ids = ids[sl]
        data = blocks
        info["vocab_size"] = tok.vocab_size
        info["block_len"] = int(blocks["tokens"].shape[1])
    if limit is not None:
        data = {k: v[: int(limit)] for k, v in data.items()}
        ids = ids[: int(limit)]
    return data, ids, info


# ----------------------------------------------------------------------------------------------- model

def build_model(mcfg: dict, data_info: dict | None = None):
    """``(model, loss_fn)`` freshly initialised from ``model.seed`` (no training, no checkpoint)."""
    data_info = data_info or {}
    kind = mcfg["kind"]
    rngs = nnx.Rngs(int(mcfg.get("seed", 0)))
    if kind == "mlp":
        from jaxval.models import mlp

        return mlp.MLP(tuple(mcfg.get("sizes", (64, 128, 10))), rngs=rngs), mlp.loss_fn
    if kind == "cnn":
        from jaxval.models import cnn

        return cnn.CNN(int(mcfg.get("in_channels", 1)), int(mcfg.get("num_classes", 10)), rngs=rngs), cnn.loss_fn
    if kind == "gpt":
        import dataclasses

        from jaxval.models import gpt

        base = gpt.sizes()[mcfg.get("size", "small")] if mcfg.get("size", "small") in gpt.sizes() else None
        if base is None:
            raise ConfigError(f"model.size must be one of {list(gpt.sizes())}, got {mcfg.get('size')!r}")
        fields = {f.name for f in dataclasses.fields(gpt.GPTConfig)}
        over = {k: v for k, v in mcfg.items() if k in fields}
        if "vocab_size" in data_info:
            over.setdefault("vocab_size", data_info["vocab_size"])
        if "block_len" in data_info:
            over.setdefault("block_size", max(base.block_size, data_info["block_len"]))
        return gpt.GPT(dataclasses.replace(base, **over), rngs=rngs), gpt.loss_fn
    from jaxval.models import token_mlp

    vocab = int(mcfg.get("vocab_size", data_info.get("vocab_size", 1000)))
    return token_mlp.TokenMLP(vocab, int(mcfg.get("d_model", 256)), int(mcfg.get("n_block", 4)),
                              int(mcfg.get("hidden", 1024)), rngs=rngs), token_mlp.loss_fn


def _flat_params(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, path)): np.asarray(v[...] if hasattr(v, "__getitem__") else v)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_model(model, path: str, meta: dict | None = None, overwrite: bool = False) -> str:
    """Save the model's parameters (orbax, via ``jaxval.checkpoint``) for ``model.checkpoint``."""
    from jaxval._src import checkpoint
    from jaxval._src.logra import model_fingerprint

    return checkpoint.save(path, _flat_params(model),
                           meta={"kind": "jaxval.model", "fingerprint": model_fingerprint(model), **(meta or {})},
                           overwrite=overwrite)


def load_model(model, path: str):
    """Load parameters saved by :func:`save_model` into ``model`` (same architecture) in place."""
    from jaxval._src import checkpoint

    arrays, _meta = checkpoint.load(path)
    own = _flat_params(model)
    missing = sorted(set(own) - set(arrays))
    extra = sorted(set(arrays) - set(own))
    if missing or extra:
        raise ConfigError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected "
                          f"{extra[:5]}")
    state = nnx.state(model, nnx.Param)
    for p, v in nnx.to_flat_state(state):
        key = "/".join(map(str, p))
        arr = np.asarray(arrays[key])
        if arr.shape != tuple(v[...].shape):
            raise ConfigError(f"checkpoint {path}: parameter {key} has shape {arr.shape}, the model "
                              f"{tuple(v[...].shape)}")
        v[...] = arr.astype(v[...].dtype)
    nnx.update(model, state)
    return model


def prepare(cfg: dict, progress: bool = True, split: str | None = None):
    """``(model, loss_fn, data, ids, logra)`` for a normalised config: builds the data and the model, loads
    its checkpoint or trains it (deterministically, on ``data.split``), and builds the LoGra. ``split``
    (e.g. ``"test"`` for query gradients) returns that split's data instead of ``data.split``'s."""
    from jaxval._src.logra import LoGra

    mcfg, dcfg, lcfg = cfg["model"], cfg["data"], cfg["logra"]
    data, ids, info = build_data(dcfg, for_model=mcfg["kind"])
    if split is not None and split != dcfg.get("split", "train"):
        out_data, out_ids, _ = build_data(dict(dcfg, split=split), for_model=mcfg["kind"])
    else:
        out_data, out_ids = data, ids
    model, loss_fn = build_model(mcfg, info)
    if mcfg.get("checkpoint"):
        load_model(model, mcfg["checkpoint"])
    elif mcfg.get("train"):
        from jaxval._src.train import train

        t = dict(mcfg["train"])
        train_data = data
        if t.pop("split", None) not in (None, dcfg.get("split", "train")):
            raise ConfigError("model.train.split must match data.split (the model trains on the logged split)")
        train(model, loss_fn, train_data, steps=int(t.get("steps", 300)), batch_size=int(t.get("batch_size", 64)),
              lr=float(t.get("lr", 3e-3)), seed=int(t.get("seed", mcfg.get("seed", 0))),
              weight_decay=float(t.get("weight_decay", 0.0)), progress=progress)
        if mcfg.get("save_trained"):
            save_model(model, mcfg["save_trained"], meta={"model": mcfg}, overwrite=True)
    else:
        warnings.warn("jaxval: the config gives neither model.checkpoint nor model.train: logging the "
                      "gradients of a freshly initialised model", stacklevel=2)
    rank = lcfg.get("rank")
    if isinstance(rank, list):
        rank = tuple(rank)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="jaxval: parameters")
        logra = LoGra(model, loss_fn, rank=rank, init=lcfg.get("init", "gaussian"), seed=int(lcfg.get("seed", 0)),
                      layers=lcfg.get("layers"))
    return model, loss_fn, out_data, out_ids, logra


def build_tokenizer(dcfg: dict):
    """The tokenizer ``build_data`` used for a text data spec (None for other kinds)."""
    if dcfg.get("kind") != "text":
        return None
    from jaxval.data.text import CharTokenizer, WordTokenizer, load_text

    text = load_text(dcfg["corpus"], data_dir=dcfg.get("data_dir"))
    if dcfg.get("tokenizer", "char") == "word":
        return WordTokenizer.from_text(text, vocab_size=dcfg.get("vocab_size"))
    return CharTokenizer.from_text(text)


def store_extra(cfg: dict) -> dict:
    """What of the config goes into the store's config (besides LoGra and the model fingerprint)."""
    m = {k: v for k, v in cfg["model"].items() if k not in ("checkpoint", "save_trained")}
    return {"model": m, "data": cfg["data"]}
