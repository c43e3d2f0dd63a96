"""ALinFiK: student distillation on a synthetic task, checkpoint round trip, selection and pricing."""

import numpy as np
import pytest

from jaxval import ConfigError
from jaxval.valuation import alinfik
from jaxval.valuation.alinfik import Student, fit_student, hashed_ngram_embed, make_embed_fn, price, select, statement
from jaxval.evaluation import spearman

WORDS = ("river stone market engine violin castle orbit pepper signal harbor forest candle rocket glacier "
         "poem ledger falcon copper meadow tunnel").split()


def _texts(n, seed):
    r = np.random.default_rng(seed)
    return [" ".join(r.choice(WORDS, size=r.integers(4, 12))) for _ in range(n)]


def test_hashed_embed_deterministic():
    a = hashed_ngram_embed(["hello world", "abc"], dim=64)
    b = hashed_ngram_embed(["hello world", "abc"], dim=64)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert make_embed_fn("hashed:dim=32,ngrams=2-3")(["x y"]).shape == (1, 32)


def test_student_learns_synthetic_target(tmp_path):
    fn = make_embed_fn("hashed:dim=256")
    texts = _texts(700, 0)
    e = fn(texts)
    w = np.random.default_rng(1).normal(size=e.shape[1])
    target = np.tanh(e @ w) + 0.3 * (e @ w) ** 2               # a known non-linear function of the embedding
    tr, te = slice(0, 500), slice(500, None)
    st = fit_student(texts[tr], target[tr], fn, hidden=(128,), seed=0, max_epochs=150, patience=25)
    pred = st.score(texts[te])
    rho = spearman(pred, target[te])
    assert rho > 0.8, rho
    assert st.meta["val_spearman"] > 0.8
    # checkpoint round trip: same predictions, embedder restored by name
    st.save(str(tmp_path / "student"))
    st2 = Student.load(str(tmp_path / "student"))
    np.testing.assert_allclose(st2.score(texts[te]), pred, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileExistsError):
        st.save(str(tmp_path / "student"))


def test_student_ignores_columns_constant_in_training(tmp_path):
    # a feature that never varies among the training rows (a token no training text has) carries nothing the
    # head could learn: whatever value it takes at prediction time must not move the score (dividing by its ~0
    # spread would turn a 1 into ~1e6 and the score into noise); after a save / load round trip too
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    x[:, 2] = 0.25                                              # constant in every training row
    v = x[:, 0] - 0.5 * x[:, 1] + 0.1 * rng.normal(size=300)
    st = fit_student(None, v, lambda t: None, embeddings=x, hidden=(16,), seed=0, max_epochs=150, patience=40)
    probe = rng.normal(size=(40, 6)).astype(np.float32)
    probe[:, 2] = 0.25
    moved = probe.copy()
    moved[:, 2] = np.tile([1.0, -3.0, 40.0, 0.0, 0.26, 1e3, -1e3, 2.0, 0.5, 7.0], 4)
    p0 = st.predict_embeddings(probe)
    np.testing.assert_array_equal(st.predict_embeddings(moved), p0)
    assert np.std(p0) > 0 and spearman(p0, probe[:, 0] - 0.5 * probe[:, 1]) > 0.6     # it did learn the rest
    st.save(str(tmp_path / "s"))
    np.testing.assert_array_equal(Student.load(str(tmp_path / "s"), embed_fn=lambda t: None).predict_embeddings(moved), p0)


