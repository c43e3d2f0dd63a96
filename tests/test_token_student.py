"""The token-level ALinFiK student: its features against a per-row loop, its fit against the primal ridge with
explicit one-hot columns (numpy lstsq), recovery of an additive teacher, the LM's expected rows against a numpy
softmax, save / load, refusals."""

import numpy as np
import pytest

from jaxval import ConfigError
from jaxval.valuation.token_student import (N_POS, R_CAP, TokenStudent, expected_rows, expected_rows_fn,
                                            fit_token_student, token_positions)

V, D, T1 = 23, 5, 9


def _data(n, seed):
    r = np.random.default_rng(seed)
    tokens = r.integers(0, V, (n, T1)).astype(np.int32)
    start = r.integers(1, 5, n)                           # a "prompt" of 1-4 tokens, then the response
    weights = (np.arange(T1)[None] >= start[:, None]).astype(np.float32)
    weights[0, :] = 0.0                                   # a row without loss tokens
    return tokens, weights


def _table(seed=0):
    return np.random.default_rng(seed).normal(size=(V, D)).astype(np.float32)


def _expected(n, seed):
    return np.random.default_rng(seed).normal(size=(n, T1 - 1, D)).astype(np.float32)


def _loop_positions(tokens, weights, table, expected=None):
    scale = np.linalg.norm(table, axis=1).mean()
    out = []
    for i in range(len(tokens)):
        used = [p for p in range(T1 - 1) if weights[i, p + 1] > 0]
        for p in used:
            r = p - used[0]
            feat = list(table[tokens[i, p + 1]] / scale) + [float(r == k) for k in range(N_POS)] + [float(r >= N_POS)]
            rc = min(r, R_CAP) / R_CAP
            feat = feat + [rc, rc * rc]
            if expected is not None:
                feat = feat + list((table[tokens[i, p + 1]].astype(np.float64) - expected[i, p]) / scale)
            out.append((i, p, tokens[i, p], tokens[i, p + 1], feat))
    return out


