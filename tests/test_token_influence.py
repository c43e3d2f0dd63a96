"""Per-token influence (jv.token_influence): the parts sum to the pair's score and equal an explicit
per-token computation (vmap(grad) of each single token's cross-entropy, gathered by position, not through
the mask, then projected)."""

import warnings

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxval as jv
from jaxval.models import gpt
from conftest import explicit

T = 9


@pytest.fixture(scope="module")
def setup():
    cfg = gpt.GPTConfig(vocab_size=13, block_size=T, d_model=16, n_layer=1, n_head=2)
    model = gpt.GPT(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    train = {"tokens": rng.integers(0, 13, (5, T)).astype(np.int32), "mask": np.ones((5, T), np.float32)}
    train["mask"][1, 6:] = 0.0      # a padded example
    train["mask"][2, 3] = 0.0       # a token left out inside the sequence
    query = {"tokens": rng.integers(0, 13, (2, T)).astype(np.int32), "mask": np.zeros((2, T), np.float32)}
    query["mask"][:, 4:] = 1.0      # loss on the "generation" only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logra = jv.LoGra(model, gpt.loss_fn, rank=4, seed=0)
    return model, logra, _SPD(logra.dim), train, query


class _SPD:
    """A dense symmetric positive-definite H⁻¹ (any object with ``apply`` is a preconditioner)."""

    def __init__(self, d):
        a = np.random.default_rng(1).normal(size=(d, d)) / np.sqrt(d)
        self.m = jnp.asarray(a @ a.T + 0.1 * np.eye(d), jnp.float32)

    def apply(self, g):
        return jnp.asarray(g, jnp.float32) @ self.m


def _token_ce(model, batch):
    """The cross-entropy of ONE target position per example (batch["t"]), times its 0/1 weight: the
    reference per-token loss, read by index rather than through a one-hot mask."""
    lg = model(batch["tokens"][:, :-1]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(lg, batch["tokens"][:, 1:])     # [B, T-1]
    t = batch["t"]
    return jnp.take_along_axis(ce, (t - 1)[:, None], axis=1)[:, 0] * batch["w"]


def _explicit_token_grads(model, logra, *batches):
    """[B, T, D] per batch: vmap(grad) of each target token's loss (0 where masked), projected
    (jv.explicit_grads), in one call for all the batches."""
    toks = np.concatenate([np.repeat(b["tokens"], T - 1, axis=0) for b in batches])
    t = np.concatenate([np.tile(np.arange(1, T), len(b["tokens"])) for b in batches]).astype(np.int32)
    w = np.concatenate([(b["mask"][:, 1:] > 0).reshape(-1) for b in batches]).astype(np.float32)
    g = np.asarray(explicit(model, _token_ce, logra.projections, {"tokens": toks, "t": t, "w": w}))
    out, s = [], 0
    for b in batches:
        n = len(b["tokens"])
        o = np.zeros((n, T, logra.dim), np.float64)
        o[:, 1:] = g[s: s + n * (T - 1)].reshape(n, T - 1, -1)
        out.append(o)
        s += n * (T - 1)
    return out


def test_parts_sum_to_scores_and_match_explicit(setup):
    model, logra, pc, train, query = setup
    mode = "cosine"
    ti = jv.token_influence(logra, model, query, train, precond=pc, mode=mode, chunk=5)
    assert ti.train_tokens.shape == (2, 5, T) and ti.query_tokens.shape == (2, 5, T)
    scale = np.abs(ti.scores).max()
    # exact split: the parts sum to the score (float32 tolerance), on both sides
    np.testing.assert_allclose(ti.train_tokens.sum(-1), ti.scores, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(ti.query_tokens.sum(-1), ti.scores, rtol=1e-4, atol=1e-5 * scale)
    # masked-out tokens get nothing; position 0 predicts nothing
    assert np.all(ti.train_tokens[:, 1, 6:] == 0) and np.all(ti.train_tokens[:, 2, 3] == 0)
    assert np.all(ti.query_tokens[:, :, :4] == 0)
    np.testing.assert_allclose(ti.train_tokens[..., 0], 0, atol=1e-6 * scale)

    # the explicit reference: per-token vmap(grad), projected, in float64 from here on
    gz_t, gq_t = _explicit_token_grads(model, logra, train, query)         # [N, T, D], [Q, U, D]
    gz, gq = gz_t.sum(1), gq_t.sum(1)
    qt = np.asarray(pc.apply(gq.astype(np.float32)), np.float64)           # H⁻¹ g_q
    zt = np.asarray(pc.apply(gz.astype(np.float32)), np.float64)
    norm = np.ones((2, 5))
    if mode == "cosine":
        norm = np.sqrt(np.einsum("qd,qd->q", qt, gq))[:, None] * np.sqrt(np.einsum("nd,nd->n", zt, gz))[None]
    ref_train = np.einsum("qd,ntd->qnt", qt, gz_t) / norm[..., None]
    qt_tok = np.asarray(pc.apply(gq_t.reshape(-1, logra.dim).astype(np.float32)), np.float64).reshape(gq_t.shape)
    ref_query = np.einsum("qud,nd->qnu", qt_tok, gz) / norm[..., None]
    tol = 2e-4 * np.abs(ref_train).max()
    np.testing.assert_allclose(ti.train_tokens, ref_train, atol=tol)
    np.testing.assert_allclose(ti.query_tokens, ref_query, atol=2e-4 * np.abs(ref_query).max())
    np.testing.assert_allclose(ti.scores, (np.einsum("qd,nd->qn", qt, gz) / norm), rtol=1e-3, atol=tol)


def test_gradient_queries_and_no_preconditioner(setup):
    model, logra, _pc, train, query = setup
    gq = np.asarray(logra.grads(model, query))
    ti = jv.token_influence(logra, model, gq, train, mode="dot", chunk=5)
    assert ti.query_tokens is None
    np.testing.assert_allclose(ti.scores, gq @ np.asarray(logra.grads(model, train)).T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ti.train_tokens.sum(-1), ti.scores, rtol=1e-4, atol=1e-5 * np.abs(ti.scores).max())
    with pytest.raises(ValueError, match="mode"):
        jv.token_influence(logra, model, gq, train, mode="l2")


def test_warns_when_the_loss_is_not_linear_in_the_mask(setup):
    model, _logra, _pc, train, query = setup

    def mean_loss(m, batch):   # normalised by the mask's sum: not a mask-weighted sum of token losses
        return gpt.loss_fn(m, batch) / jnp.maximum(batch["mask"][:, 1:].sum(-1), 1.0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lg = jv.LoGra(model, mean_loss, rank=4, seed=0)
    with pytest.warns(UserWarning, match="not a mask-weighted sum"):
        jv.token_influence(lg, model, query, train, chunk=5)
