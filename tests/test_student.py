"""The fine-tuned ALinFiK student (top encoder blocks + head) on a tiny random BERT: the split forward equals the
full encoder, fine-tuning changes the encoder and beats the frozen-embedding head on a learnable target,
save / load round-trips the predictions exactly and refuses another lower encoder."""

import numpy as np
import pytest
from flax import nnx

from jaxval import CheckpointError
from jaxval.evaluation import spearman
from jaxval.models import bert
from jaxval.valuation import alinfik as al

WORDS = [f"w{i}" for i in range(24)]


class WordTok:
    """[CLS]=1 words... [SEP]=2, padding 0, right-padded to the longest text."""

    def __call__(self, texts):
        rows = [[1] + [3 + WORDS.index(w) for w in t.split()] + [2] for t in texts]
        t = max(map(len, rows))
        ids = np.zeros((len(rows), t), np.int32)
        mask = np.zeros((len(rows), t), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return {"input_ids": ids, "attention_mask": mask}


def _setup(n=360, seed=0):
    enc = bert.BertEncoder(bert.tiny_config(n_layer=2), rngs=nnx.Rngs(seed))
    r = np.random.default_rng(seed)
    texts = [" ".join(r.choice(WORDS, size=r.integers(4, 12))) for _ in range(n)]
    w = r.normal(size=len(WORDS))
    # a per-word value averaged over the text: learnable per token, not a linear read-out of 16 pooled features
    y = np.array([np.mean([w[WORDS.index(x)] for x in t.split()]) for t in texts])
    return enc, WordTok(), texts, y


def test_cached_lower_forward_equals_full_encoder():
    enc, tok, texts, _ = _setup(40)
    b = tok(texts)
    full = np.asarray(bert.sentence_embedding(enc, b["input_ids"], b["attention_mask"]))
    np.testing.assert_allclose(np.asarray(enc(b["input_ids"], b["attention_mask"]))[b["attention_mask"] > 0],
                               np.asarray(enc.from_layer(enc.hidden_after(b["input_ids"], b["attention_mask"], n_layers=1),
                                                         b["attention_mask"], 1))[b["attention_mask"] > 0],
                               atol=1e-5, rtol=1e-5)
    for n_lower in (0, 1):
        st = al.encode_lower(texts, (enc, tok), n_lower, batch_size=16)      # padded last batch
        assert st.h.shape[:2] == b["input_ids"].shape and st.n_lower == n_lower
        np.testing.assert_allclose(al.frozen_embeddings(enc, st, batch_size=16), full, atol=1e-5, rtol=1e-5)
    adv = al.advance(al.encode_lower(texts, (enc, tok), 0, batch_size=16), enc, 1, batch_size=16)
    np.testing.assert_allclose(adv.h, al.encode_lower(texts, (enc, tok), 1).h, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="n_lower"):
        al.encode_lower(texts, (enc, tok), 2)


def test_finetuned_student_beats_frozen_and_round_trips(tmp_path):
    enc, tok, texts, y = _setup()
    lab, held = np.arange(240), np.arange(240, len(texts))
    before = {p: np.asarray(v[...]).copy() for p, v in nnx.to_flat_state(nnx.state(enc.layers[1], nnx.Param))}
    states = al.encode_lower(texts, (enc, tok), 0)
    st = al.fit_encoder_student(None, y[lab], (enc, tok), states=states.take(lab), n_finetune=2, hidden=(32,),
                                lr=3e-3, head_lr=3e-3, batch_size=32, max_epochs=30, patience=8, seed=0)
    pred = st.score([texts[i] for i in held])
    np.testing.assert_allclose(pred, st.predict_states(states.take(held)), rtol=1e-5, atol=1e-6)
    rho_ft = spearman(pred, y[held])
    # the fine-tuned copy moved; the frozen encoder it came from did not
    moved = max(float(np.abs(np.asarray(v[...]) - before[p]).max())
                for p, v in nnx.to_flat_state(nnx.state(st.net.layers[1], nnx.Param)))
    assert moved > 1e-3
    for p, v in nnx.to_flat_state(nnx.state(enc.layers[1], nnx.Param)):
        np.testing.assert_array_equal(np.asarray(v[...]), before[p])
    # the frozen-embedding baseline: the same encoder's sentence embeddings, the same head size and loss
    E = al.frozen_embeddings(enc, states)
    fr = al.fit_student(None, y[lab], lambda t: None, embeddings=E[lab], hidden=(32,), lr=3e-3, max_epochs=150,
                        patience=25, seed=0)
    rho_fr = spearman(fr.predict_embeddings(E[held]), y[held])
    assert rho_ft > 0.65 and rho_ft > rho_fr + 0.2, (rho_ft, rho_fr)
    # checkpoint: exact round trip, dispatch from Student.load, a custom lower encoder must be passed back
    path = str(tmp_path / "st")
    st.save(path)
    st2 = al.Student.load(path, encoder=(enc, tok))
    assert isinstance(st2, al.EncoderStudent) and st2.meta["n_finetune"] == 2
    np.testing.assert_array_equal(st2.score([texts[i] for i in held]), pred)
    with pytest.raises(ValueError, match="custom encoder"):
        al.load_student(path)
    other = bert.BertEncoder(bert.tiny_config(n_layer=2), rngs=nnx.Rngs(9))
    with pytest.raises(CheckpointError, match="other weights"):
        al.load_student(path, encoder=(other, tok))
