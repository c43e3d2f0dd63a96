"""Evaluation harness: LDS on a known linear datamodel, vmapped retraining, caching, LOO, baselines."""

import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxval as jv
from jaxval.evaluation import baselines as bl
from jaxval import evaluation as ev
from conftest import explicit

warnings.filterwarnings("ignore", message="jaxval: parameters")


def test_lds_is_one_for_true_linear_datamodel_and_zero_for_random():
    rng = np.random.default_rng(0)
    q, n, m = 20, 200, 100
    theta = rng.normal(size=(q, n))  # score: positive = lowers the query's loss
    masks = ev.lds_masks(n, m, alpha=0.5, seed=1)
    assert masks.sum(1).tolist() == [100] * m
    measured = 3.0 - masks.astype(float) @ theta.T + 0.01 * rng.normal(size=(m, q))  # additive effects
    res = ev.lds(theta, masks, measured)
    assert res.mean > 0.99 and res.per_query.shape == (q,)
    assert ev.lds(-theta, masks, measured).mean < -0.99  # the sign convention matters
    rand = ev.lds(rng.normal(size=(q, n)), masks, measured)
    assert abs(rand.mean) < 0.1
    # [M, S, Q] measurements are averaged over seeds first
    noisy = measured[:, None, :] + rng.normal(size=(m, 4, q)) * 0.01
    assert ev.lds(theta, masks, noisy).mean > 0.99
    with pytest.raises(ValueError, match="shapes disagree"):
        ev.lds(theta, masks[:, :10], measured)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_rank_statistics_match_scipy(axis):
    """rankdata / pearson / spearman (the package's one implementation) against scipy.stats, along an axis,
    with many ties; 1-D inputs give Python floats; constant slices give NaN; NaN ranks propagate."""
    from scipy import stats as ss

    rng = np.random.default_rng(0)
    a = np.round(rng.normal(size=(7, 9)), 0)            # many ties
    b = rng.normal(size=(7, 9))
    np.testing.assert_allclose(ev.rankdata(a, axis), ss.rankdata(a, axis=axis), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ev.rankdata(a), ss.rankdata(a), rtol=0, atol=1e-12)      # axis=None: flattened
    other = 1 - (axis % 2)
    ref_p = [ss.pearsonr(np.take(a, i, other), np.take(b, i, other)).statistic for i in range(a.shape[other])]
    ref_s = [ss.spearmanr(np.take(a, i, other), np.take(b, i, other)).statistic for i in range(a.shape[other])]
    np.testing.assert_allclose(ev.pearson(a, b, axis=axis), ref_p, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ev.spearman(a, b, axis=axis), ref_s, rtol=0, atol=1e-12)
    x, y = a[:, 0], b[:, 0]
    r = ev.spearman(x, y)
    assert isinstance(r, float) and r == pytest.approx(ss.spearmanr(x, y).statistic, abs=1e-12)
    assert isinstance(ev.pearson(x, y), float)
    assert np.isnan(ev.pearson(np.ones(5), np.arange(5.0)))
    assert np.isnan(ev.rankdata([1.0, np.nan, 2.0])).all()
    with pytest.raises(ValueError, match="one shape"):
        ev.spearman(np.ones(3), np.ones(4))


class Lin(nnx.Module):
    def __init__(self, rngs, d=5, c=3):
        self.fc = nnx.Linear(d, c, rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


def ce(m, b):
    return -jax.nn.log_softmax(m(b["x"]))[jnp.arange(b["y"].shape[0]), b["y"]]


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 3))
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = np.argmax(x @ w + 0.5 * rng.normal(size=(60, 3)), 1).astype(np.int32)
    return {"x": x[:50], "y": y[:50]}, {"x": x[50:], "y": y[50:]}


def test_vmapped_retraining_equals_one_model_at_a_time_and_is_cached(toy, tmp_path):
    train, test = toy
    cfg = ev.RetrainConfig(steps=40, lr=0.05, batch_size=8, optimizer="adam", chunk=3)
    masks = ev.lds_masks(50, 4, 0.5, seed=0)
    seeds = np.array([0, 1, 2, 3])
    out = ev.retrain(Lin, ce, train, masks, seeds, cfg, test, cache_dir=str(tmp_path), progress=False)
    assert out["loss"].shape == (4, 10)
    for i in (0, 3):  # the same model trained alone (chunk of one)
        one = ev.retrain(Lin, ce, train, masks[i:i + 1], seeds[i:i + 1], cfg, test, progress=False)
        np.testing.assert_allclose(one["loss"][0], out["loss"][i], rtol=2e-5, atol=1e-6)
    # the subset is respected: examples outside the mask do not matter
    other = {k: v.copy() for k, v in train.items()}
    other["x"][~masks[0]] = 100.0
    again = ev.retrain(Lin, ce, other, masks[:1], seeds[:1], cfg, test, progress=False)
    np.testing.assert_allclose(again["loss"][0], out["loss"][0], rtol=2e-5, atol=1e-6)
    # a rerun reads the cache (no compilation, no training)
    t = time.perf_counter()
    cached = ev.retrain(Lin, ce, train, masks, seeds, cfg, test, cache_dir=str(tmp_path), progress=False)
    assert time.perf_counter() - t < 2.0
    np.testing.assert_array_equal(cached["loss"], out["loss"])
    assert len(list(tmp_path.iterdir())) == 2  # chunks of 3 + 1
    with pytest.raises(ValueError, match="columns"):
        ev.retrain(Lin, ce, train, masks[:, :10], seeds, cfg, test, progress=False)


