"""The one config loader of jaxval: YAML files checked against a schema (used by every ``jaxval`` command
and by the experiment scripts).

:func:`load_config` reads a YAML mapping, merges an optional *profile* section of overrides (the
experiments' ``tiny:``), applies ``key=value`` overrides (dotted keys for nested sections, values parsed
as YAML), and checks the result against a :class:`Schema`: unknown keys, wrong types, values outside their
choices and missing required keys raise :class:`ConfigError` with the key's full name, what was expected and
what to do (the CLI prints that one line and exits with status 2). ``schema=None`` loads a free-form
mapping (the experiments' configs, whose keys each script reads).

The pipeline config (``jaxval log | fit | score``, :data:`PIPELINE`) has these sections (see
``configs/digits_mlp.yaml``)::

    seed: 0                      # default seed of every section below
    model:
      kind: mlp                  # mlp | cnn | gpt | token_mlp | smollm2 (pretrained; dtype: float32 | bfloat16)
                                 #   or factory: "pkg.module:function" (+ args: {...}): the user's model
                                 #   (jaxval/models/factory.py); loss: "pkg.module:function" for any model
      sizes: [64, 128, 10]       # mlp; cnn: in_channels, num_classes; gpt: size (small|medium|large) and/or
                                 #   vocab_size, block_size, d_model, n_layer, n_head, d_mlp, tie_embeddings;
                                 #   token_mlp: d_model, n_block, hidden (gpt/token_mlp vocab: the tokenizer's)
      checkpoint: null           # a model checkpoint written by save_model; null: train as below
      train: {steps: 300, batch_size: 64, lr: 0.003}   # used when no checkpoint (deterministic)
      save_trained: null         # optional: write the trained model here (save_model)
    data:
      kind: digits               # digits | mnist | fashion-mnist | text | corpus (a .txt / .jsonl file in
                                 #   chunks of the model's tokens: jaxval/data/corpus.py), or factory: ...
      split: train               # train | test (| all for text)
      limit: null                # keep the first `limit` examples
      # digits: test_fraction; mnist/fashion-mnist: data_dir; text: corpus (name or file), data_dir,
      #   tokenizer (char | word), vocab_size (word), block_len, stride, test_fraction
    logra: {rank: 64, init: gaussian, seed: 0, layers: null}
    log: {output: out/x.store, dtype: bfloat16, batch_size: 64, chunk_rows: null, stats: null}
                                 # stats: kfac -> K-FAC statistics of the log pass saved beside the store
    fit: {kind: ekfac, damping: null, relative_damping: 0.1, fisher: empirical, num_samples: 1, ...}
    score: {split: test, queries_output: ..., mode: cosine, top_k: 10, output: ...}

Relative paths are taken relative to the current directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import yaml
from flax import nnx

from jaxval._src.errors import ConfigError

__all__ = ["ConfigError", "Field", "Schema", "REQUIRED", "read_yaml", "apply_overrides", "merge", "load_config",
           "PIPELINE", "normalize_config", "build_data", "build_model", "build_tokenizer", "prepare", "save_model",
           "load_model", "store_extra", "MODEL_KINDS", "DATA_KINDS", "SECTIONS"]

MODEL_KINDS = ("mlp", "cnn", "gpt", "token_mlp", "smollm2")
DATA_KINDS = ("digits", "mnist", "fashion-mnist", "text", "corpus")


# ----------------------------------------------------------------------------------------------- schema

class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED = _Marker("REQUIRED")   # a Field default: the key must be given
_UNSET = _Marker("UNSET")        # a Field default: optional, left absent when not given
NoneType = type(None)


@dataclasses.dataclass(frozen=True)
class Field:
    """One config key: the accepted types (``float`` also takes ints and numeric strings such as YAML 1.1's
    ``1e-3``; ``list`` also takes tuples; ``None`` in ``types`` allows null), a default (``REQUIRED``, or
    omitted: the key stays absent when not given), optional allowed values and a help line."""

    types: tuple = (object,)
    default: Any = _UNSET
    choices: tuple | None = None
    help: str = ""

    def check(self, value: Any, key: str, where: str) -> Any:
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        types = tuple(NoneType if t is None else t for t in types)
        out = _coerce(value, types)
        if out is _UNSET:
            names = " or ".join("null" if t is NoneType else t.__name__ for t in types)
            raise ConfigError(f"{where}: {key} must be {names}, got {type(value).__name__} {value!r}")
        if self.choices is not None and out not in self.choices:
            raise ConfigError(f"{where}: {key} must be one of {list(self.choices)}, got {out!r}")
        return out


def _coerce(v: Any, types: tuple) -> Any:
    if object in types or (v is None and NoneType in types):
        return v
    if isinstance(v, bool):
        return v if bool in types else _UNSET
    if isinstance(v, int) and int in types:
        return v
    if float in types:
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
    if list in types and isinstance(v, (list, tuple)):
        return list(v)
    for t in types:
        if t not in (int, float, bool, list, NoneType) and isinstance(v, t):
            return v
    return _UNSET


@dataclasses.dataclass(frozen=True)
class Schema:
    """A mapping's allowed keys: ``{key: Field | Schema}`` (a nested :class:`Schema` is a section, checked
    when present; null counts as empty). ``extra=True`` lets unknown keys through unchecked. ``finalize(cfg, where)``
    runs after the checks (cross-key defaults and rules)."""

    fields: Mapping[str, Field | Schema]
    extra: bool = False
    finalize: Callable[[dict, str], dict] | None = None

    def validate(self, cfg: Any, where: str = "config", prefix: str = "") -> dict:
        """The checked mapping (a copy) with defaults filled in; :class:`ConfigError` on the first problem."""
        if cfg is None:
            cfg = {}
        if not isinstance(cfg, Mapping):
            what = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
            raise ConfigError(f"{where}: {what} must be a mapping of keys to values, got {type(cfg).__name__}")
        out = dict(cfg)
        if not self.extra:
            unknown = [k for k in out if k not in self.fields]
            if unknown:
                k = unknown[0]
                near = difflib.get_close_matches(str(k), [str(f) for f in self.fields], n=1)
                hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
                raise ConfigError(f"{where}: unknown key '{prefix}{k}'{hint}; allowed keys"
                                  f"{' in ' + prefix.rstrip('.') if prefix else ''}: {sorted(map(str, self.fields))}")
        for k, f in self.fields.items():
            if isinstance(f, Schema):  # a section: checked when given (null = empty), else left absent
                if k in out:
                    out[k] = f.validate(out[k], where, f"{prefix}{k}.")
                continue
            if k in out:
                out[k] = f.check(out[k], prefix + k, where)
            elif f.default is REQUIRED:
                raise ConfigError(f"{where}: {prefix}{k} is required" + (f" ({f.help})" if f.help else ""))
            elif f.default is not _UNSET:
                out[k] = copy.deepcopy(f.default)
        return self.finalize(out, where) if self.finalize is not None else out


def read_yaml(path: str | os.PathLike) -> dict:
    """The YAML mapping in ``path`` (an empty file is ``{}``); :class:`ConfigError` if it is missing, not
    YAML, or not a mapping at the top."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} not found") from e
    except IsADirectoryError as e:
        raise ConfigError(f"config file {path} is a directory, not a YAML file") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from e
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(cfg).__name__}")
    return cfg


