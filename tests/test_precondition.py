"""Preconditioners vs explicit float64 linear algebra, leave-one-out retraining, invariances, errors."""

import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxval.distributed import xla_flags
import jaxval as jv
from jaxval._src import curvature
from conftest import explicit, rel_err

warnings.filterwarnings("ignore", message="jaxval: parameters")


class MLP2(nnx.Module):
    def __init__(self, rngs, d=6, h=5, c=4):
        self.l1 = nnx.Linear(d, h, rngs=rngs)
        self.l2 = nnx.Linear(h, c, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def ce_loss(m, b):
    return -jax.nn.log_softmax(m(b["x"]))[jnp.arange(b["y"].shape[0]), b["y"]]


def numpy_mlp_pieces(m, x, y):
    """Per-example layer inputs (with the bias 1) and output cotangents, by hand in float64."""
    w1, b1 = np.asarray(m.l1.kernel[...], np.float64), np.asarray(m.l1.bias[...], np.float64)
    w2, b2 = np.asarray(m.l2.kernel[...], np.float64), np.asarray(m.l2.bias[...], np.float64)
    x = np.asarray(x, np.float64)
    h = x @ w1 + b1
    z = np.tanh(h)
    logits = z @ w2 + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dy2 = p.copy()
    dy2[np.arange(len(y)), y] -= 1
    dy1 = (dy2 @ w2.T) * (1 - z**2)
    one = np.ones((len(x), 1))
    return {"l1": (np.hstack([x, one]), dy1), "l2": (np.hstack([z, one]), dy2)}


@pytest.fixture(scope="module")
def tiny():
    m = MLP2(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(40, 6)).astype(np.float32), "y": rng.integers(0, 4, 40).astype(np.int32)}
    lg = jv.LoGra(m, ce_loss, rank=None, init="identity")
    pieces = numpy_mlp_pieces(m, data["x"], data["y"])
    q = rng.normal(size=(3, lg.dim)).astype(np.float32)
    return m, data, lg, pieces, q


def test_raw_equals_damped_inverse_of_explicit_fisher(tiny):
    m, data, lg, pieces, q = tiny
    lam = 0.05
    pc = jv.fit_preconditioner(lg, m, data, kind="raw", damping=lam, batch_size=16, progress=False)
    h = np.asarray(pc.apply(q))
    offs = lg.offsets()
    for name, (x, dy) in pieces.items():
        g = np.einsum("bi,bo->bio", x, dy).reshape(len(x), -1)  # per-example gradient, row-major
        c = g.T @ g / len(x)
        ref = np.linalg.solve(c + lam * np.eye(len(c)), q[:, slice(*offs[name])].astype(np.float64).T).T
        assert rel_err(h[:, slice(*offs[name])], ref) <= 1e-4


def test_kfac_equals_explicit_kron_solve(tiny):
    m, data, lg, pieces, q = tiny
    lam = 0.02
    pc = jv.fit_preconditioner(lg, m, data, kind="kfac", damping=lam, batch_size=7, progress=False)
    h = np.asarray(pc.apply(q))
    offs = lg.offsets()
    for name, (x, dy) in pieces.items():
        a = x.T @ x / len(x)  # one token per example
        s = dy.T @ dy / len(x)
        hk = np.kron(a, s) + lam * np.eye(a.shape[0] * s.shape[0])
        ref = np.linalg.solve(hk, q[:, slice(*offs[name])].astype(np.float64).T).T
        assert rel_err(h[:, slice(*offs[name])], ref) <= 1e-4


def test_ekfac_eigenvalues_equal_brute_force_rotations(tiny):
    m, data, lg, pieces, q = tiny
    lam = 0.03
    pc = jv.fit_preconditioner(lg, m, data, kind="ekfac", damping=lam, batch_size=16, progress=False)
    h = np.asarray(pc.apply(q))
    offs = lg.offsets()
    for name, (x, dy) in pieces.items():
        _, qa = np.linalg.eigh(x.T @ x / len(x))
        _, qs = np.linalg.eigh(dy.T @ dy / len(x))
        lam_ref = np.zeros((qa.shape[0], qs.shape[0]))
        for b in range(len(x)):  # brute force, one example at a time
            gb = np.outer(x[b], dy[b])
            lam_ref += (qa.T @ gb @ qs) ** 2
        lam_ref /= len(x)
        assert rel_err(np.asarray(pc.factors[name]["L"]), lam_ref) <= 1e-4
        qn = q[:, slice(*offs[name])].astype(np.float64).reshape(-1, qa.shape[0], qs.shape[0])
        ref = np.einsum("ki,bij,lj->bkl", qa, np.einsum("ki,bkl,lj->bij", qa, qn, qs) / (lam_ref + lam), qs)
        assert rel_err(h[:, slice(*offs[name])], ref.reshape(len(q), -1)) <= 1e-4


