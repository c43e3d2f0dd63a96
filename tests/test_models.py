"""Tests for jaxval.models (mlp, cnn, gpt, token_mlp) and jaxval.train."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxval._src import train as jtrain
from jaxval.models import cnn, gpt, mlp, token_mlp

TINY = gpt.GPTConfig(vocab_size=11, block_size=8, d_model=16, n_layer=2, n_head=2)
TINY_TIED = dataclasses.replace(TINY, tie_embeddings=True)
TRACKED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed, nnx.Conv)


@functools.cache
def _gpt(cfg: gpt.GPTConfig = TINY) -> gpt.GPT:
    """One shared (never mutated) tiny GPT per config: eager init is slow on a loaded 2-core CPU."""
    return gpt.GPT(cfg, rngs=nnx.Rngs(0))


def _tokens(b, t, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(b, t)).astype(np.int32)


def _reference_loss(logits: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Explicit per-token loop: logits [B, T-1, V] for inputs tokens[:, :-1]."""
    logits = np.asarray(logits, np.float64)
    out = np.zeros(tokens.shape[0])
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if mask[b, t + 1] == 1:
                row = logits[b, t]
                lse = row.max() + np.log(np.sum(np.exp(row - row.max())))
                out[b] += lse - row[tokens[b, t + 1]]
    return out


# ----------------------------------------------------------------------------- shapes