@pytest.mark.parametrize("d", [5, 200])          # the primal (d < n) and the dual (d > n) solve
def test_ridge_student_is_ridge_regression(tmp_path, d):
    # reference: numpy least squares on the augmented system [X; sqrt(lam n) I] w = [y; 0] over the training
    # split's standardised rows (float64), mapped back to LinFiK units
    from jaxval.valuation.student import split_labelled

    rng = np.random.default_rng(d)
    n, lam = 60, 0.3
    x = rng.normal(size=(n, d)).astype(np.float32) * rng.uniform(0.5, 3.0, size=d).astype(np.float32)
    v = x[:, 0] - 2.0 * x[:, 1] + 0.3 * rng.normal(size=n) + 5.0
    st = fit_student(None, v, lambda t: None, embeddings=x, ridge=lam, seed=1)
    it, _ = split_labelled(n, 0.2, 1)
    xt = x[it].astype(np.float64)
    mu, sd = xt.mean(0), xt.std(0)
    a = (xt - mu) / sd
    yt = (v[it] - v[it].mean()) / v[it].std()
    aug = np.vstack([a, np.sqrt(lam * len(it)) * np.eye(d)])
    w = np.linalg.lstsq(aug, np.concatenate([yt, np.zeros(d)]), rcond=None)[0]
    probe = rng.normal(size=(9, d)).astype(np.float32)
    want = ((probe - mu) / sd) @ w * v[it].std() + v[it].mean()
    np.testing.assert_allclose(st.predict_embeddings(probe), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    assert st.meta["head"] == "ridge" and -1 <= st.meta["val_spearman"] <= 1
    st.save(str(tmp_path / "r"))
    np.testing.assert_allclose(Student.load(str(tmp_path / "r"), embed_fn=lambda t: None).predict_embeddings(probe),
                               st.predict_embeddings(probe), rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="ridge"):
        fit_student(None, v, lambda t: None, embeddings=x, ridge=0.0)


def test_rank_target_student_against_reference(tmp_path):
    # reference: normal scores from the standard library's inverse CDF, numpy least squares on the augmented
    # system, and a loop that maps each prediction back through the sorted training targets
    from statistics import NormalDist

    from jaxval.valuation.student import split_labelled

    rng = np.random.default_rng(5)
    n, d, lam = 80, 6, 0.2
    x = rng.normal(size=(n, d)).astype(np.float32)
    v = np.exp(2.0 * (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=n)))      # heavy tailed, all distinct
    st = fit_student(None, v, lambda t: None, embeddings=x, ridge=lam, seed=2, target="rank")
    it, _ = split_labelled(n, 0.2, 2)
    m = len(it)
    srt = np.sort(v[it])
    zt = np.array([NormalDist().inv_cdf((np.searchsorted(srt, vi) + 0.5) / m) for vi in v[it]])
    xt = x[it].astype(np.float64)
    mu, sd = xt.mean(0), xt.std(0)
    aug = np.vstack([(xt - mu) / sd, np.sqrt(lam * m) * np.eye(d)])
    w = np.linalg.lstsq(aug, np.concatenate([zt, np.zeros(d)]), rcond=None)[0]
    probe = np.vstack([rng.normal(size=(20, d)), 4.0 * rng.normal(size=(5, d))]).astype(np.float32)
    zp = ((probe - mu) / sd) @ w
    kz = np.array([NormalDist().inv_cdf((i + 0.5) / m) for i in range(m)])
    slope = (srt[-1] - srt[0]) / (kz[-1] - kz[0])
    want = []
    for z in zp:
        if z <= kz[0]:
            want.append(srt[0] + slope * (z - kz[0]))
        elif z >= kz[-1]:
            want.append(srt[-1] + slope * (z - kz[-1]))
        else:
            j = int(np.nonzero(kz <= z)[0][-1])
            want.append(srt[j] + (srt[j + 1] - srt[j]) * (z - kz[j]) / (kz[j + 1] - kz[j]))
    want = np.array(want)
    assert (zp < kz[0]).any() or (zp > kz[-1]).any()                   # the extrapolation is exercised
    got = st.predict_embeddings(probe)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    assert spearman(got, zp) == pytest.approx(1.0)
    assert st.meta["target"] == "rank"
    st.save(str(tmp_path / "r"))
    np.testing.assert_allclose(Student.load(str(tmp_path / "r"), embed_fn=lambda t: None).predict_embeddings(probe),
                               got, rtol=1e-6, atol=1e-6)
    # a monotone transform of the teacher leaves the rank student's order unchanged, not the value student's
    st_log = fit_student(None, np.log(v), lambda t: None, embeddings=x, ridge=lam, seed=2, target="rank")
    assert spearman(st_log.predict_embeddings(probe), got) == pytest.approx(1.0)
    st_val = fit_student(None, v, lambda t: None, embeddings=x, ridge=lam, seed=2)
    assert spearman(st_val.predict_embeddings(probe), got) < 0.999
    with pytest.raises(ValueError, match="target"):
        fit_student(None, v, lambda t: None, embeddings=x, ridge=lam, target="ranks")
    with pytest.raises(ConfigError, match="distinct"):
        fit_student(None, np.ones(n), lambda t: None, embeddings=x, ridge=lam, target="rank")


