"""ALinFiK: student distillation on a synthetic task, checkpoint round trip, selection and pricing."""

import numpy as np
import pytest

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
