"""LoGra fast path vs the explicit vmap(grad) reference, projections, and input errors."""

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
from jaxval._src.layers import find_module, weight_matrix
from conftest import ce, explicit, rel_err

warnings.filterwarnings("ignore", message="jaxval: parameters")


def check_fast_vs_explicit(model, loss_fn, batch, rank=3, init="gaussian", tol=1e-5, **kw):
    lg = jv.LoGra(model, loss_fn, rank=rank, init=init, **kw)
    g = lg.grads(model, batch)
    ref = explicit(model, loss_fn, lg.projections, batch)
    assert g.shape == (jax.tree_util.tree_leaves(batch)[0].shape[0], lg.dim)
    assert g.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(ref))) > 0
    assert rel_err(g, ref) <= tol, rel_err(g, ref)
    return lg, g


# ----------------------------------------------------------------------------- one model per layer type

class LinearNet(nnx.Module):
    def __init__(self, bias: bool, rngs):
        self.l1 = nnx.Linear(5, 7, use_bias=bias, rngs=rngs)
        self.l2 = nnx.Linear(7, 3, use_bias=bias, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias):
    m = LinearNet(bias, nnx.Rngs(0))
    batch = {"x": jax.random.normal(jax.random.key(1), (6, 5)), "y": jnp.arange(6) % 3}
    lg, _ = check_fast_vs_explicit(m, lambda m, b: ce(m(b["x"]), b["y"]), batch, rank=4)
    assert [l.n_in for l in lg.layers] == [5 + bias, 7 + bias]


class LinearGeneralNet(nnx.Module):
    def __init__(self, rngs):
        # two contracted input axes, two output axes, applied per token
        self.lg = nnx.LinearGeneral((3, 4), (2, 5), axis=(-2, -1), rngs=rngs)
        self.head = nnx.Linear(10, 3, rngs=rngs)

    def __call__(self, x):  # x [B, T, 3, 4]
        h = jnp.tanh(self.lg(x)).reshape(x.shape[0], x.shape[1], 10)
        return self.head(h.mean(1))


def test_linear_general_two_input_axes():
    m = LinearGeneralNet(nnx.Rngs(0))
    batch = {"x": jax.random.normal(jax.random.key(2), (4, 5, 3, 4)), "y": jnp.array([0, 1, 2, 0])}
    lg, _ = check_fast_vs_explicit(m, lambda m, b: ce(m(b["x"]), b["y"]), batch, rank=(5, 4))
    assert (lg.layers[1].n_in, lg.layers[1].n_out) == (3 * 4 + 1, 10)


class EinsumNet(nnx.Module):
    def __init__(self, rngs):
        # kernel axes interleaved: h,d are inputs, m output; bias over the output axis
        self.proj = nnx.Einsum("bthd,hmd->btm", (2, 6, 3), (6,), rngs=rngs)
        self.nobias = nnx.Einsum("btm,mo->bto", (6, 3), None, rngs=rngs)

    def __call__(self, x):
        return self.nobias(jnp.tanh(self.proj(x))).sum(1)


def test_einsum():
    m = EinsumNet(nnx.Rngs(0))
    batch = {"x": jax.random.normal(jax.random.key(3), (5, 4, 2, 3)), "y": jnp.array([0, 1, 2, 1, 0])}
    lg, _ = check_fast_vs_explicit(m, lambda m, b: ce(m(b["x"]), b["y"]), batch, rank=4)
    assert [(l.name, l.n_in, l.n_out) for l in lg.layers] == [("nobias", 6, 3), ("proj", 7, 6)]