def test_rank_target_mlp_student_learns_a_heavy_tailed_teacher():
    # the MLP head on the rank target: held-out order learnt, predictions in the teacher's units (inside or near
    # the training range)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    sig = x[:, 0] - 0.5 * x[:, 1]
    v = np.exp(3.0 * sig)
    st = fit_student(None, v[:200], lambda t: None, embeddings=x[:200], hidden=(32,), seed=0, max_epochs=200,
                     patience=30, target="rank")
    p = st.predict_embeddings(x[200:])
    assert spearman(p, v[200:]) > 0.85
    # in teacher units: the held-out quartiles of the predictions are the teacher's, within a factor of 3 (the
    # normal scores' quartiles are about -0.67, 0, 0.67; the teacher's about 0.1, 1, 10)
    ratio = np.quantile(p, [0.25, 0.5, 0.75]) / np.quantile(v[200:], [0.25, 0.5, 0.75])
    assert st.meta["target"] == "rank" and np.all((ratio > 1 / 3) & (ratio < 3.0)), ratio


def test_rank_student_returns_training_targets_when_it_interpolates():
    # more columns than rows and a tiny penalty: the fit passes through the training normal scores, so the map
    # back gives each training row its own teacher value (ties too: they share their mean normal score)
    from jaxval.valuation.student import split_labelled

    rng = np.random.default_rng(9)
    n, d = 50, 300
    x = rng.normal(size=(n, d)).astype(np.float32)
    v = np.round(rng.standard_t(2, size=n), 1)                          # heavy tails and ties
    st = fit_student(None, v, lambda t: None, embeddings=x, ridge=1e-9, seed=0, target="rank")
    it, _ = split_labelled(n, 0.2, 0)
    assert len(np.unique(v[it])) < len(it)
    np.testing.assert_allclose(st.predict_embeddings(x[it]), v[it], atol=2e-3)


def test_student_target_shuffle_fails():
    """The Spearman check can fail: a student trained on shuffled targets does not predict held-out ones."""
    fn = make_embed_fn("hashed:dim=256")
    texts = _texts(400, 3)
    e = fn(texts)
    target = e @ np.random.default_rng(2).normal(size=e.shape[1])
    shuffled = np.random.default_rng(4).permutation(target[:300])
    st = fit_student(texts[:300], shuffled, fn, hidden=(64,), seed=0, max_epochs=40, patience=10)
    assert abs(spearman(st.score(texts[300:]), target[300:])) < 0.4


def test_select_budget_and_ties():
    pred = np.array([0.5, 2.0, 2.0, -1.0, 0.5, 3.0])
    assert select(pred, 3).tolist() == [5, 1, 2]
    assert select(pred, 4).tolist() == [5, 1, 2, 0]            # tie 0 vs 4: lower index first
    assert len(select(pred, 0)) == 0
    for b in range(len(pred) + 1):
        s = select(pred, b)
        assert len(s) == b and len(set(s.tolist())) == b
        assert pred[s].min(initial=np.inf) >= np.delete(pred, s).max(initial=-np.inf)
    costs = np.array([1, 5, 1, 1, 1, 2])
    s = select(pred, 4, costs=costs)
    assert costs[s].sum() <= 4 and s.tolist() == [5, 2, 0]
    with pytest.raises(ValueError):
        select(pred, 7)
    with pytest.raises(ValueError):
        select([1.0, np.nan], 1)