def merge(a: Mapping, b: Mapping) -> dict:
    """``a`` with ``b``'s entries, nested mappings merged (for profiles such as an experiment's ``tiny:``)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def apply_overrides(cfg: Mapping, overrides: Sequence[str] = ()) -> dict:
    """``cfg`` with ``key=value`` overrides (``section.key=value`` for nested keys; values parsed as YAML)."""
    out = copy.deepcopy(dict(cfg))
    for ov in overrides or ():
        key, eq, text = str(ov).partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"override {ov!r} must look like key=value (or section.key=value)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: the value is not valid YAML ({' '.join(str(e).split())})") from e
        node, parts = out, key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {ov!r}: {'.'.join(parts[:i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


# ----------------------------------------------------------------------------------------------- the pipeline schema

SECTIONS = ("name", "seed", "model", "data", "logra", "log", "fit", "score")

_PATH = (str, None)
_TRAIN = Schema({"steps": Field((int,)), "batch_size": Field((int,)), "lr": Field((float,)), "seed": Field((int,)),
                 "weight_decay": Field((float,)), "split": Field((str, None))})
_MODEL = Schema({
    "kind": Field((str,), choices=MODEL_KINDS, help="one of " + " | ".join(MODEL_KINDS) + " (or model.factory)"),
    "factory": Field((str, None), help="import path pkg.module:function of the user's model (jaxval.models.factory)"),
    "args": Field((dict, None), help="keyword arguments of model.factory"),
    "loss": Field((str, None), help="import path pkg.module:function of loss_fn(model, batch) -> [B]"),
    "dtype": Field((str, None), help="compute dtype of a pretrained model (smollm2)"),
    "seed": Field((int,)),
    "checkpoint": Field(_PATH, help="a checkpoint written by save_model"),
    "train": _TRAIN,
    "save_trained": Field(_PATH),
    "sizes": Field((list,), help="mlp layer widths"),
    "in_channels": Field((int,)), "num_classes": Field((int,)),                       # cnn
    "size": Field((str,)), "vocab_size": Field((int,)), "block_size": Field((int,)),   # gpt
    "d_model": Field((int,)), "n_layer": Field((int,)), "n_head": Field((int,)), "d_mlp": Field((int, None)),
    "tie_embeddings": Field((bool,)),
    "n_block": Field((int,)), "hidden": Field((int,)),                                 # token_mlp
})
_DATA = Schema({
    "kind": Field((str,), choices=DATA_KINDS, help="one of " + " | ".join(DATA_KINDS) + " (or data.factory)"),
    "factory": Field((str, None), help="import path pkg.module:function giving documents or a batch"),
    "args": Field((dict, None), help="keyword arguments of data.factory"),
    "format": Field((str, None), choices=(None, "text", "jsonl")), "text_key": Field((str,)), "id_key": Field((str,)),
    "add_bos": Field((bool,)),                                                         # corpus (jaxval.data.corpus)
    "split": Field((str,), "train", ("train", "test", "all")),
    "seed": Field((int,)),
    "limit": Field((int, None)),
    "test_fraction": Field((float,)),
    "data_dir": Field(_PATH),
    "corpus": Field((str, None)),
    "tokenizer": Field((str,), choices=("char", "word")),
    "vocab_size": Field((int, None)),
    "block_len": Field((int,)),
    "stride": Field((int, None)),
})
_LOGRA = Schema({"rank": Field((int, list, None), 64), "init": Field((str,), "gaussian"), "seed": Field((int,)),
                 "layers": Field((str, list, None), None)})
_LOG = Schema({"output": Field((str,), REQUIRED, help="the store path"), "dtype": Field((str,), "bfloat16"),
               "batch_size": Field((int,), 64), "chunk_rows": Field((int, None), None),
               "stats": Field((str, None), None, (None, "kfac"), "kfac: also save the K-FAC statistics beside the store")})
_FIT = Schema({"kind": Field((str,), "ekfac", ("identity", "raw", "kfac", "ekfac")), "damping": Field((float, None)),
               "relative_damping": Field((float, None)), "fisher": Field((str,), "empirical", ("empirical", "sampled")),
               "num_samples": Field((int,), 1), "batch_size": Field((int,)), "output": Field(_PATH)})
_SCORE = Schema({"split": Field((str,), "test"), "queries_output": Field(_PATH), "mode": Field((str,), "cosine",
                 ("dot", "cosine", "relative", "l2")), "top_k": Field((int,), 10), "output": Field(_PATH)})


def _finalize_pipeline(cfg: dict, where: str) -> dict:
    """Cross-key defaults of the pipeline config: every section's seed defaults to the top-level one; the
    preconditioner and query-store paths sit beside the training store."""
    seed = cfg["seed"]
    for sec, schema in (("model", _MODEL), ("data", _DATA), ("logra", _LOGRA), ("log", _LOG)):
        if cfg.get(sec) is None:
            cfg[sec] = schema.validate({}, where, f"{sec}.")   # raises for its required keys
    for sec in ("model", "data"):
        if not cfg[sec].get("kind") and not cfg[sec].get("factory"):
            raise ConfigError(f"{where}: {sec}.kind (or {sec}.factory, an import path) is required")
    cfg["model"].setdefault("seed", seed)
    cfg["data"].setdefault("seed", seed)
    cfg["logra"].setdefault("seed", seed)
    lo = cfg["log"]
    ft = cfg["fit"] = _FIT.validate(cfg.get("fit"), where, "fit.")
    if ft.get("relative_damping") is None and ft.get("damping") is None:
        ft["relative_damping"] = 0.1
    ft.setdefault("damping", None)
    ft.setdefault("relative_damping", None)
    ft.setdefault("batch_size", lo["batch_size"])
    if not ft.get("output"):
        ft["output"] = f"{lo['output'].rstrip('/')}.{ft['kind']}.precond"
    sc = cfg["score"] = _SCORE.validate(cfg.get("score"), where, "score.")
    here = os.path.dirname(lo["output"].rstrip("/")) or "."
    if not sc.get("queries_output"):
        sc["queries_output"] = os.path.join(here, "queries.store")
    if not sc.get("output"):
        sc["output"] = os.path.join(here, "scores")
    return cfg


PIPELINE = Schema({"name": Field((str,)), "seed": Field((int,), 0), "model": _MODEL, "data": _DATA,
                   "logra": _LOGRA, "log": _LOG, "fit": _FIT, "score": _SCORE}, finalize=_finalize_pipeline)
"""The config of ``jaxval log | fit | score`` (the module docstring shows its sections)."""


def normalize_config(cfg: Any, where: str = "config") -> dict:
    """A pipeline config mapping checked against :data:`PIPELINE`, with defaults filled in."""
    return PIPELINE.validate(cfg, where)


def load_config(path: str | os.PathLike, schema: Schema | None = PIPELINE, *, overrides: Sequence[str] = (),
                profile: str | None = None, profiles: Sequence[str] = ()) -> dict:
    """Read, merge and check a YAML config; returns a plain dict with defaults filled in.

    schema: the keys allowed (default :data:`PIPELINE`); ``None``: a free-form mapping, not checked
      (experiment scripts, which read their own keys).
    overrides: ``key=value`` / ``section.key=value`` strings applied last (the CLI's ``--set``).
    profile: a top-level section of overrides merged in first (e.g. ``"tiny"``: an experiment at a
      smoke-test size); a config without it is an error.
    profiles: the names of every profile section the config may hold; they are removed from the result
      whether applied or not.
    """
    where = os.fspath(path)
    cfg = read_yaml(path)
    if profile is not None:
        if not isinstance(cfg.get(profile), Mapping):
            raise ConfigError(f"{where}: no '{profile}:' mapping of overrides to apply (keys: {sorted(cfg)})")
        cfg = merge(cfg, cfg[profile])
    for name in {*profiles, *([profile] if profile else [])}:
        cfg.pop(name, None)
    cfg = apply_overrides(cfg, overrides)
    return cfg if schema is None else schema.validate(cfg, where)

# ----------------------------------------------------------------------------------------------- data

def build_data(dcfg: dict, *, for_model: str | None = None, model_cfg: dict | None = None
               ) -> tuple[dict, np.ndarray | None, dict]:
    """``(data, ids, info)``: the split to log / train on as a dict of arrays, its ids, and extra info
    (``vocab_size`` for text). A corpus or a data factory is tokenised by ``model_cfg``'s tokenizer."""
    if dcfg.get("factory") or dcfg.get("kind") == "corpus":
        from jaxval.data import corpus
        from jaxval.models import factory

        tok = factory.tokenizer(model_cfg) if factory.is_named_model(model_cfg) else None
        return corpus.build_data(dcfg, tok)
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
    from jaxval.models import factory

    if factory.is_named_model(mcfg):
        return factory.build_model(mcfg, data_info)
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


def _check_widths(mcfg: dict, dcfg: dict, data) -> None:
    """The model's input width must match the data's (else XLA's dot_general error, after the setup)."""
    x = data.get("x") if isinstance(data, dict) else None
    if x is None:
        return
    sizes = mcfg.get("sizes")
    if sizes is not None:
        bad = [i for i, v in enumerate(sizes) if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ConfigError(f"model.sizes[{bad[0]}] must be a positive int, got {sizes[bad[0]]!r}")
    if mcfg.get("kind") == "mlp" and mcfg.get("sizes"):
        width = int(np.prod(np.shape(x)[1:]))
        if int(mcfg["sizes"][0]) != width:
            raise ConfigError(f"model.sizes[0] is {mcfg['sizes'][0]} but the {dcfg.get('kind')} data have {width} "
                              f"features per example: set model.sizes[0] to {width}")
    if mcfg.get("kind") == "cnn" and np.ndim(x) == 4:
        ch = int(np.shape(x)[-1])
        if int(mcfg.get("in_channels", 1)) != ch:
            raise ConfigError(f"model.in_channels is {mcfg.get('in_channels', 1)} but the {dcfg.get('kind')} "
                              f"images have {ch} channels: set model.in_channels to {ch}")


def prepare(cfg: dict, progress: bool = True, split: str | None = None):
    """``(model, loss_fn, data, ids, logra)`` for a normalised config: builds the data and the model, loads
    its checkpoint or trains it (deterministically, on ``data.split``), and builds the LoGra. ``split``
    (e.g. ``"test"`` for query gradients) returns that split's data instead of ``data.split``'s."""
    from jaxval._src.logra import LoGra
    from jaxval.models import factory

    mcfg, dcfg, lcfg = cfg["model"], cfg["data"], cfg["logra"]
    data, ids, info = build_data(dcfg, for_model=mcfg.get("kind"), model_cfg=mcfg)
    _check_widths(mcfg, dcfg, data)
    if split is not None and split != dcfg.get("split", "train"):
        out_data, out_ids, _ = build_data(dict(dcfg, split=split), for_model=mcfg.get("kind"), model_cfg=mcfg)
    else:
        out_data, out_ids = data, ids
    model, loss_fn = build_model(mcfg, info)
    if mcfg.get("loss"):
        from jaxval.models.factory import load_callable

        loss_fn = load_callable(mcfg["loss"], "model.loss")
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
    elif not factory.is_named_model(mcfg):   # a pretrained model or a factory's model comes with its weights
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