def test_kfac_counts_only_tokens_that_reach_the_loss():
    class Tok(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(7, 3, rngs=rngs)
            self.fc = nnx.Linear(3, 5, rngs=rngs)

        def __call__(self, t):
            return self.fc(jnp.tanh(self.emb(t)))

    def loss_fn(m, b):  # padded positions (mask 0) are excluded from the loss
        lp = jax.nn.log_softmax(m(b["tokens"]))
        tok = jnp.take_along_axis(lp, (b["tokens"] % 5)[..., None], -1)[..., 0]
        return -(tok * b["mask"]).sum(1)

    m = Tok(nnx.Rngs(1))
    tokens = np.random.default_rng(1).integers(0, 7, (6, 5)).astype(np.int32)
    mask = np.ones((6, 5), np.float32)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    lg = jv.LoGra(m, loss_fn, rank=None, init="identity", layers="fc")
    st = curvature.accumulate(lg, m, {"tokens": tokens, "mask": mask}, "kfac", batch_size=4, progress=False)
    assert isinstance(st, jv.KFACState)
    assert float(st.tokens["fc"]) == mask.sum()
    # A from the counted tokens only, by hand
    z = np.tanh(np.asarray(m.emb.embedding[...], np.float64)[tokens])
    xa = np.concatenate([z, np.ones(z.shape[:2] + (1,))], -1)[mask > 0]
    assert rel_err(np.asarray(st.A["fc"]), xa.T @ xa) <= 1e-5


# ----------------------------------------------------------------------------- leave-one-out

def _softmax(z):
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _logreg_hessian(x, w, lam):
    """Hessian of mean CE + lam/2 |W|² in W's row-major vec: mean_b (x xᵀ) ⊗ (diag p − p pᵀ) + lam I."""
    n, d = x.shape
    c = w.shape[1]
    p = _softmax(x @ w)
    xx = np.einsum("bi,bj->bij", x, x).reshape(n, d * d)
    cov = (np.einsum("bk,kl->bkl", p, np.eye(c)) - np.einsum("bk,bl->bkl", p, p)).reshape(n, c * c)
    hmat = (xx.T @ cov).reshape(d, d, c, c).transpose(0, 2, 1, 3).reshape(d * c, d * c) / n
    return hmat + lam * np.eye(d * c)


def _fit_logreg(x, y, lam, iters=30):
    """Newton's method, float64: argmin mean CE + lam/2 |W|² (bias as the last input row)."""
    n, d = x.shape
    c = int(y.max()) + 1
    w = np.zeros((d, c))
    onehot = np.eye(c)[y]
    for _ in range(iters):
        grad = x.T @ (_softmax(x @ w) - onehot) / n + lam * w
        step = np.linalg.solve(_logreg_hessian(x, w, lam), grad.reshape(-1)).reshape(d, c)
        w -= step
        if np.abs(step).max() < 1e-10:
            return w
    raise AssertionError("Newton did not converge")


def _refit_logreg_without_each(x, y, lam, w, tol=1e-12, iters=100):
    """Every leave-one-out optimum, float64: for each i, argmin over W of the mean CE over the n − 1 other
    points + lam/2 |W|², all n refits at once from the full-data optimum ``w``. Newton steps with the
    full-data Hessian (inverted once): the fixed point is each refit's exact optimum (its gradient is zero),
    reached at a linear rate |I − H⁻¹H₋ᵢ| ~ 1/n, iterated until every step is below ``tol``."""
    n, d = x.shape
    c = w.shape[1]
    onehot = np.eye(c)[y]
    hinv = np.linalg.inv(_logreg_hessian(x, w, lam))
    keep = 1.0 - np.eye(n)                       # refit i (rows) leaves example i (columns) out
    ws = np.repeat(w[None], n, 0)                # [n refits, d, c]
    for _ in range(iters):
        resid = (_softmax(x[None] @ ws) - onehot[None]) * keep[:, :, None]
        grad = x.T[None] @ resid / (n - 1) + lam * ws
        step = (grad.reshape(n, d * c) @ hinv).reshape(n, d, c)
        ws -= step
        if np.abs(step).max() < tol:
            return ws
    raise AssertionError("leave-one-out refits did not converge")


@pytest.fixture(scope="module")
def logreg_loo():
    """Multinomial logistic regression on 300 digits (L2 penalty = damping), fitted to convergence, and
    the exact change of 3 test losses when each training point is removed and the model refitted."""
    from sklearn.datasets import load_digits

    xd, yd = load_digits(return_X_y=True)
    idx = np.random.default_rng(0).permutation(len(yd))
    tr, te = idx[:300], idx[300:303]
    x = np.hstack([xd[tr] / 16.0, np.ones((300, 1))])
    y = yd[tr]
    lam = 1e-2
    w = _fit_logreg(x, y, lam)
    xt = np.hstack([xd[te] / 16.0, np.ones((3, 1))])

    def test_losses(wm):                         # [..., 3] for W of shape [..., d, c]
        logits = xt @ wm
        return -(logits[..., np.arange(3), yd[te]] - np.log(np.exp(logits).sum(-1)))

    deltas = (test_losses(_refit_logreg_without_each(x, y, lam, w)) - test_losses(w)).T
    # [3, 300]: test-loss increase when z is removed
    train = {"x": (xd[tr] / 16.0).astype(np.float32), "y": y.astype(np.int32)}
    test = {"x": (xd[te] / 16.0).astype(np.float32), "y": yd[te].astype(np.int32)}
    return w, lam, train, test, deltas


@pytest.mark.parametrize("kind", ["raw", "ekfac"])
def test_leave_one_out_logistic_regression(kind, logreg_loo):
    w, lam, train, test, deltas = logreg_loo
    lin = nnx.Linear(64, 10, rngs=nnx.Rngs(0))
    lin.kernel[...] = jnp.asarray(w[:-1], jnp.float32)
    lin.bias[...] = jnp.asarray(w[-1], jnp.float32)

    class LR(nnx.Module):
        def __init__(self):
            self.fc = lin

        def __call__(self, x):
            return self.fc(x)

    model = LR()

    def loss_fn(m, b):
        return -jax.nn.log_softmax(m(b["x"]))[jnp.arange(b["y"].shape[0]), b["y"]]

    def sample_fn(m, b, keys):  # labels drawn from the model: the Fisher that equals the CE Hessian
        return {"x": b["x"], "y": jax.vmap(jax.random.categorical)(keys, m(b["x"])).astype(jnp.int32)}

    lg = jv.LoGra(model, loss_fn, rank=None, init="identity")
    pc = jv.fit_preconditioner(lg, model, train, kind=kind, damping=lam, batch_size=100, fisher="sampled",
                               sample_fn=sample_fn, num_samples=16, progress=False)
    scores = np.asarray(pc.apply(lg.grads(model, test)) @ lg.grads(model, train).T)  # [3, 300]
    for qi in range(3):
        r = np.corrcoef(scores[qi], deltas[qi])[0, 1]
        assert r >= 0.9, (kind, qi, r)  # positive: removing a proponent raises the test loss


# ----------------------------------------------------------------------------- invariances

def test_self_influence_invariant_to_batch_size_and_layer_partition(tiny):
    m, data, lg, _, _ = tiny
    lg = jv.LoGra(m, ce_loss, rank=3, seed=1)
    g = np.asarray(lg.grads(m, data))
    si = {}
    for bs in (5, 40):
        pc = jv.fit_preconditioner(lg, m, data, kind="ekfac", damping=1e-2, batch_size=bs, progress=False)
        si[bs] = np.einsum("bd,bd->b", g, np.asarray(pc.apply(g)))
        again = np.einsum("bd,bd->b", g, np.asarray(pc.apply(g)))
        np.testing.assert_array_equal(si[bs], again)  # applying twice: same result, nothing mutated
    assert rel_err(si[5], si[40]) <= 1e-5
    # each layer on its own (another layer order / selection) gives the same per-layer terms
    parts = 0
    for name in ("l2", "l1"):
        one = jv.LoGra(m, ce_loss, rank=3, seed=1, layers=f"^{name}$")
        go = np.asarray(one.grads(m, data))
        pco = jv.fit_preconditioner(one, m, data, kind="ekfac", damping=1e-2, batch_size=8, progress=False)
        parts = parts + np.einsum("bd,bd->b", go, np.asarray(pco.apply(go)))
    assert rel_err(parts, si[40]) <= 1e-5


def self_influence_terms() -> dict:
    """``gᵀ H⁻¹ g`` per example of a small MLP for raw / kfac / ekfac fits, over all of this process's devices
    (a data mesh when there are several)."""
    m = MLP2(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(48, 6)).astype(np.float32), "y": rng.integers(0, 4, 48).astype(np.int32)}
    lg = jv.LoGra(m, ce_loss, rank=3, seed=1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",)) if len(jax.devices()) > 1 else None
    out = {}
    for kind in ("raw", "kfac", "ekfac"):
        pc = jv.fit_preconditioner(lg, m, data, kind=kind, damping=1e-2, batch_size=16, mesh=mesh, progress=False)
        g = lg.grads(m, data)
        out[kind] = np.einsum("bd,bd->b", g, pc.apply(g))
    return out


def test_self_influence_same_on_8_devices(tmp_path):
    """On 8 simulated devices (a subprocess: the device count is fixed when JAX starts) as on this process's
    one device (no mesh: the plain library)."""
    code = textwrap.dedent("""
        import sys, warnings, numpy as np, jax
        warnings.simplefilter("ignore")
        sys.path.insert(0, sys.argv[1])
        from test_precondition import self_influence_terms
        np.savez(sys.argv[2], **self_influence_terms())
        print(len(jax.devices()))
    """)
    env = {"XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
           **{k: v for k, v in os.environ.items() if k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}}
    r = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)),
                        str(tmp_path / "si8.npz")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "8"
    assert len(jax.devices()) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = self_influence_terms()
    eight = np.load(tmp_path / "si8.npz")
    for kind in ("raw", "kfac", "ekfac"):
        assert rel_err(eight[kind], one[kind]) <= 1e-5, kind