@pytest.mark.parametrize("rule", alinfik.PRICE_RULES)
def test_price_properties(rule):
    r = np.random.default_rng(0)
    pred = np.round(r.normal(size=200), 1)                      # many ties, negatives
    p = price(pred, 1000.0, rule=rule)
    assert np.all(p >= 0)
    assert p.sum() == pytest.approx(1000.0, rel=1e-12)
    order = np.argsort(pred, kind="stable")
    assert np.all(np.diff(p[order]) >= -1e-12)                # monotone non-decreasing in the score
    for val in np.unique(pred):
        assert np.ptp(p[pred == val]) <= 1e-12                  # ties equal
    if rule == "positive":
        assert np.all(p[pred <= 0] == 0) and np.all(p[pred > 0] > 0)


def test_price_no_value_cases():
    neg = np.array([-1.0, -2.0, -0.5])
    np.testing.assert_allclose(price(neg, 9.0), [3, 3, 3])
    np.testing.assert_allclose(price(neg, 9.0, if_no_value="zero"), 0)
    np.testing.assert_allclose(price(np.ones(4), 8.0, rule="shifted"), 2)
    np.testing.assert_allclose(price(np.array([1.0, 3.0]), 8.0), [2, 6])
    with pytest.raises(ValueError):
        price(neg, -1.0)


def test_statement():
    pred = np.array([3.0, -1.0, 1.0, 0.0])
    st = statement(pred, 100.0, ["alice", "bob", "alice", "bob"], selected=[0, 2])
    a, b = st["providers"]["alice"], st["providers"]["bob"]
    assert a["payout"] == pytest.approx(100.0) and b["payout"] == 0.0
    assert a["samples"][0]["id"] == 0 and a["samples"][0]["price"] == pytest.approx(75.0)
    assert "≤ 0" in b["samples"][0]["reason"] and a["n_selected"] == 2
    md = alinfik.format_statement(st)
    assert "alice" in md and "75.0000" in md


