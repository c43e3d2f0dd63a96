"""Small GPT (decoder-only transformer) language model.

Batch format (all LM models in jaxval): ``{"tokens": int32 [B, T], "mask": float32 [B, T]}``,
padding on the right. The model reads ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``; the
per-example loss is the SUM of token cross-entropies over target positions where ``mask[:, 1:]``
is 1.
Attention is causal, so right padding cannot change the logits of earlier (real) positions.

Every parametrised layer is applied through its ``__call__`` (or ``wte.attend`` for a tied head),
and every layer output keeps the leading batch axis (positions are broadcast to [B, T] before the
position embedding), so per-example layer inputs and output cotangents can be captured.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Architecture of a :class:`GPT`. ``d_mlp=None`` means ``4 * d_model``."""

    vocab_size: int
    block_size: int
    d_model: int
    n_layer: int
    n_head: int
    d_mlp: int | None = None
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by n_head={self.n_head}"
            )
        for name in ("vocab_size", "block_size", "d_model", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden(self) -> int:
        return 4 * self.d_model if self.d_mlp is None else self.d_mlp


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention. x [B, T, d_model] -> [B, T, d_model].

    q/k/v: ``nnx.LinearGeneral(d_model, (n_head, head_dim))`` -> [B, T, H, Dh];
    output projection: ``nnx.Einsum("bthd,hdm->btm")`` with bias.
    """

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        h, dh, d = cfg.n_head, cfg.head_dim, cfg.d_model
        self.n_head, self.head_dim = h, dh
        self.query = nnx.LinearGeneral(d, (h, dh), rngs=rngs)
        self.key = nnx.LinearGeneral(d, (h, dh), rngs=rngs)
        self.value = nnx.LinearGeneral(d, (h, dh), rngs=rngs)
        self.out = nnx.Einsum("bthd,hdm->btm", (h, dh, d), (d,), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        t = x.shape[1]
        q = self.query(x)                                   # [B, T, H, Dh]
        k = self.key(x)
        v = self.value(x)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(self.head_dim, q.dtype))
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))     # [Tq, Tk]
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)             # [B, H, T, T]
        y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)         # [B, T, H, Dh]
        return self.out(y)                                  # [B, T, d_model]


class FeedForward(nnx.Module):
    """Linear(d, hidden) -> GELU -> Linear(hidden, d). x [B, T, d] -> [B, T, d]."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(d_model, hidden, rngs=rngs)
        self.proj = nnx.Linear(hidden, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(nnx.gelu(self.fc(x)))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ln2 = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)
        self.mlp = FeedForward(cfg.d_model, cfg.hidden, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nnx.Module):
    """GPT language model.

    ``__call__``: tokens int [B, T] (T <= block_size) -> logits [B, T, vocab].
    """

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.wpe = nnx.Embed(cfg.block_size, cfg.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)
        self.lm_head = (
            None if cfg.tie_embeddings else nnx.Linear(cfg.d_model, cfg.vocab_size, rngs=rngs)
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2:
            raise ValueError(f"GPT expects tokens of shape [B, T], got {tokens.shape}")
        b, t = tokens.shape
        if t > self.cfg.block_size:
            raise ValueError(
                f"sequence length {t} exceeds block_size={self.cfg.block_size}; "
                "truncate the tokens or build the model with a larger block_size"
            )
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        h = self.wte(tokens) + self.wpe(pos)                # [B, T, d]
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        if self.lm_head is None:
            return self.wte.attend(h)                       # [B, T, vocab]
        return self.lm_head(h)                              # [B, T, vocab]


def logits(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """Logits [B, T, vocab] for tokens int [B, T]."""
    return model(tokens)


def sequence_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-example SUM of masked token cross-entropies.

    logits [B, T, V], targets int [B, T], mask [B, T] (1 = counted, 0 = ignored) -> [B] float32.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(jnp.where(mask > 0, ce, 0.0), axis=-1)


def lm_loss_fn(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
    """Next-token per-example loss [B] for any model mapping tokens [B, T] -> logits [B, T, V].

    batch ``{"tokens": int [B, T], "mask": float [B, T]}`` (``mask`` optional: all ones).
    """
    tokens = batch["tokens"]
    mask = batch.get("mask")
    if mask is None:
        mask = jnp.ones(tokens.shape, jnp.float32)
    return sequence_loss(model(tokens[:, :-1]), tokens[:, 1:], mask[:, 1:])


def loss_fn(model: GPT, batch: dict[str, jax.Array]) -> jax.Array:
    """Per-example LM loss [B] of a :class:`GPT`: see :func:`lm_loss_fn`."""
    return lm_loss_fn(model, batch)


def param_count(model: nnx.Module) -> int:
    """Number of scalar parameters (``nnx.Param`` leaves) of a model."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def sizes() -> dict[str, GPTConfig]:
    """Preset configs for benchmarks (byte-level vocabulary of 256, untied head).

    small ~0.2M params, medium ~2M, large ~11M (block_size 256).
    """
    return {
        "small": GPTConfig(vocab_size=256, block_size=64, d_model=64, n_layer=4, n_head=4),
        "medium": GPTConfig(vocab_size=256, block_size=128, d_model=128, n_layer=10, n_head=4),
        "large": GPTConfig(vocab_size=256, block_size=256, d_model=384, n_layer=6, n_head=6),
    }
