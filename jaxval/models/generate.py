"""Batched greedy generation for any language model ``tokens [B, T] -> logits [B, T, V]``.

:func:`greedy` continues many prompts of different lengths at once: the prompts (sorted by length, in
batches of ``batch_size``) are right-padded into one buffer per batch, and one jit-compiled
``lax.fori_loop`` re-runs the model on the buffer at each new token, reading each row's logits at its own
last position and writing its next token after it (causal attention: the padding after a row's end cannot
change the logits read). This costs ``max_new_tokens`` forward passes of the buffer, so it suits short
continuations of many prompts (e.g. "does the answer start with 'Howdy!'?"); for one long continuation use
the key/value-cached :func:`jaxval.models.llama.generate`. The compiled loop is keyed by the model's graph,
the buffer shape and the number of steps (buffers are rounded up to 16 tokens; a short last batch is padded
with copies of its last prompt), so a batch of fine-tuned copies of one model reuses it.

:func:`greedy_text`: the same on strings, through a tokenizer (optionally the model's chat template), and
:func:`starts_with_rate`: the share of texts that start with a given prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxval._src.errors import ConfigError

__all__ = ["greedy", "greedy_text", "starts_with_rate"]


@partial(jax.jit, static_argnames=("graphdef", "steps"))
def _greedy_buffer(graphdef, state, buf, lengths, steps: int):
    model = nnx.merge(graphdef, state)
    rows = jnp.arange(buf.shape[0])

    def body(i, seq):
        pos = lengths + i - 1                                   # each row's last filled position
        nxt = jnp.argmax(model(seq)[rows, pos], axis=-1).astype(seq.dtype)
        return seq.at[rows, pos + 1].set(nxt)

    seq = jax.lax.fori_loop(0, steps, body, buf)
    return jnp.take_along_axis(seq, lengths[:, None] + jnp.arange(steps)[None, :], axis=1)


def _context_limit(model) -> int | None:
    cfg = getattr(model, "cfg", None)
    for name in ("max_seq_len", "block_size"):
        if cfg is not None and getattr(cfg, name, None):
            return int(getattr(cfg, name))
    return None


def greedy(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
           stop_ids: Sequence[int] = (), batch_size: int = 16, pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations (token ids, ``max_new_tokens`` each, cut after the first of ``stop_ids``, which is
    kept) of every prompt in ``prompts`` (lists of token ids), in the order given."""
    prompts = [[int(t) for t in p] for p in prompts]
    steps = int(max_new_tokens)
    if steps < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (add a BOS token for an unconditional start)")
    if not prompts:
        return []
    limit = _context_limit(model)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + steps > limit:
        raise ConfigError(f"the longest prompt ({longest} tokens) + max_new_tokens ({steps}) exceeds the "
                          f"model's context ({limit})")
    graphdef, state = nnx.split(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    bs = min(int(batch_size), len(prompts))
    for s in range(0, len(order), bs):
        idx = order[s:s + bs]
        rows = idx + [idx[-1]] * (bs - len(idx))                # fixed batch shape: one compilation
        width = max(len(prompts[i]) for i in rows) + steps
        width = -(-width // 16) * 16
        if limit is not None:
            width = min(width, limit)
        buf = np.full((bs, width), pad_id, np.int32)
        for r, i in enumerate(rows):
            buf[r, :len(prompts[i])] = prompts[i]
        lengths = np.array([len(prompts[i]) for i in rows], np.int32)
        new = np.asarray(_greedy_buffer(graphdef, state, jnp.asarray(buf), jnp.asarray(lengths), steps))
        for r, i in enumerate(idx):
            out[i] = [int(t) for t in new[r]]
    stops = {int(t) for t in stop_ids}
    for k, seq in enumerate(out):
        cut = next((j for j, t in enumerate(seq) if t in stops), None)
        if cut is not None:
            out[k] = seq[:cut + 1]
    return out  # type: ignore[return-value]


def greedy_text(model: nnx.Module, tok, prompts: Sequence[str], max_new_tokens: int, *, chat: bool = True,
                batch_size: int = 16, skip_special_tokens: bool = True) -> list[str]:
    """Greedy continuations (the new text only) of string prompts. ``tok`` has ``encode`` / ``decode`` (and
    ``apply_chat_template`` when ``chat``: each prompt becomes a user turn followed by the assistant's
    generation prompt); generation stops at the tokenizer's ``stop_ids`` when it has them."""
    if chat:
        ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
               for p in prompts]
    else:
        ids = [tok.encode(p) for p in prompts]
    new = greedy(model, ids, max_new_tokens, stop_ids=getattr(tok, "stop_ids", ()), batch_size=batch_size,
                 pad_id=int(getattr(tok, "pad_id", 0) or 0))
    return [tok.decode(n, skip_special_tokens=skip_special_tokens) for n in new]


def starts_with_rate(texts: Sequence[str], prefix: str, strip: bool = True) -> float:
    """Share of ``texts`` that start with ``prefix`` (after stripping leading whitespace when ``strip``);
    NaN for no texts."""
    if not texts:
        return float("nan")
    hits = [(t.lstrip() if strip else t).startswith(prefix) for t in texts]
    return float(np.mean(hits))