def test_cli_train_score_select_price(tmp_path, capsys):
    """`jaxval alinfik train | score | select | price` on files like those `jaxval linfik` writes: the
    selection is the top-budget of the written scores, prices sum to the total, and inconsistent inputs are
    refused with one line and exit status 2."""
    import json

    from jaxval.cli.app import main

    texts = _texts(120, 5)
    e = hashed_ngram_embed(texts, dim=64)
    v = (e @ np.random.default_rng(0).normal(size=64)).astype(np.float32)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": i, "text": t, "provider": f"p{i % 3}"}) + "\n"
                            for i, t in enumerate(texts)))
    np.save(tmp_path / "v.npy", v)
    scfg = tmp_path / "s.yaml"
    scfg.write_text("fraction: 0.5\nembed: hashed:dim=64\nhidden: [32]\nmax_epochs: 15\npatience: 5\nbatch_size: 16\n")
    st = tmp_path / "student"
    assert main(["alinfik", "train", "--pool", str(pool), "--values", str(tmp_path / "v.npy"), "--out", str(st),
                 "--config", str(scfg)]) == 0
    assert len(Student.load(str(st)).meta["labelled_indices"]) == 60
    assert main(["alinfik", "score", "--student", str(st), "--texts", str(pool), "--out", str(tmp_path / "p.npy")]) == 0
    pred = np.load(tmp_path / "p.npy")
    np.testing.assert_allclose(pred, Student.load(str(st)).score(texts), rtol=1e-5, atol=1e-6)
    assert main(["alinfik", "select", "--scores", str(tmp_path / "p.npy"), "--budget", "10",
                 "--out", str(tmp_path / "sel.json")]) == 0
    sel = json.loads((tmp_path / "sel.json").read_text())
    assert sorted(sel) == sorted(np.argsort(-pred, kind="stable")[:10].tolist())
    assert main(["alinfik", "price", "--scores", str(tmp_path / "p.npy"), "--total", "100", "--providers", str(pool),
                 "--out", str(tmp_path / "price.json")]) == 0
    stmt = json.loads((tmp_path / "price.json").read_text())
    assert set(stmt["providers"]) == {"p0", "p1", "p2"}
    assert sum(p["payout"] for p in stmt["providers"].values()) == pytest.approx(100.0)
    assert (tmp_path / "price.md").read_text().startswith("# Data prices")
    capsys.readouterr()
    np.save(tmp_path / "short.npy", v[:50])
    assert main(["alinfik", "train", "--pool", str(pool), "--values", str(tmp_path / "short.npy"),
                 "--out", str(st), "--config", str(scfg)]) == 2
    assert "120 lines but" in capsys.readouterr().err
    scfg.write_text("fraction: 0.5\nhiden: [32]\n")
    assert main(["alinfik", "train", "--pool", str(pool), "--values", str(tmp_path / "v.npy"), "--out", str(st),
                 "--config", str(scfg)]) == 2
    assert "did you mean 'hidden'" in capsys.readouterr().err
    # a ridge head on the rank target, from the config: the saved student is that fit
    scfg.write_text("fraction: 0.5\nembed: hashed:dim=64\nridge: 0.5\ntarget: rank\n")
    assert main(["alinfik", "train", "--pool", str(pool), "--values", str(tmp_path / "v.npy"), "--out", str(st),
                 "--config", str(scfg)]) == 0
    loaded = Student.load(str(st))
    idx = np.asarray(loaded.meta["labelled_indices"])
    want = fit_student(None, v[idx], None, embeddings=e[idx], ridge=0.5, target="rank")
    np.testing.assert_allclose(loaded.predict_embeddings(e), want.predict_embeddings(e), rtol=1e-4, atol=1e-5)
    assert loaded.meta["head"] == "ridge" and loaded.meta["target"] == "rank"
    capsys.readouterr()
    for bad, msg in (("target: ranks\n", "value or rank"), ("n_finetune: 1\nridge: 0.5\n", "frozen-embedding")):
        scfg.write_text("fraction: 0.5\n" + bad)
        assert main(["alinfik", "train", "--pool", str(pool), "--values", str(tmp_path / "v.npy"), "--out", str(st),
                     "--config", str(scfg)]) == 2
        assert msg in capsys.readouterr().err


# ----------------------------------------------------------------------------- text statistics (issue 19)