def test_leave_one_out_matches_influence_on_convex_model(toy):
    """Full-batch Nesterov from the optimum (warm start): LOO deltas vs exact-Hessian influence."""
    train, test = toy
    lam = 0.05
    cfg = ev.RetrainConfig(steps=1500, lr=0.5, batch_size=None, optimizer="momentum", l2=lam, chunk=16)
    model = Lin(nnx.Rngs(0))
    # fit the full-data optimum with the same harness, then read its parameters back
    graphdef, p0, rest = nnx.split(model, nnx.Param, ...)
    tx = cfg.optax()

    def obj(p):
        m = nnx.merge(graphdef, p, rest)
        return ce(m, train).mean() + 0.5 * lam * sum(jnp.sum(v ** 2) for v in jax.tree.leaves(p))

    @jax.jit
    def fit(p):
        def step(c, _):
            p, s = c
            u, s = tx.update(jax.grad(obj)(p), s, p)
            return (jax.tree.map(lambda a, b: a + b, p, u), s), None
        return jax.lax.scan(step, (p, tx.init(p)), None, length=3000)[0][0]

    nnx.update(model, fit(p0))
    idx = np.arange(12)
    deltas = ev.leave_one_out(Lin, ce, train, idx, [0], cfg, test, warm_start=model, progress=False)
    # exact influence: H = ∇² mean loss + λI; removing z changes θ by H⁻¹ g_z / N
    flat, unravel = jax.flatten_util.ravel_pytree(nnx.split(model, nnx.Param, ...)[1])

    def f(fl, b):
        return ce(nnx.merge(graphdef, unravel(fl), rest), b)

    h = jax.hessian(lambda fl: f(fl, train).mean() + 0.5 * lam * jnp.sum(fl ** 2))(flat)
    gz = jax.jacrev(lambda fl: f(fl, train))(flat)[idx]
    gq = jax.jacrev(lambda fl: f(fl, test))(flat)
    scores = np.asarray(gq @ jnp.linalg.solve(h, gz.T)) / 50
    r = ev.loo_correlation(scores, deltas)
    assert r["pearson_min"] > 0.97, r


def test_brittleness_masks():
    s = np.array([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, -1.0]])
    m = ev.brittleness_masks(s, [1, 2])
    assert m.shape == (2, 2, 4)
    assert m[0, 0].tolist() == [True, False, True, True]
    assert m[0, 1].tolist() == [True, False, True, False]
    assert m[1, 0].tolist() == [False, True, True, True]
    r = ev.brittleness_masks(s, [1, 3], random=True)
    assert (~r).sum(-1).tolist() == [[1, 3], [1, 3]]


def test_brittleness_runs_and_random_flips_less(toy):
    train, test = toy
    cfg = ev.RetrainConfig(steps=60, lr=0.1, batch_size=None, optimizer="adam", chunk=64)

    def evalf(m, d):
        return {"correct": jnp.argmax(m(d["x"]), -1) == d["y"], "loss": ce(m, d)}

    pts = {k: v[:3] for k, v in test.items()}
    # "oracle-like" score: training points of the same label are proponents
    sc = (pts["y"][:, None] == train["y"][None]).astype(np.float32)
    res = ev.brittleness(Lin, ce, train, pts, {"same-label": sc}, [0, 20], [0, 1], cfg, evalf, progress=False)
    assert set(res) == {"same-label", "random"} and res["random"].shape == (2,)
    assert res["same-label"][1] >= res["random"][1]