def test_relative_damping_and_save_load(tiny, tmp_path):
    m, data, lg, _, q = tiny
    pc = jv.fit_preconditioner(lg, m, data, kind="kfac", relative_damping=0.1, batch_size=16, progress=False)
    for name in pc.names:  # λ = α · mean eigenvalue, per layer
        assert pc.damping[name] == pytest.approx(0.1 * pc.eigenvalues(name).mean(), rel=1e-6)
    assert len(set(pc.damping.values())) == 2
    pc.save(str(tmp_path / "pc"))
    back = jv.Preconditioner.load(str(tmp_path / "pc"))
    np.testing.assert_array_equal(np.asarray(back.apply(q)), np.asarray(pc.apply(q)))
    other = pc.with_damping(damping=1.0)
    assert not np.allclose(np.asarray(other.apply(q)), np.asarray(pc.apply(q)))
    assert pc.damping[pc.names[0]] != 1.0  # the original is unchanged


def test_pca_projections_are_top_eigenvectors(tiny):
    m, data, _, pieces, _ = tiny
    proj = jv.pca_projections(m, ce_loss, data, rank=(3, 2), batch_size=16, progress=False)
    for name, (x, dy) in pieces.items():
        p_in, p_out = (np.asarray(p, np.float64) for p in proj[name])
        for p, mat in ((p_in, x.T @ x / len(x)), (p_out, dy.T @ dy / len(x))):
            ev = np.linalg.eigvalsh(mat)[::-1][: p.shape[0]]
            np.testing.assert_allclose(p @ mat @ p.T, np.diag(ev), atol=1e-4 * ev[0])
    lg = jv.LoGra(m, ce_loss, init="pca", projections=proj)
    assert lg.dim == 3 * 2 * 2