def test_mlp_shapes():
    m = mlp.MLP((64, 32, 16, 10), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    y = np.arange(5, dtype=np.int32)
    assert m(x).shape == (5, 10)
    assert len(m.layers) == 3
    assert mlp.loss_fn(m, {"x": x, "y": y}).shape == (5,)
    assert mlp.predict(m, x).shape == (5,)


@pytest.mark.parametrize("hw,c", [(8, 1), (28, 1), (28, 3)])
def test_cnn_shapes(hw, c):
    m = cnn.CNN(in_channels=c, num_classes=7, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(3, hw, hw, c)).astype(np.float32)
    assert m(x).shape == (3, 7)
    assert m.conv2.strides == (2, 2) and m.conv2.padding == ((1, 1), (1, 1))
    assert cnn.loss_fn(m, {"x": x, "y": np.zeros(3, np.int32)}).shape == (3,)


def test_gpt_and_token_mlp_shapes():
    m = _gpt()
    tok = _tokens(3, 6, TINY.vocab_size)
    assert gpt.logits(m, tok).shape == (3, 6, TINY.vocab_size)
    batch = {"tokens": tok, "mask": np.ones((3, 6), np.float32)}
    assert gpt.loss_fn(m, batch).shape == (3,)
    assert m.blocks[0].attn.query(jnp.zeros((3, 6, 16))).shape == (3, 6, 2, 8)

    t = token_mlp.TokenMLP(vocab_size=50, d_model=16, n_block=2, hidden=32, rngs=nnx.Rngs(0))
    tok = _tokens(2, 5, 50)
    assert t(tok).shape == (2, 5, 50)
    assert token_mlp.loss_fn(t, {"tokens": tok, "mask": np.ones((2, 5), np.float32)}).shape == (2,)


def test_gpt_rejects_too_long_sequence():
    m = _gpt()
    with pytest.raises(ValueError, match="block_size"):
        m(_tokens(1, TINY.block_size + 1, TINY.vocab_size))
    with pytest.raises(ValueError, match="divisible"):
        gpt.GPTConfig(vocab_size=5, block_size=4, d_model=10, n_layer=1, n_head=3)


# ----------------------------------------------------------------------------- GPT semantics


def test_gpt_causality():
    m = _gpt()
    tok = _tokens(2, 8, TINY.vocab_size, seed=1)
    base = np.asarray(gpt.logits(m, tok))
    for j in (0, 3, 7):
        changed = tok.copy()
        changed[:, j] = (changed[:, j] + 1) % TINY.vocab_size
        out = np.asarray(gpt.logits(m, changed))
        np.testing.assert_allclose(out[:, :j], base[:, :j], atol=1e-6)
        # the change is visible at j and (through attention) at every later position
        assert np.all(np.abs(out[:, j:] - base[:, j:]).max(axis=-1) > 1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_gpt_loss_matches_numpy_reference(tie):
    cfg = TINY_TIED if tie else TINY
    m = _gpt(cfg)
    tok = _tokens(3, 9, cfg.vocab_size, seed=2)
    mask = np.ones((3, 9), np.float32)
    mask[1, 6:] = 0  # right padding
    mask[2, 2:] = 0
    ref = _reference_loss(np.asarray(gpt.logits(m, tok[:, :-1])), tok, mask)
    got = np.asarray(gpt.loss_fn(m, {"tokens": tok, "mask": mask}))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # the loss is a SUM over tokens, not a mean
    assert got[0] > 2 * got[2] > 0


def test_gpt_padding_does_not_change_loss():
    m = _gpt()
    tok = _tokens(2, 5, TINY.vocab_size, seed=3)
    mask = np.ones((2, 5), np.float32)
    mask[1, 3:] = 0
    base = np.asarray(gpt.loss_fn(m, {"tokens": tok, "mask": mask}))
    for pad_value in (0, 7):
        ptok = np.concatenate([tok, np.full((2, 4), pad_value, np.int32)], axis=1)
        pmask = np.concatenate([mask, np.zeros((2, 4), np.float32)], axis=1)
        # junk in the already-padded slots of example 1 must not matter either
        ptok[1, 3:] = (ptok[1, 3:] + 5) % TINY.vocab_size
        padded = np.asarray(gpt.loss_fn(m, {"tokens": ptok, "mask": pmask}))
        np.testing.assert_allclose(padded, base, rtol=1e-5, atol=1e-6)
    # and the mask really removes terms: unmasking a padded token changes the loss
    pmask[1, 3] = 1
    assert not np.allclose(np.asarray(gpt.loss_fn(m, {"tokens": ptok, "mask": pmask}))[1], base[1])


def test_gpt_tied_and_untied_heads():
    untied, tied = _gpt(TINY), _gpt(TINY_TIED)
    assert tied.lm_head is None and untied.lm_head is not None
    d, v = TINY.d_model, TINY.vocab_size
    assert gpt.param_count(untied) - gpt.param_count(tied) == d * v + v
    batch = {"tokens": _tokens(2, 6, v), "mask": np.ones((2, 6), np.float32)}
    for m in (tied, untied):
        losses = np.asarray(gpt.loss_fn(m, batch))
        assert losses.shape == (2,) and np.all(np.isfinite(losses))
    # the tied head reuses the token embedding: its gradient gets a head contribution
    g = nnx.jit(nnx.grad(lambda m, b: gpt.loss_fn(m, b).sum()))(tied, batch)
    rows_unused = np.setdiff1d(np.arange(v), batch["tokens"][:, :-1])
    g_wte = np.asarray(g["wte"]["embedding"][...])
    assert rows_unused.size and np.abs(g_wte[rows_unused]).sum() > 0


def test_token_mlp_loss_matches_reference_and_param_count():
    m = nnx.eval_shape(lambda: token_mlp.TokenMLP(rngs=nnx.Rngs(0)))
    assert token_mlp.param_count(m) == 2_617_832  # ≈ 2.6M as in NOTES.md
    t = token_mlp.TokenMLP(vocab_size=13, d_model=8, n_block=2, hidden=16, rngs=nnx.Rngs(0))
    tok = _tokens(2, 6, 13, seed=4)
    mask = np.ones((2, 6), np.float32)
    mask[0, 4:] = 0
    ref = _reference_loss(np.asarray(t(tok[:, :-1])), tok, mask)
    np.testing.assert_allclose(np.asarray(token_mlp.loss_fn(t, {"tokens": tok, "mask": mask})),
                               ref, rtol=1e-5, atol=1e-5)
    b = token_mlp.random_batch(4, 16, seed=1)
    assert b["tokens"].shape == (4, 16) and b["tokens"].max() < 1000


def _model_and_batch(case: int):
    lm = {"tokens": _tokens(3, 6, 11), "mask": np.ones((3, 6), np.float32)}
    y = np.zeros(3, np.int32)
    if case == 0:
        x = np.zeros((3, 4), np.float32)
        return mlp.MLP((4, 5, 3), rngs=nnx.Rngs(0)), mlp.loss_fn, {"x": x, "y": y}
    if case == 1:
        x = np.zeros((3, 8, 8, 1), np.float32)
        return cnn.CNN(rngs=nnx.Rngs(0)), cnn.loss_fn, {"x": x, "y": y}
    if case == 2:
        return _gpt(TINY), gpt.loss_fn, lm
    if case == 3:
        return _gpt(TINY_TIED), gpt.loss_fn, lm
    return token_mlp.TokenMLP(11, 8, 2, 16, rngs=nnx.Rngs(0)), token_mlp.loss_fn, lm


@pytest.mark.parametrize("case", range(5))
def test_every_layer_is_called_with_a_batch_axis(case, monkeypatch):
    """Contract for jaxval's capture: each tracked layer is used via __call__ (or Embed.attend),
    and its output keeps the leading batch axis B."""
    model, loss_fn, batch = _model_and_batch(case)
    seen: dict[int, list] = {}

    def wrap(cls, name):
        orig = getattr(cls, name)

        def f(self, *a, **k):
            out = orig(self, *a, **k)
            seen.setdefault(id(self), []).append((name, out.shape))
            return out

        monkeypatch.setattr(cls, name, f)

    for cls in TRACKED:
        wrap(cls, "__call__")
    wrap(nnx.Embed, "attend")
    loss_fn(model, batch)
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, TRACKED)]
    assert layers
    for layer in layers:
        assert id(layer) in seen, f"{type(layer).__name__} was not applied through __call__"
        assert all(shape[0] == 3 for _, shape in seen[id(layer)]), seen[id(layer)]
    if case == 3:  # tied head: the token embedding is used as the LM head through Embed.attend
        assert [n for n, _ in seen[id(model.wte)]] == ["__call__", "attend"]