def test_removal_effect_matches_direct_retraining(toy):
    train, test = toy
    cfg = ev.RetrainConfig(steps=60, lr=0.1, batch_size=None, optimizer="adam", chunk=64)
    pts = {k: v[:3] for k, v in test.items()}
    sc = (pts["y"][:, None] == train["y"][None]).astype(np.float32)
    res = ev.removal_effect(Lin, ce, train, pts, {"same-label": sc}, [0, 20], [0, 1], cfg, progress=False)
    assert set(res) == {"same-label", "random"}
    np.testing.assert_allclose(res["random"][0], 0.0, atol=1e-6)  # k = 0 removes nothing
    # reference: retrain by hand without point 1's top-20 proponents (stable order of its scores)
    n = len(train["y"])
    deltas = []
    for q in range(3):
        keep = np.ones(n, bool)
        keep[np.argsort(-sc[q], kind="stable")[:20]] = False
        for seed in (0, 1):
            full = ev.retrain(Lin, ce, train, np.ones((1, n), bool), [seed], cfg, pts, progress=False)["loss"][0, q]
            cut = ev.retrain(Lin, ce, train, keep[None], [seed], cfg, pts, progress=False)["loss"][0, q]
            deltas.append(cut - full)
    np.testing.assert_allclose(res["same-label"][1], np.mean(deltas), rtol=1e-4, atol=1e-6)
    # removing the points of the query's own label raises its loss more than removing random points
    assert res["same-label"][1] > res["random"][1]


def test_dense_projection_is_blockwise_consistent():
    g = jax.random.normal(jax.random.key(0), (3, 1000))
    key = jax.random.key(7)
    a = bl.dense_projection(g, key, k=16, block=128)
    # the same rows of R whatever the batch: projecting examples one by one agrees
    b = jnp.concatenate([bl.dense_projection(g[i:i + 1], key, k=16, block=128) for i in range(3)])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # explicit R, built from the same blocks, for reference
    r = jnp.concatenate([jax.random.rademacher(jax.random.fold_in(key, j), (128, 16), jnp.float32)
                         for j in range(8)])[:1000] / 4.0
    np.testing.assert_allclose(np.asarray(a), np.asarray(g @ r), rtol=1e-4, atol=1e-4)
    # inner products are preserved in expectation (k large)
    big = bl.dense_projection(g, key, k=4096, block=256)
    np.testing.assert_allclose(np.asarray(big @ big.T), np.asarray(g @ g.T), rtol=0.1, atol=60)


def test_baselines_shapes_and_agreement(toy):
    train, test = toy
    model = Lin(nnx.Rngs(0))
    dot = bl.grad_scores(model, ce, train, test, mode="dot", batch_size=50)
    assert dot.shape == (10, 50)
    # identity-preconditioned full-rank LoGra == gradient dot
    lg = bl.logra_scores(model, ce, train, test, rank=None, init="identity", kind="identity", batch_size=50)
    np.testing.assert_allclose(lg, dot, rtol=1e-4, atol=1e-5)
    cos = bl.grad_scores(model, ce, train, test, mode="cosine", batch_size=50)
    assert np.abs(cos).max() <= 1 + 1e-5
    trak = bl.trak_scores(model, ce, train, test, k=64, batch_size=60, block=8)
    ek = bl.ekfac_scores(model, ce, train, test, batch_size=50, precond_kw={"damping": 1e-3})
    raw = bl.logra_scores(model, ce, train, test, rank=None, init="identity", kind="raw",
                          precond_kw={"damping": 1e-3}, batch_size=50)
    # one linear layer, 18 parameters: a 64-dim random projection keeps the raw-Fisher metric exactly
    assert np.mean(ev.pearson(trak, raw, axis=1)) > 0.99
    assert np.mean(ev.pearson(ek, raw, axis=1)) > 0.8  # EK-FAC: an approximation of the Fisher
    rep = bl.representation_scores(lambda m, b: b["x"], model, train, test)
    assert rep.shape == (10, 50) and np.abs(rep).max() <= 1 + 1e-5


def _scoring_problem(toy, seq, n: int):
    """``(model, loss, train, test)``: the linear toy (``seq`` None) or a token MLP on ``n`` random sequences
    of ``seq`` tokens (the first 24 train, the rest test)."""
    if seq is None:
        train, test = toy
        return Lin(nnx.Rngs(0)), ce, train, test
    from jaxval.models.token_mlp import TokenMLP, loss_fn

    model = TokenMLP(vocab_size=13, d_model=8, n_block=1, hidden=12, rngs=nnx.Rngs(0))
    tok = np.asarray(jax.random.randint(jax.random.key(3), (n, seq), 0, 13))
    data = {"tokens": tok, "mask": np.ones((n, seq), np.float32)}
    return model, loss_fn, jax.tree.map(lambda a: a[:24], data), jax.tree.map(lambda a: a[24:], data)