# ----------------------------------------------------------------------------- errors

def test_error_other_configuration(tiny):
    m, data, lg, _, _ = tiny
    pc = jv.fit_preconditioner(lg, m, data, kind="raw", damping=0.1, batch_size=40, progress=False)
    other = jv.LoGra(m, ce_loss, rank=2)
    with pytest.raises(ValueError, match="fitted for a LoGra configuration of dim"):
        pc.apply(other.grads(m, data))
    same_dim = jv.LoGra(m, ce_loss, rank=None, init="gaussian")
    with pytest.raises(ValueError, match="another LoGra configuration"):
        pc.apply(same_dim.grads(m, data), config=same_dim.config())


def test_error_nan_statistics_names_layer(tiny):
    m, data, lg, _, _ = tiny
    bad = {"x": data["x"].copy(), "y": data["y"]}
    bad["x"][3, 0] = np.nan
    with pytest.raises(ValueError, match="layer 'l1'"):
        jv.fit_preconditioner(lg, m, bad, kind="kfac", damping=0.1, batch_size=40, progress=False)


@pytest.mark.parametrize("kw", [{"damping": 0.0}, {"damping": -1.0}, {"relative_damping": 0.0, "damping": None}])
def test_error_nonpositive_damping(tiny, kw):
    m, data, lg, _, _ = tiny
    with pytest.raises(ValueError, match="must be > 0"):
        jv.fit_preconditioner(lg, m, data, kind="raw", batch_size=40, progress=False, **kw)