class EmbedNet(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(11, 4, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, tok):
        return self.head(jnp.tanh(self.emb(tok)).sum(1))


def test_embed_repeated_tokens():
    m = EmbedNet(nnx.Rngs(0))
    tok = jnp.array([[1, 1, 1, 2], [3, 4, 3, 4], [0, 10, 10, 5]])  # repeats inside one example
    batch = {"tok": tok, "y": jnp.array([0, 1, 2])}
    check_fast_vs_explicit(m, lambda m, b: ce(m(b["tok"]), b["y"]), batch, rank=5, init="identity")
    check_fast_vs_explicit(m, lambda m, b: ce(m(b["tok"]), b["y"]), batch, rank=3)


class TiedNet(nnx.Module):
    """Embed used twice: as the input table and as the output head (Embed.attend)."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(9, 4, rngs=rngs)
        self.mix = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, tok):
        return self.emb.attend(jnp.tanh(self.mix(self.emb(tok))))  # [B, T, 9]


def test_tied_embedding_attend():
    m = TiedNet(nnx.Rngs(0))
    tok = jax.random.randint(jax.random.key(4), (3, 6), 0, 9)

    def loss_fn(m, b):
        logits = m(b["tok"])[:, :-1]
        lp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(lp, b["tok"][:, 1:, None], -1)[..., 0].sum(1)

    check_fast_vs_explicit(m, loss_fn, {"tok": tok}, rank=None, init="identity")
    check_fast_vs_explicit(m, loss_fn, {"tok": tok}, rank=(3, 2))


class ConvNet(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(2, 4, (3, 3), strides=2, padding=1, rngs=rngs)
        self.c2 = nnx.Conv(4, 3, (2, 3), strides=(1, 2), padding="VALID", use_bias=False, rngs=rngs)
        self.c3 = nnx.Conv(3, 3, (3, 3), padding="SAME", kernel_dilation=2, rngs=rngs)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.c1(x))
        h = jnp.tanh(self.c2(h))
        h = jnp.tanh(self.c3(h))
        return self.head(h.mean((1, 2)))


def test_conv_stride_padding():
    m = ConvNet(nnx.Rngs(0))
    batch = {"x": jax.random.normal(jax.random.key(5), (4, 9, 10, 2)), "y": jnp.array([0, 1, 1, 0])}
    lg, _ = check_fast_vs_explicit(m, lambda m, b: ce(m(b["x"]), b["y"]), batch, rank=3)
    assert {l.name: l.n_in for l in lg.layers}["c1"] == 3 * 3 * 2 + 1


class SharedNet(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(3, 4, rngs=rngs)
        self.shared = nnx.Linear(4, 4, rngs=rngs)
        self.alias = self.shared  # same layer reachable through two attributes
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.inp(x))
        h = jnp.tanh(self.shared(h))
        h = jnp.tanh(self.alias(h))  # second use, through the other reference
        return self.out(self.shared(h))  # third use


def test_layer_used_twice():
    m = SharedNet(nnx.Rngs(0))
    batch = {"x": jax.random.normal(jax.random.key(6), (5, 3)), "y": jnp.array([0, 1, 1, 0, 1])}
    lg, _ = check_fast_vs_explicit(m, lambda m, b: ce(m(b["x"]), b["y"]), batch, rank=(3, 2))
    names = [l.name for l in lg.layers]  # the shared layer is tracked once, under one of its paths
    assert len(names) == 3 and len({"shared", "alias"} & set(names)) == 1


def test_gpt_padded_sequences():
    gpt = pytest.importorskip("jaxval.models.gpt")
    cfg = gpt.GPTConfig(vocab_size=13, block_size=8, d_model=8, n_layer=1, n_head=2)
    m = gpt.GPT(cfg, rngs=nnx.Rngs(0))
    tok = jax.random.randint(jax.random.key(7), (3, 8), 0, 13)
    mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3, [1] * 3 + [0] * 5], jnp.float32)
    batch = {"tokens": tok, "mask": mask}
    lg, g = check_fast_vs_explicit(m, gpt.loss_fn, batch, rank=3)
    kinds = {l.kind for l in lg.layers}
    assert {"embed", "linear"} <= kinds
    # changing padded tokens changes nothing
    tok2 = jnp.where(mask > 0, tok, (tok + 5) % 13)
    g2 = lg.grads(m, {"tokens": tok2, "mask": mask})
    assert rel_err(g2, g) <= 1e-5


# ----------------------------------------------------------------------------- identity = true gradient

def _true_per_example_matrices(model, loss_fn, batch, layer):
    """Per-example ∂loss_b/∂W via a Python loop of jax.grad (independent of vmap and of LoGra)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    module = find_module(model, layer.path)
    out = []
    for i in range(n):
        ex = jax.tree_util.tree_map(lambda a: a[i:i + 1], batch)
        gr = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), ex)[0])(params)
        sub = nnx.merge(graphdef, gr, rest)
        mod = find_module(sub, layer.path)
        out.append(weight_matrix(layer, module, mod.kernel[...], mod.bias[...] if layer.has_bias else None))
    return np.stack(out)