@pytest.mark.parametrize("seq", [None, 2, 5])
def test_streamed_scores_equal_explicit_gradient_scores(toy, seq):
    """``streamed_scores`` (training gradients never stored; for <= 2 tokens per example contracted straight
    from the layers' inputs and cotangents, else formed per batch) equals ``hq @ G_trainᵀ`` with ``G_train``
    the explicit per-example gradients (vmap(grad)), in float64."""
    model, loss, train, _ = _scoring_problem(toy, seq, 24)
    lg = jv.LoGra(model, loss, rank=None, init="identity")
    g = np.asarray(explicit(model, loss, lg.projections, jax.tree.map(jnp.asarray, train)), np.float64)
    hq = np.asarray(jax.random.normal(jax.random.key(4), (6, lg.dim)), np.float32)
    got = bl.streamed_scores(lg, model, hq, train, batch_size=7)
    np.testing.assert_allclose(got, hq.astype(np.float64) @ g.T, rtol=1e-4, atol=1e-5 * np.abs(hq @ g.T).max())


@pytest.mark.parametrize("seq,kind,rank", [(None, "ekfac", None), (None, "kfac", 2), (2, "ekfac", None),
                                           (5, "ekfac", 3)])
def test_ekfac_streamed_scores_equal_float64_solve_on_explicit_gradients(toy, seq, kind, rank):
    """``ekfac_streamed_scores`` (eigenbasis route: rotated pairs, no ``apply``, no ``[B, D]`` block) equals
    ``(H⁻¹ G_q) G_trainᵀ`` with ``G`` explicit per-example gradients (vmap(grad)) and ``H⁻¹`` solved per layer
    in float64 numpy from the fitted factors; un-projected and projected, 1 / 2 (pair route) / 5 tokens
    (block route). A RAW preconditioner is refused."""
    model, loss, train, test = _scoring_problem(toy, seq, 30)
    lg = jv.LoGra(model, loss, rank=rank, init="identity" if rank is None else "gaussian")
    pc = jv.fit_preconditioner(lg, model, train, kind=kind, relative_damping=0.1, batch_size=8)
    g = np.asarray(explicit(model, loss, lg.projections, jax.tree.map(jnp.asarray, train)), np.float64)
    gq = np.asarray(explicit(model, loss, lg.projections, jax.tree.map(jnp.asarray, test)), np.float64)
    hq, o = [], 0
    for l in lg.layers:
        f = {k: np.asarray(v, np.float64) for k, v in pc.factors[l.name].items()}
        blk = gq[:, o:o + l.k_in * l.k_out].reshape(-1, l.k_in, l.k_out)
        o += l.k_in * l.k_out
        r = np.einsum("ki,bkl,lj->bij", f["QA"], blk, f["QS"]) / (f["L"] + float(pc.damping[l.name]))
        hq.append(np.einsum("ki,bij,lj->bkl", f["QA"], r, f["QS"]).reshape(len(blk), -1))
    want = np.concatenate(hq, axis=1) @ g.T
    got = bl.ekfac_streamed_scores(lg, model, test, train, pc, batch_size=7)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    if seq is None and rank is None:
        raw = jv.fit_preconditioner(lg, model, train, kind="raw", relative_damping=0.1, batch_size=8)
        with pytest.raises(ValueError, match="'kfac' or 'ekfac'"):
            bl.ekfac_streamed_scores(lg, model, test, train, raw)


def test_one_trainer_is_built_per_brittleness_and_removal_test(toy, monkeypatch):
    """The methods of one test share the compiled trainer (it used to be rebuilt and recompiled per method)."""
    from jaxval.evaluation import retraining

    built = []
    real = retraining._build_trainer
    monkeypatch.setattr(retraining, "_build_trainer", lambda *a: built.append(1) or real(*a))
    train, test = toy
    cfg = ev.RetrainConfig(steps=5, lr=0.1, batch_size=None, optimizer="adam", chunk=64)
    pts = {k: v[:2] for k, v in test.items()}
    sc = (pts["y"][:, None] == train["y"][None]).astype(np.float32)
    methods = {"same-label": sc, "other-label": 1.0 - sc}

    def evalf(m, d):
        return {"correct": jnp.argmax(m(d["x"]), -1) == d["y"], "loss": ce(m, d)}

    ev.brittleness(Lin, ce, train, pts, methods, [0, 5], [0], cfg, evalf, progress=False)
    assert len(built) == 1
    ev.removal_effect(Lin, ce, train, pts, methods, [0, 5], [0], cfg, progress=False)
    assert len(built) == 2
    # separate retrain calls still build their own (the cache lives in one test's call)
    ev.retrain(Lin, ce, train, np.ones((1, len(train["y"])), bool), [0], cfg, pts, progress=False)
    assert len(built) == 3