def _ref_text_stats(text, unk, vocab=None, counts=None):
    """Independent reference of alinfik.text_stats for one text (plain Python, string module, Counter)."""
    import math
    import string
    from collections import Counter

    w = text.split()
    nw = max(len(w), 1)
    nonspace = [ch for ch in text if not ch.isspace()]
    letters = [ch for ch in nonspace if ch.isalpha()]
    other = [len(x) for x in w if x != unk]
    row = [w.count(unk) / nw, math.log(1 + len(w)), len([ln for ln in text.splitlines() if ln.strip()]) / nw,
           sum(ch in string.digits for ch in nonspace) / max(len(nonspace), 1),
           sum(ch in string.punctuation for ch in nonspace) / max(len(nonspace), 1),
           sum(ch.isupper() for ch in letters) / max(len(letters), 1), sum(other) / len(other) if other else 0.0,
           len(Counter(w)) / nw, sum(1 for x in w if x.strip(string.punctuation) == "") / nw,
           sum(1 for x in w if x[0].isupper()) / nw]
    if vocab is None:
        return row
    rank = {x: i for i, x in enumerate(vocab)}
    inv = [rank[x] for x in w if x in rank and x != unk]
    n_oov = len(w) - len(inv)
    edges = [0, 10, 30, 100, 300, 1000, float("inf")]
    row += [n_oov / nw] + [sum(lo <= r < hi for r in inv) / nw for lo, hi in zip(edges[:-1], edges[1:])]
    logs = sorted(math.log(1 + r) for r in inv)
    if logs:
        mean = sum(logs) / len(logs)
        med = logs[len(logs) // 2] if len(logs) % 2 else (logs[len(logs) // 2 - 1] + logs[len(logs) // 2]) / 2
        row += [mean, math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs)), med]
    else:
        row += [0.0, 0.0, 0.0]
    p = [c / sum(counts) for c in counts] if counts is not None else [1 / (i + 1) for i in range(len(vocab))]
    p = [x / sum(p) for x in p]
    mapped = Counter(x if x in rank else unk for x in w if x in rank or unk in rank)
    tot = sum(mapped.values())
    b = [mapped.get(x, 0) / tot if tot else 0.0 for x in vocab]
    nb, npv = math.sqrt(sum(x * x for x in b)), math.sqrt(sum(x * x for x in p))
    row += [sum(x * y for x, y in zip(b, p)) / (nb * npv) if nb else 0.0,
            sum(math.sqrt(x * y) for x, y in zip(b, p)) if nb else 0.0,
            sum(x * math.log((x + 1e-9) / (y + 1e-9)) for x, y in zip(b, p))]
    return row


STAT_TEXTS = ["= = Gameplay = =\n The <unk> game sold 1 @,@ 200 copies in 2009 .\n\n It was <unk> .",
              "First Citizen :\nBefore we proceed any further , hear me speak .",
              "", "<unk> <unk>", "ALL CAPS and 42 ! ? ... x"]


def test_text_stats_against_reference(tmp_path):
    """Every column of text_stats (without and with a vocabulary, with and without counts) equals an independent
    plain-Python reference; a few values are checked by hand as well."""
    got = alinfik.text_stats(STAT_TEXTS)
    assert got.shape == (len(STAT_TEXTS), len(alinfik.TEXT_STATS))
    np.testing.assert_allclose(got, [_ref_text_stats(t, "<unk>") for t in STAT_TEXTS], rtol=1e-5, atol=1e-6)
    assert got[3, 0] == 1.0 and got[2].sum() == 0.0                    # "<unk> <unk>": all unk; "" all zeros
    assert got[0, 0] == pytest.approx(2 / 20)                          # 2 of the 20 words are <unk>
    vocab = ["<unk>", "<eos>", "the", ",", ".", "=", "@,@", "It", "was", "game"] + [f"w{i}" for i in range(1200)] \
        + ["speak", "copies"]
    counts = np.r_[[50, 40, 30, 20, 20, 10, 5, 5, 4, 3], np.full(1200, 1.0), [1, 1]]
    for c in (None, counts):
        got = alinfik.text_stats(STAT_TEXTS, vocab=vocab, counts=c)
        assert got.shape == (len(STAT_TEXTS), len(alinfik.TEXT_STATS) + len(alinfik.VOCAB_STATS))
        np.testing.assert_allclose(got, [_ref_text_stats(t, "<unk>", vocab, c) for t in STAT_TEXTS], rtol=1e-5,
                                   atol=1e-6)
    # the spec reads the same vocabulary from a file (word<TAB>count lines), and "+" puts parts side by side
    path = alinfik.write_vocab(str(tmp_path / "vocab.tsv"), vocab, counts)
    np.testing.assert_allclose(alinfik.make_embed_fn(f"textstats:vocab={path}")(STAT_TEXTS), got, rtol=1e-6)
    both = alinfik.make_embed_fn(f"textstats:vocab={path}+hashed:dim=16")(STAT_TEXTS)
    np.testing.assert_allclose(both, np.c_[got, hashed_ngram_embed(STAT_TEXTS, dim=16)], rtol=1e-6)
    with pytest.raises(ValueError):
        alinfik.make_embed_fn("textstats:vocab=x,colour=red")
    with pytest.raises(ValueError):
        alinfik.text_stats(["a"], vocab=["a", "b"], counts=[1.0])