def test_identity_full_rank_is_true_gradient_and_sums_to_batch_gradient():
    m = ConvNet(nnx.Rngs(1))
    loss_fn = lambda m, b: ce(m(b["x"]), b["y"])  # noqa: E731
    batch = {"x": jax.random.normal(jax.random.key(8), (3, 7, 7, 2)), "y": jnp.array([0, 1, 0])}
    lg = jv.LoGra(m, loss_fn, rank=None, init="identity")
    g = np.asarray(lg.grads(m, batch))
    offs = lg.offsets()
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    total = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch).sum())(params)
    total_m = nnx.merge(graphdef, total, rest)
    for layer in lg.layers:
        blk = g[:, slice(*offs[layer.name])].reshape(-1, layer.n_in, layer.n_out)
        true = _true_per_example_matrices(m, loss_fn, batch, layer)
        assert rel_err(blk, true) <= 1e-5
        mod = find_module(total_m, layer.path)
        summed = weight_matrix(layer, find_module(m, layer.path), mod.kernel[...],
                               mod.bias[...] if layer.has_bias else None)
        assert rel_err(blk.sum(0), summed) <= 1e-5


# ----------------------------------------------------------------------------- projections

def test_projection_independent_of_other_layers():
    m = LinearNet(True, nnx.Rngs(0))
    f = lambda m, b: ce(m(b["x"]), b["y"])  # noqa: E731
    both = jv.LoGra(m, f, rank=3, seed=7)
    only = jv.LoGra(m, f, rank=3, seed=7, layers="l2")
    assert [l.name for l in only.layers] == ["l2"]
    for a, b in zip(both.projections["l2"], only.projections["l2"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other_seed = jv.LoGra(m, f, rank=3, seed=8)
    assert not np.array_equal(np.asarray(other_seed.projections["l2"][0]), np.asarray(both.projections["l2"][0]))
    # input and output sides differ, layers differ
    assert not np.array_equal(np.asarray(both.projections["l1"][0])[:, :5], np.asarray(both.projections["l2"][0])[:, :5])


PROJECTION_DIGEST = textwrap.dedent("""
    import sys, hashlib, numpy as np
    import jaxval as jv
    from jaxval._src.layers import Layer
    layers = [Layer("blocks/0/mlp/fc", ("blocks", 0, "mlp", "fc"), "linear", 65, 33, True, 16, 8)]
    h = hashlib.sha256()
    for init in ("gaussian", "rademacher", "orthogonal"):
        for p in jv.init_projections(layers, init, seed=123)["blocks/0/mlp/fc"]:
            h.update(np.asarray(p).tobytes())
    print(h.hexdigest())
""")


def test_projection_bit_identical_across_processes(tmp_path):
    """The projections' bytes in a fresh process with 3 devices and in this one (1 device) are the same. The
    child gets this process's environment: the orthogonal init's QR runs through OpenBLAS, whose kernels (and
    so the last bits) follow e.g. ``OPENBLAS_CORETYPE``; same machine and settings, same bytes."""
    import contextlib
    import io

    env = {**os.environ, "XLA_FLAGS": xla_flags(3), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", PROJECTION_DIGEST], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(jax.devices()) == 1
    with contextlib.redirect_stdout(io.StringIO()) as here:
        exec(PROJECTION_DIGEST, {"__name__": "projection_digest"})
    outs = {r.stdout.strip(), here.getvalue().strip()}
    assert len(outs) == 1 and len(next(iter(outs))) == 64


@pytest.mark.parametrize("init", ["gaussian", "rademacher", "orthogonal"])
def test_projection_preserves_inner_products_in_expectation(init):
    """E[(Pa)·(Pb)] = a·b. Average over M independent projections; for Gaussian entries the
    estimator's variance is (|a|²|b|² + (a·b)²)/k, a bound that also holds for Rademacher and
    orthogonal rows; we require |mean − a·b| < 5 standard errors (p ≈ 6e-7 under the null)."""
    n, k, m_draws = 40, 8, 400
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=n), rng.normal(size=n)
    a_b = a @ b
    keys = jax.random.split(jax.random.key(0), m_draws)
    ests = np.array([np.asarray(jv.projection_matrix(init, key, k, n), np.float64) @ a
                     @ (np.asarray(jv.projection_matrix(init, key, k, n), np.float64) @ b) for key in keys])
    se = np.sqrt((a @ a * (b @ b) + a_b**2) / k / m_draws)
    assert abs(ests.mean() - a_b) < 5 * se, (ests.mean(), a_b, se)
    # and the estimator is not degenerate: its spread matches the variance formula within a factor 2
    if init == "gaussian":
        assert 0.5 < ests.std() / np.sqrt((a @ a * (b @ b) + a_b**2) / k) < 2.0


def test_projection_shapes_and_rank_clipping():
    m = LinearNet(True, nnx.Rngs(0))
    lg = jv.LoGra(m, lambda m, b: ce(m(b["x"]), b["y"]), rank=(100, 2))
    assert [(l.k_in, l.k_out) for l in lg.layers] == [(6, 2), (8, 2)]
    assert lg.dim == 6 * 2 + 8 * 2
    p_in, p_out = lg.projections["l1"]
    assert p_in.shape == (6, 6) and p_out.shape == (2, 7)


def test_gaussian_scale():
    p = np.asarray(jv.projection_matrix("gaussian", jax.random.key(3), 64, 4000), np.float64)
    assert abs(p.var() * 64 - 1.0) < 0.02 and abs(p.mean()) < 0.002


# ----------------------------------------------------------------------------- errors

def test_error_scalar_loss():
    m = LinearNet(True, nnx.Rngs(0))
    lg = jv.LoGra(m, lambda m, b: ce(m(b["x"]), b["y"]).mean(), rank=2)
    with pytest.raises(ValueError, match=r"per-example losses of shape \[B\]"):
        lg.grads(m, {"x": jnp.ones((4, 5)), "y": jnp.zeros(4, jnp.int32)})


def test_error_mismatched_batch_axes():
    m = LinearNet(True, nnx.Rngs(0))
    lg = jv.LoGra(m, lambda m, b: ce(m(b["x"]), b["y"]), rank=2)
    with pytest.raises(ValueError, match="different leading"):
        lg.grads(m, {"x": jnp.ones((4, 5)), "y": jnp.zeros(3, jnp.int32)})


def test_error_no_supported_layers():
    class NormOnly(nnx.Module):
        def __init__(self, rngs):
            self.ln = nnx.LayerNorm(3, rngs=rngs)

        def __call__(self, x):
            return self.ln(x)

    with pytest.raises(ValueError, match="no supported layer"):
        jv.LoGra(NormOnly(nnx.Rngs(0)), lambda m, b: m(b).sum(-1), rank=2)
    with pytest.raises(ValueError, match="no supported layer"):
        jv.LoGra(LinearNet(True, nnx.Rngs(0)), lambda m, b: m(b).sum(-1), layers="nothing_matches")


def test_unsupported_parameterised_layers_are_reported():
    class WithNorm(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(3, 3, rngs=rngs)
            self.norm = nnx.LayerNorm(3, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.fc(x))

    m = WithNorm(nnx.Rngs(0))
    with pytest.warns(UserWarning, match=r"norm \(LayerNorm\)"):
        jv.LoGra(m, lambda m, b: m(b).sum(-1), rank=2)
    with pytest.raises(ValueError, match="norm.*LayerNorm.*does not support"):
        jv.LoGra(m, lambda m, b: m(b).sum(-1), rank=2, layers=["fc", "norm"])


def test_error_batchnorm_training_mode():
    class BN(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.fc(x))

    m = BN(nnx.Rngs(0))
    lg = jv.LoGra(m, lambda m, b: m(b).sum(-1), rank=2)
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        lg.grads(m, jnp.ones((4, 3)))
    m.eval()  # running averages: examples independent again
    assert lg.grads(m, jnp.ones((4, 3))).shape == (4, lg.dim)


@pytest.mark.parametrize("rank", [0, -3, (4, 0), 2.5, "8"])
def test_error_bad_rank(rank):
    with pytest.raises(ValueError, match="rank must be"):
        jv.LoGra(LinearNet(True, nnx.Rngs(0)), lambda m, b: m(b).sum(-1), rank=rank)


def test_error_unknown_init():
    with pytest.raises(ValueError, match="unknown projection init 'gausian'"):
        jv.LoGra(LinearNet(True, nnx.Rngs(0)), lambda m, b: m(b).sum(-1), init="gausian")
