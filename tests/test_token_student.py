"""The token-level ALinFiK student: its features against a per-row loop, its fit against the primal ridge with
explicit one-hot columns (numpy lstsq), recovery of an additive teacher, save / load, refusals."""

import numpy as np
import pytest

from jaxval import ConfigError
from jaxval.valuation.token_student import N_POS, R_CAP, TokenStudent, fit_token_student, token_positions

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


def _loop_positions(tokens, weights, table):
    scale = np.linalg.norm(table, axis=1).mean()
    out = []
    for i in range(len(tokens)):
        used = [p for p in range(T1 - 1) if weights[i, p + 1] > 0]
        for p in used:
            r = p - used[0]
            feat = list(table[tokens[i, p + 1]] / scale) + [float(r == k) for k in range(N_POS)] + [float(r >= N_POS)]
            rc = min(r, R_CAP) / R_CAP
            out.append((i, p, tokens[i, p], tokens[i, p + 1], feat + [rc, rc * rc]))
    return out


def test_positions_match_a_loop():
    tokens, weights = _data(6, 1)
    table = _table()
    pos = token_positions(tokens, weights, table)
    ref = _loop_positions(tokens, weights, table)
    assert len(ref) == len(pos["rows"]) > 0
    np.testing.assert_array_equal(pos["rows"], [x[0] for x in ref])
    np.testing.assert_array_equal(pos["cols"], [x[1] for x in ref])
    np.testing.assert_array_equal(pos["read"], [x[2] for x in ref])
    np.testing.assert_array_equal(pos["pred"], [x[3] for x in ref])
    np.testing.assert_allclose(pos["phi"], np.array([x[4] for x in ref]), rtol=1e-6, atol=1e-7)


def test_fit_equals_the_primal_ridge_with_one_hot_columns():
    tokens, weights = _data(12, 2)
    table = _table()
    parts = np.random.default_rng(3).normal(size=(12, T1 - 1)) * (weights[:, 1:] > 0)
    lam, tw, pw = 2.0, 3.0, 0.5
    st = fit_token_student(tokens, weights, parts, table, ridge=lam, token_weight=tw, pair_weight=pw)
    # primal reference: columns [phi | sqrt(tw) one-hot(pred) | sqrt(pw) one-hot(read, pred)] over the whole
    # vocabulary (columns no training position touches get 0), least squares with the ridge rows appended
    ref = _loop_positions(tokens, weights, table)

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
    new = _loop_positions(t_new, w_new, table)
    ref_parts = np.zeros((7, T1 - 1))
    for (i, p, *_), c in zip(new, design(new) @ theta):
        ref_parts[i, p] = c
    np.testing.assert_allclose(st.position_parts(t_new, w_new, table), ref_parts, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(st.score(t_new, w_new, table), ref_parts.sum(1), rtol=1e-6, atol=1e-9)


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
    st.score(tokens, weights, table)                      # verified once per table object, then not re-hashed
    assert st._verified() is table
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