def test_hashed_word_ngrams_reference():
    """unit="word": signed hashed counts of word n-grams, against a reference that hashes the n-grams itself."""
    import hashlib

    texts = ["the cat sat on the mat", "The Cat", ""]
    got = hashed_ngram_embed(texts, dim=32, ngrams=(1, 2), unit="word")
    for t, row in zip(texts, got):
        ref = np.zeros(32)
        w = t.lower().split()
        for g in w + [a + " " + b for a, b in zip(w, w[1:])]:
            h = int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
            ref[h % 32] += 1 if h >> 63 else -1
        ref = ref / np.linalg.norm(ref) if np.linalg.norm(ref) else ref
        np.testing.assert_allclose(row, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[1], hashed_ngram_embed(["the   cat"], dim=32, ngrams=(1, 2), unit="word")[0])
    with pytest.raises(ValueError):
        hashed_ngram_embed(["x"], unit="byte")


def test_textstats_student_learns_unk_share_and_reloads(tmp_path):
    """A textstats student recovers a target that depends on the unk share and the text length only (what a
    character-hash embedding reads poorly), and a saved one is rebuilt from its spec alone."""
    r = np.random.default_rng(0)
    texts = [" ".join(r.choice(WORDS + ["<unk>"] * int(k), size=int(m)))
             for k, m in zip(r.integers(0, 20, 600), r.integers(5, 60, 600))]
    ts = alinfik.text_stats(texts)
    target = 3 * ts[:, 0] - ts[:, 1] + 0.5 * ts[:, 0] * ts[:, 1]
    fn = make_embed_fn("textstats")
    st = fit_student(texts[:450], target[:450], fn, hidden=(32, 32), seed=0, max_epochs=200, patience=30)
    pred = st.score(texts[450:])
    assert spearman(pred, target[450:]) > 0.9
    st.save(str(tmp_path / "s"))
    np.testing.assert_allclose(Student.load(str(tmp_path / "s")).score(texts[450:]), pred, rtol=1e-5, atol=1e-6)


def test_token_table_embed_against_loop():
    """The leading marked tokens' table rows, then the mean row over the marked tokens: against a per-row loop."""
    r = np.random.default_rng(0)
    table = r.normal(size=(11, 3)).astype(np.float32)
    tokens = r.integers(0, 11, size=(5, 7))
    weights = (r.random((5, 7)) > 0.4).astype(np.float32)
    weights[3] = 0                                   # no marked token: zeros
    weights[4] = 0
    weights[4, 6] = 2.0                              # one marked token, fewer than `first`
    got = alinfik.token_table_embed(tokens, weights, table, first=2)
    assert got.shape == (5, 9) and got.dtype == np.float32
    for i in range(5):
        ids = [t for t, w in zip(tokens[i], weights[i]) if w > 0]
        ref = np.zeros(9)
        for j, t in enumerate(ids[:2]):
            ref[3 * j:3 * j + 3] = table[t]
        if ids:
            ref[6:] = np.mean([table[t] for t in ids], 0)
        np.testing.assert_allclose(got[i], ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(alinfik.token_table_embed(tokens, weights, table, first=0), got[:, 6:])
    with pytest.raises(ValueError, match="outside"):
        alinfik.token_table_embed(tokens + 11, weights + 1, table)
    with pytest.raises(ValueError, match=r"\[n, T\]"):
        alinfik.token_table_embed(tokens, weights[:, :3], table)
    with pytest.raises(ValueError, match="integer"):
        alinfik.token_table_embed(tokens.astype(float), weights, table)
