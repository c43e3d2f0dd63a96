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
:func:`starts_with_rate`: the share of texts that start with a given prefix. :func:`greedy_starts_with` answers
"does the greedy continuation start with these tokens?" exactly with ONE forward pass per batch (teacher forcing
of the target), ``k`` times cheaper than generating ``k`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxval._src.errors import ConfigError

__all__ = ["context_limit", "greedy", "greedy_text", "greedy_starts_with", "forced_batch", "forced_hits",
           "chat_prompt_ids", "starts_with_rate"]


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


def context_limit(model) -> int | None:
    """The model's context length (``model.cfg.max_seq_len`` or ``block_size``), or None if it has none."""
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
    limit = context_limit(model)
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
        ids = chat_prompt_ids(tok, prompts)
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


def forced_batch(prompts: Sequence[Sequence[int]], target: Sequence[int], pad_id: int = 0,
                 multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [n, W], lengths [n])``: each prompt followed by ``target`` (teacher forcing), right-padded to
    a width ``W`` rounded up to ``multiple``; ``lengths`` are the prompts' lengths (see :func:`forced_hits`)."""
    prompts = [[int(t) for t in p] for p in prompts]
    target = [int(t) for t in target]
    if not target:
        raise ConfigError("target must hold at least one token id")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    width = -(-(max((len(p) for p in prompts), default=0) + len(target)) // multiple) * multiple
    buf = np.full((len(prompts), width), pad_id, np.int32)
    for r, p in enumerate(prompts):
        buf[r, :len(p)] = p
        buf[r, len(p):len(p) + len(target)] = target
    return buf, np.array([len(p) for p in prompts], np.int32)


def forced_hits(logits: jax.Array, lengths: jax.Array, target: jax.Array) -> jax.Array:
    """``[B]`` bool from the logits ``[B, W, V]`` of a :func:`forced_batch`: the argmax at each row's last prompt
    position is ``target[0]`` and at each following position the next target token, i.e. (by induction) greedy
    decoding continues the prompt with exactly ``target``. Ties resolve as ``jnp.argmax`` (the lowest id)."""
    k = target.shape[0]
    pos = lengths[:, None] - 1 + jnp.arange(k)[None, :]
    pred = jnp.argmax(jnp.take_along_axis(logits, pos[:, :, None], axis=1), axis=-1)
    return jnp.all(pred == target[None, :], axis=1)


@partial(jax.jit, static_argnames=("graphdef",))
def _forced_model_hits(graphdef, state, buf, lengths, target):
    return forced_hits(nnx.merge(graphdef, state)(buf), lengths, target)


def greedy_starts_with(model: nnx.Module, prompts: Sequence[Sequence[int]], target: Sequence[int], *,
                       batch_size: int = 16, pad_id: int = 0) -> np.ndarray:
    """``[len(prompts)]`` bool: does the greedy continuation of each prompt start with the token ids ``target``?

    Exact, with ONE forward pass per batch (:func:`forced_batch`, :func:`forced_hits`) instead of ``k`` decoding
    steps: the greedy continuation starts with ``t_1..t_k`` iff, with the target appended to the prompt, the
    argmax at the prompt's last position is ``t_1`` and at each following position the next target token."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return np.zeros(0, bool)
    buf, lengths = forced_batch(prompts, target, pad_id)
    limit = context_limit(model)
    if limit is not None and int(lengths.max()) + len(target) > limit:
        raise ConfigError(f"the longest prompt ({int(lengths.max())} tokens) + the target ({len(target)}) exceeds "
                          f"the model's context ({limit})")
    if limit is not None and buf.shape[1] > limit:
        buf = buf[:, :limit]
    graphdef, state = nnx.split(model)
    n = len(buf)
    bs = min(int(batch_size), n)
    tgt = jnp.asarray([int(t) for t in target], jnp.int32)
    out = np.zeros(n, bool)
    for s in range(0, n, bs):
        idx = np.arange(s, min(s + bs, n))
        rows = np.concatenate([idx, np.repeat(idx[-1:], bs - len(idx))])
        out[idx] = np.asarray(_forced_model_hits(graphdef, state, jnp.asarray(buf[rows]), jnp.asarray(lengths[rows]),
                                                 tgt))[: len(idx)]
    return out


def chat_prompt_ids(tok, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as a user turn in the tokenizer's chat template, with the assistant's
    generation prompt (the format :func:`greedy_text` with ``chat=True`` continues)."""
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
            for p in prompts]