# ----------------------------------------------------------------------------- presets


def test_gpt_presets_param_counts():
    presets = gpt.sizes()
    counts = {k: gpt.param_count(nnx.eval_shape(lambda c=c: gpt.GPT(c, rngs=nnx.Rngs(0))))
              for k, c in presets.items()}
    assert 0.1e6 <= counts["small"] <= 0.4e6, counts
    assert 1.0e6 <= counts["medium"] <= 4.0e6, counts
    assert counts["large"] >= 10e6 and presets["large"].block_size >= 128, counts


# ----------------------------------------------------------------------------- training


def test_train_digits_mlp():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    tr, te = perm[:1400], perm[1400:]
    data = {"x": x[tr], "y": y[tr]}
    model = mlp.MLP((64, 128, 10), rngs=nnx.Rngs(0))
    before = float(mlp.loss_fn(model, data).mean())
    t0 = time.perf_counter()
    out = jtrain.train(model, mlp.loss_fn, data, steps=300, batch_size=64, lr=1e-2, progress=False)
    elapsed = time.perf_counter() - t0
    assert out is model
    after = float(mlp.loss_fn(model, data).mean())
    acc = float(np.mean(np.asarray(mlp.predict(model, x[te])) == y[te]))
    assert after < 0.2 * before, (before, after)
    assert acc > 0.9, acc
    assert elapsed < 20, elapsed


def test_train_is_deterministic_and_checks_loss_shape():
    data = {"x": np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32),
            "y": np.random.default_rng(1).integers(0, 3, 40).astype(np.int32)}

    def run(seed):
        m = mlp.MLP((4, 8, 3), rngs=nnx.Rngs(0))
        jtrain.train(m, mlp.loss_fn, data, steps=7, batch_size=16, lr=1e-2, seed=seed,
                     progress=False)
        return np.asarray(m.layers[0].kernel[...])

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))
    with pytest.raises(ValueError, match="per-example"):
        jtrain.train(mlp.MLP((4, 8, 3), rngs=nnx.Rngs(0)),
                     lambda m, b: mlp.loss_fn(m, b).mean(), data, steps=1, batch_size=8, lr=1e-3,
                     progress=False)
    with pytest.raises(ValueError, match="leading axis"):
        jtrain.train(mlp.MLP((4, 8, 3), rngs=nnx.Rngs(0)), mlp.loss_fn,
                     {"x": data["x"], "y": data["y"][:5]}, steps=1, batch_size=8, lr=1e-3)


def test_train_step_fn_matches_direct_gradient():
    model = _gpt()
    batch = {"tokens": _tokens(3, 7, TINY.vocab_size, seed=5), "mask": np.ones((3, 7), np.float32)}
    step = jtrain.train_step_fn(model, gpt.loss_fn)
    loss, grads = step(nnx.state(model), batch)
    ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(lambda m, b: gpt.loss_fn(m, b).mean()))(
        model, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