@pytest.mark.parametrize("with_expected", [False, True])
def test_positions_match_a_loop(with_expected):
    tokens, weights = _data(6, 1)
    table = _table()
    e = _expected(6, 11) if with_expected else None
    pos = token_positions(tokens, weights, table, expected=e)
    ref = _loop_positions(tokens, weights, table, e)
    assert len(ref) == len(pos["rows"]) > 0
    np.testing.assert_array_equal(pos["rows"], [x[0] for x in ref])
    np.testing.assert_array_equal(pos["cols"], [x[1] for x in ref])
    np.testing.assert_array_equal(pos["read"], [x[2] for x in ref])
    np.testing.assert_array_equal(pos["pred"], [x[3] for x in ref])
    np.testing.assert_allclose(pos["phi"], np.array([x[4] for x in ref]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_expected", [False, True])
def test_fit_equals_the_primal_ridge_with_one_hot_columns(with_expected):
    tokens, weights = _data(12, 2)
    table = _table()
    parts = np.random.default_rng(3).normal(size=(12, T1 - 1)) * (weights[:, 1:] > 0)
    lam, tw, pw = 2.0, 3.0, 0.5
    e_tr, e_new = (_expected(12, 12), _expected(7, 13)) if with_expected else (None, None)
    st = fit_token_student(tokens, weights, parts, table, expected=e_tr, ridge=lam, token_weight=tw, pair_weight=pw)
    # primal reference: columns [phi | sqrt(tw) one-hot(pred) | sqrt(pw) one-hot(read, pred)] over the whole
    # vocabulary (columns no training position touches get 0), least squares with the ridge rows appended
    ref = _loop_positions(tokens, weights, table, e_tr)

    def design(rows):
        z = np.zeros((len(rows), len(rows[0][4]) + V + V * V))
        for j, (_, _, x, y, f) in enumerate(rows):
            z[j, :len(f)] = f
            z[j, len(f) + y] = np.sqrt(tw)
            z[j, len(f) + V + x * V + y] = np.sqrt(pw)
        return z

    z = design(ref)
    y = np.array([parts[i, p] for i, p, *_ in ref])
    theta = np.linalg.lstsq(np.vstack([z, np.sqrt(lam) * np.eye(z.shape[1])]),
                            np.concatenate([y, np.zeros(z.shape[1])]), rcond=None)[0]
    t_new, w_new = _data(7, 4)
    new = _loop_positions(t_new, w_new, table, e_new)
    ref_parts = np.zeros((7, T1 - 1))
    for (i, p, *_), c in zip(new, design(new) @ theta):
        ref_parts[i, p] = c
    np.testing.assert_allclose(st.position_parts(t_new, w_new, table, e_new), ref_parts, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(st.score(t_new, w_new, table, e_new), ref_parts.sum(1), rtol=1e-6, atol=1e-9)
    assert st.uses_expected is with_expected


def test_recovers_an_additive_teacher():
    """Parts made of a value per predicted token and a position effect: held-out sums are ranked right."""
    r = np.random.default_rng(5)
    value = r.normal(size=V)
    table = _table(1)

    def teacher(tokens, weights):
        used = weights[:, 1:] > 0
        first = used.argmax(1)
        pos_eff = np.where(np.arange(T1 - 1)[None] == first[:, None], 2.0, 0.0)
        return (value[tokens[:, 1:]] + pos_eff) * used

    tr, te = _data(60, 6), _data(40, 7)
    st = fit_token_student(*tr, teacher(*tr), table, ridge=0.1, token_weight=10.0, pair_weight=0.0)
    pred, true = st.score(*te, table), teacher(*te).sum(1)
    assert np.corrcoef(pred, true)[0, 1] > 0.99


def test_save_load_and_refusals(tmp_path):
    tokens, weights = _data(10, 8)
    table = _table()
    parts = np.random.default_rng(9).normal(size=(10, T1 - 1))
    st = fit_token_student(tokens, weights, parts, table)
    path = st.save(str(tmp_path / "st"))
    back = TokenStudent.load(path)
    np.testing.assert_array_equal(back.score(tokens, weights, table), st.score(tokens, weights, table))
    from jaxval.valuation.alinfik import load_student

    assert isinstance(load_student(path), TokenStudent)
    with pytest.raises(ConfigError, match="another embedding table"):
        st.score(tokens, weights, table + 1e-3)
    st.score(tokens, weights, table)                      # verified once per table object, then checksummed
    assert st._verified[0]() is table
    changed = table.copy()
    st.score(tokens, weights, changed)
    changed[3, 1] += 0.5                                   # the same object, changed in place: refused
    with pytest.raises(ConfigError, match="another embedding table"):
        st.score(tokens, weights, changed)
    with pytest.raises(ConfigError, match="another embedding table"):
        st.score(tokens, weights, table.copy() * 2)
    with pytest.raises(ConfigError, match=r"parts must be \[n, T\]"):
        fit_token_student(tokens, weights, parts[:, :-1], table)
    with pytest.raises(ConfigError, match="no used positions"):
        fit_token_student(tokens, np.zeros_like(weights), parts, table)
    with pytest.raises(ConfigError, match="ridge > 0"):
        fit_token_student(tokens, weights, parts, table, ridge=0.0)
    with pytest.raises(ConfigError, match="non-finite"):
        fit_token_student(tokens, weights, parts * np.nan, table)
    with pytest.raises(ConfigError, match="outside the table"):
        token_positions(tokens + V, weights, table)
    with pytest.raises(ConfigError, match="max_positions"):
        fit_token_student(tokens, weights, parts, table, max_positions=3)


def _toy_lm(seed=20):
    """A causal toy LM on the test vocabulary: logits at p from the tokens p-1 and p (numpy reference and jax)."""
    r = np.random.default_rng(seed)
    a, b = r.normal(size=(V, V)) * 2, r.normal(size=(V, V)) * 2

    def np_logits(tokens):                               # [n, T] -> [n, T, V] float64
        prev = np.concatenate([tokens[:, :1], tokens[:, :-1]], 1)
        return a[tokens] + b[prev]

    def jax_logits(batch):
        import jax.numpy as jnp

        t = batch["tokens"][:, :-1]
        prev = jnp.concatenate([t[:, :1], t[:, :-1]], 1)
        return jnp.asarray(a, jnp.float32)[t] + jnp.asarray(b, jnp.float32)[prev]

    return np_logits, jax_logits


def test_expected_rows_match_a_numpy_softmax():
    tokens, _ = _data(11, 21)
    table = _table(2)
    np_logits, jax_logits = _toy_lm()
    got = expected_rows(jax_logits, {"tokens": tokens}, table, batch_size=4)      # 11 rows: the last batch padded

    def reference(t):                                     # float64 numpy softmax times the table
        lg = np_logits(t[:, :-1])
        p = np.exp(lg - lg.max(-1, keepdims=True))
        return np.einsum("ntv,vd->ntd", p / p.sum(-1, keepdims=True), table.astype(np.float64))

    assert got.shape == (11, T1 - 1, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(tokens), rtol=2e-5, atol=2e-6)
    with pytest.raises(ConfigError, match=r"\[B, T, V\]"):
        expected_rows(lambda b: jax_logits(b)[..., :-1], {"tokens": tokens}, table)
    # a built expected_rows_fn traces (compiles) once per batch shape, however many pools it scores
    traces = []

    def counted(batch):
        traces.append(1)
        return jax_logits(batch)

    rows = expected_rows_fn(counted, table)
    rows({"tokens": tokens}, 4)
    other = _data(8, 29)[0]
    again = rows({"tokens": other}, 4)
    assert len(traces) == 1
    np.testing.assert_allclose(again, reference(other), rtol=2e-5, atol=2e-6)


def test_expected_rows_let_the_student_learn_what_tokens_cannot():
    """A teacher whose parts depend on the LM's prediction in context (a part is the alignment of ``table[y] − ē``
    with a fixed direction, the top layer's cotangent): tokens alone do not see the context, the student with
    the expected rows fits it (held-out sums)."""
    table = _table(3)
    np_logits, jax_logits = _toy_lm(22)
    direction = np.random.default_rng(23).normal(size=D)

    def teacher(tokens, weights, e):
        return ((table[tokens[:, 1:]] - e) @ direction) * (weights[:, 1:] > 0)

    tr, te = _data(80, 24), _data(60, 25)
    e_tr, e_te = (expected_rows(jax_logits, {"tokens": t}, table) for t, _ in (tr, te))
    with_e = fit_token_student(*tr, teacher(*tr, e_tr), table, expected=e_tr, ridge=1e-3, token_weight=0.0,
                               pair_weight=0.0)
    tokens_only = fit_token_student(*tr, teacher(*tr, e_tr), table, ridge=1e-3, token_weight=1.0, pair_weight=1.0)
    true = teacher(*te, e_te).sum(1)
    assert np.corrcoef(with_e.score(*te, table, e_te), true)[0, 1] > 0.999
    assert np.corrcoef(tokens_only.score(*te, table), true)[0, 1] < 0.99


def test_expected_refusals(tmp_path):
    tokens, weights = _data(10, 26)
    table = _table()
    parts = np.random.default_rng(27).normal(size=(10, T1 - 1))
    e = _expected(10, 28)
    st = fit_token_student(tokens, weights, parts, table, expected=e)
    back = TokenStudent.load(st.save(str(tmp_path / "st")))
    np.testing.assert_array_equal(back.score(tokens, weights, table, e), st.score(tokens, weights, table, e))
    with pytest.raises(ConfigError, match="pass expected="):
        back.score(tokens, weights, table)
    with pytest.raises(ConfigError, match="takes no expected"):
        fit_token_student(tokens, weights, parts, table).score(tokens, weights, table, e)
    with pytest.raises(ConfigError, match=r"expected must be \[n, T, d\]"):
        st.score(tokens, weights, table, e[:, :-1])
    with pytest.raises(ConfigError, match="non-finite"):
        fit_token_student(tokens, weights, parts, table, expected=e * np.nan)