def test_error_unknown_kind(tiny):
    m, data, lg, _, _ = tiny
    with pytest.raises(ValueError, match="unknown preconditioner kind"):
        jv.fit_preconditioner(lg, m, data, kind="kfca", progress=False)


@pytest.mark.parametrize("seq", [2, 40])
def test_ekfac_refit_from_factors_equals_refit_from_gradients(seq):
    """The eigenvalue re-fit rotates the projected factors when an example has few tokens (seq 2) and the
    per-example gradients otherwise (seq 40); both equal the rotation of explicit per-example gradients."""
    from jaxval._src.logra import blocks_from_pairs, projected_pairs
    from jaxval.models.token_mlp import TokenMLP, loss_fn

    model = TokenMLP(vocab_size=11, d_model=6, n_block=1, hidden=9, rngs=nnx.Rngs(0))
    lg = jv.LoGra(model, loss_fn, rank=None, init="identity", types=(nnx.Linear,))
    tokens = jax.random.randint(jax.random.key(1), (5, seq), 0, 11)
    batch = {"tokens": tokens, "mask": jnp.ones((5, seq), jnp.float32).at[0, seq // 2:].set(0.0)}
    graphdef, state = nnx.split(model)
    keys = jax.random.split(jax.random.key(2), 2 * len(lg.layers))
    basis = {}
    for i, l in enumerate(lg.layers):
        qa = jnp.linalg.qr(jax.random.normal(keys[2 * i], (l.k_in, l.k_in)))[0]
        qs = jnp.linalg.qr(jax.random.normal(keys[2 * i + 1], (l.k_out, l.k_out)))[0]
        basis[l.name] = (qa, qs)

    @jax.jit
    def both(state):
        _, pairs = projected_pairs(graphdef, state, loss_fn, lg.layers, lg.projections, batch)
        g = blocks_from_pairs(lg.layers, pairs)
        return g, curvature.batch_statistics(lg, curvature.init(lg, "ekfac", basis), g, pairs)

    g, stats = both(state)
    explicit_g = np.asarray(explicit(model, loss_fn, lg.projections, batch), np.float64)
    np.testing.assert_allclose(np.asarray(g), explicit_g, rtol=1e-4, atol=1e-5)
    offs = lg.offsets()
    for l in lg.layers:
        qa, qs = (np.asarray(x, np.float64) for x in basis[l.name])
        gb = explicit_g[:, slice(*offs[l.name])].reshape(-1, l.k_in, l.k_out)
        ref = (np.einsum("ki,bkl,lj->bij", qa, gb, qs) ** 2).sum(0)
        assert rel_err(np.asarray(stats.L[l.name]), ref) <= 1e-4
