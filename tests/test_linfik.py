"""LinFiK: equals a direct computation from explicit gradients; equals the first-order change of the task
loss after an SGD step on z (the gap is second order); options; proposition tools."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxval.distributed import xla_flags
from jaxval import LoGra, explicit_grads
from jaxval.evaluation import plot_stability
from jaxval.valuation.linfik import gradient_stability, layer_normalize, linfik


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 7, rngs=rngs)
        self.l2 = nnx.Linear(7, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def loss_fn(model, batch):
    logits = model(batch["x"])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]


def _data(n, seed):
    r = np.random.default_rng(seed)
    return {"x": r.normal(size=(n, 5)).astype(np.float32), "y": r.integers(0, 3, n).astype(np.int32)}


@pytest.fixture(scope="module")
def setup():
    jax.config.update("jax_enable_x64", False)
    model = Tiny(nnx.Rngs(0))
    logra = LoGra(model, loss_fn, rank=None, init="identity")
    return model, logra, _data(13, 1), _data(9, 2)


def test_equals_explicit(setup):
    model, logra, pool, task = setup
    v = linfik(logra, model, pool, task, lr=0.3, batch_size=4, normalize=None)       # padded last batches
    gp = np.asarray(explicit_grads(model, loss_fn, logra.projections, pool), np.float64)
    gt = np.asarray(explicit_grads(model, loss_fn, logra.projections, task), np.float64).mean(0)
    ref = 0.3 * gp @ gt
    np.testing.assert_allclose(v, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    # sign sanity: a task example used as a training sample has positive LinFiK w.r.t. itself
    self_v = linfik(logra, model, {k: a[:1] for k, a in task.items()}, {k: a[:1] for k, a in task.items()},
                    normalize=None)
    assert self_v[0] > 0


def _sgd_step_loss(model, z, task, lr):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def task_loss(p):
        return jnp.mean(loss_fn(nnx.merge(graphdef, p, rest), task))

    def z_loss(p):
        return loss_fn(nnx.merge(graphdef, p, rest), z)[0]

    g = jax.grad(z_loss)(params)
    new = jax.tree_util.tree_map(lambda p, d: p - lr * d, params, g)
    return float(task_loss(params)) - float(task_loss(new))


def test_first_order_change(setup):
    """LinFiK = the actual task-loss decrease after an SGD step on z, up to the second-order term: the
    relative gap shrinks ∝ lr (absolute gap ∝ lr²), so a wrong scale or sign would not pass."""
    model, logra, pool, task = setup
    rel = {}
    with jax.default_matmul_precision("highest"):
        for lr in (1e-1, 1e-2, 1e-3):
            r = []
            for i in range(3):
                z = {k: a[i:i + 1] for k, a in pool.items()}
                actual = _sgd_step_loss(model, z, task, lr)
                pred = float(linfik(logra, model, z, task, lr=lr, normalize=None)[0])
                assert np.sign(actual) == np.sign(pred)
                r.append(abs(actual - pred) / abs(pred))
            rel[lr] = np.array(r)
    assert np.all(rel[1e-1] > 0.05)                           # the step is large enough to see curvature
    assert np.all(rel[1e-2] < rel[1e-1] / 5), rel
    assert np.all(rel[1e-3] < np.maximum(rel[1e-2] / 5, 2e-3)), rel
    assert np.all(rel[1e-3] < 0.01), rel


def test_default_is_layer_normalised_numpy_reference(setup):
    """The default score is the layer-normalised one: equal to explicit ``normalize="layer"`` and to a float64
    numpy reference from vmap(grad) gradients (each layer's block scaled to unit norm, dot with the mean of the
    task's unit blocks, summed over layers); it differs from the plain kernel."""
    model, logra, pool, task = setup
    v = linfik(logra, model, pool, task, lr=0.7, batch_size=4)
    np.testing.assert_array_equal(v, linfik(logra, model, pool, task, lr=0.7, batch_size=4, normalize="layer"))
    gp = np.asarray(explicit_grads(model, loss_fn, logra.projections, pool), np.float64)
    gt = np.asarray(explicit_grads(model, loss_fn, logra.projections, task), np.float64)
    ref = np.zeros(len(gp))
    offsets = list(logra.offsets().values())
    assert len(offsets) == 2                                  # two Linear layers (bias as a row), one block each
    for lo, hi in offsets:
        up = gp[:, lo:hi] / np.linalg.norm(gp[:, lo:hi], axis=1, keepdims=True)
        ut = gt[:, lo:hi] / np.linalg.norm(gt[:, lo:hi], axis=1, keepdims=True)
        ref += up @ ut.mean(0)
    np.testing.assert_allclose(v, 0.7 * ref, rtol=1e-4, atol=1e-6)
    plain = linfik(logra, model, pool, task, lr=0.7, batch_size=4, normalize="none")
    np.testing.assert_array_equal(plain, linfik(logra, model, pool, task, lr=0.7, batch_size=4, normalize=None))
    assert np.max(np.abs(plain - v)) > 1e-2


def test_options(setup):
    model, logra, pool, task = setup
    gp = np.asarray(explicit_grads(model, loss_fn, logra.projections, pool))
    gt = np.asarray(explicit_grads(model, loss_fn, logra.projections, task))
    # layer normalisation
    v = linfik(logra, model, pool, task, normalize="layer")
    ref = np.asarray(layer_normalize(logra, gp)) @ np.asarray(layer_normalize(logra, gt)).mean(0)
    np.testing.assert_allclose(v, ref, rtol=1e-4, atol=1e-6)
    assert np.all(np.abs(v) <= len(logra.layers) + 1e-5)
    # preconditioner: uses H^-1 on the task mean
    class Diag:
        def apply(self, g):
            return g * 2.0
    np.testing.assert_allclose(linfik(logra, model, pool, task, precond=Diag(), normalize=None),
                               2 * linfik(logra, model, pool, task, normalize=None), rtol=1e-5)
    # several checkpoints: sum of per-checkpoint terms, one lr each
    m2 = Tiny(nnx.Rngs(5))
    tot, per = linfik(logra, None, pool, task, lr=[1.0, 0.5], checkpoints=[model, m2], return_per_checkpoint=True)
    np.testing.assert_allclose(per[0], linfik(logra, model, pool, task), rtol=1e-5)
    np.testing.assert_allclose(per[1], linfik(logra, m2, pool, task, lr=0.5), rtol=1e-5)
    np.testing.assert_allclose(tot, per.sum(0), rtol=1e-6)
    with pytest.raises(ValueError, match="lr has 3 values"):
        linfik(logra, None, pool, task, lr=[1, 2, 3], checkpoints=[model, m2])
    with pytest.raises(ValueError, match="normalize"):
        linfik(logra, model, pool, task, normalize="global")


def test_stability_tools(setup, tmp_path):
    model, logra, pool, task = setup
    m2 = Tiny(nnx.Rngs(5))
    st = gradient_stability(logra, [m2, model, model], pool, batch_size=5)
    assert st["cosine"].shape == (3, 13)
    np.testing.assert_allclose(st["cosine"][1:], 1.0, atol=1e-5)     # same checkpoint as the reference
    np.testing.assert_allclose(st["norm_spearman"][1, 2], 1.0)
    from scipy.stats import spearmanr

    assert st["norm_spearman"][0, 1] == pytest.approx(spearmanr(st["norms"][0], st["norms"][1]).statistic, abs=1e-12)
    np.testing.assert_allclose(st["norm_spearman"], st["norm_spearman"].T)
    gp = np.asarray(explicit_grads(m2, loss_fn, logra.projections, pool))
    np.testing.assert_allclose(st["norms"][0], np.linalg.norm(gp, axis=1), rtol=1e-4)
    out = plot_stability(st, str(tmp_path / "s.png"), steps=[0, 10, 20])
    assert (tmp_path / "s.png").stat().st_size > 1000 and out.endswith("s.png")



_CLI_CFG = """
seed: 0
pool_corpus: {d}/pool.txt
task_corpus: {d}/task.txt
offdomain_corpus: {d}/off.txt
offdomain_fraction: 0.25
vocab_size: 64
block_len: 24
max_pool: 24
n_task: 6
n_task_eval: 4
d_model: 16
n_layer: 1
n_head: 2
warmup_steps: 2
train_batch: 8
rank: 4
batch_size: 16
"""


def _corpora(d):
    r = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran over hills and rivers under grey skies".split()
    for name, n in (("pool", 1200), ("task", 600), ("off", 600)):
        (d / f"{name}.txt").write_text(" ".join(r.choice(words, n)))
    cfg = d / "c.yaml"
    cfg.write_text(_CLI_CFG.format(d=d))
    return cfg


def test_cli_linfik_writes_scores_and_refuses_bad_configs(tmp_path, capsys):
    """`jaxval linfik` end to end on tiny text files: one score per pool line, the pool mixes the off-domain
    corpus at the configured share, the default (layer-normalised) scores obey their bound (|v| <= lr · #layers); a typo
    or a wrong type in the config is one line on stderr and exit status 2."""
    import json

    from jaxval.cli.app import main

    cfg = _corpora(tmp_path)
    out = tmp_path / "out"
    assert main(["linfik", "--config", str(cfg), "--out", str(out), "--set", "linfik_lr=0.5"]) == 0
    rows = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    v = np.load(out / "linfik.npy")
    meta = json.loads((out / "meta.json").read_text())
    assert len(rows) == len(v) == meta["n_pool"] == 24 and np.all(np.isfinite(v))
    assert 0 < sum(r["source"] for r in rows) < 24 and all(r["text"] for r in rows)
    assert meta["config"]["normalize"] == "layer" and meta["config"]["linfik_lr"] == 0.5
    assert np.all(np.abs(v) <= 0.5 * len(meta["logra"]["layers"]) + 1e-5)
    capsys.readouterr()
    assert main(["linfik", "--config", str(cfg), "--out", str(out), "--set", "rnak=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown key 'rnak'" in err and "did you mean 'rank'" in err
    assert main(["linfik", "--config", str(cfg), "--out", str(out), "--set", "warmup_steps=many"]) == 2
    assert "warmup_steps must be int" in capsys.readouterr().err
    assert main(["linfik", "--config", str(tmp_path / "none.yaml"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


MESH_SCRIPT = '''
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import jaxval as jv
from jaxval.distributed import make_mesh, shard_params
from jaxval.valuation.linfik import linfik, pool_gradients

class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 4, rngs=rngs)
    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))

def loss_fn(m, b):
    return -jnp.take_along_axis(jax.nn.log_softmax(m(b["x"])), b["y"][:, None], axis=1)[:, 0]

r = np.random.default_rng(0)
pool = {"x": r.normal(size=(22, 6)).astype(np.float32), "y": r.integers(0, 4, 22).astype(np.int32)}
task = {"x": r.normal(size=(10, 6)).astype(np.float32), "y": r.integers(0, 4, 10).astype(np.int32)}
model = Tiny(nnx.Rngs(0))
logra = jv.LoGra(model, loss_fn, rank=3, seed=1)
ref = linfik(logra, model, pool, task, lr=0.5, batch_size=8, normalize="layer")
g_ref = pool_gradients(logra, model, pool, batch_size=8)
mesh = make_mesh(data=2, model=2)
sharded = shard_params(model, mesh, axis="model")
got = linfik(logra, sharded, pool, task, lr=0.5, batch_size=8, normalize="layer", mesh=mesh)
g = pool_gradients(logra, sharded, pool, batch_size=8, mesh=mesh)
kernel = nnx.state(sharded, nnx.Param)["l1"]["kernel"][...]
print("MAXREL", float(np.abs(got - ref).max() / np.abs(ref).max()), float(np.abs(g - g_ref).max() / np.abs(g_ref).max()),
      "SHARDED", not kernel.sharding.is_fully_replicated)
'''


def test_linfik_with_a_mesh_and_sharded_parameters_equals_one_device(tmp_path):
    """4 simulated CPU devices, a (data 2 x model 2) mesh with the parameters split over `model`: the same
    LinFiK scores and pool gradients as one device, and the parameters stay sharded."""
    import os
    import subprocess
    import sys

    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("MAXREL"))
    _, s_err, g_err, _, sharded = line.split()
    assert float(s_err) < 1e-5 and float(g_err) < 1e-5, line
    assert sharded == "True", line


# ----------------------------------------------------------------------------- per-position parts

V_SEQ, T_SEQ = 11, 6


class Seq(nnx.Module):
    """A causal toy LM: token embeddings, a running mean over positions (positions interact), two linear
    layers applied per position."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(V_SEQ, 4, rngs=rngs)
        self.l1 = nnx.Linear(4, 5, use_bias=False, rngs=rngs)
        self.l2 = nnx.Linear(5, V_SEQ, use_bias=False, rngs=rngs)

    def hidden(self, tokens):
        e = self.emb(tokens[:, :-1])
        return jnp.cumsum(e, 1) / jnp.arange(1, e.shape[1] + 1)[None, :, None]


def seq_loss(model, batch, eps1=None, eps2=None):
    c = model.hidden(batch["tokens"])
    z1 = model.l1(c) + (0.0 if eps1 is None else eps1)
    z2 = model.l2(jnp.tanh(z1)) + (0.0 if eps2 is None else eps2)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(z2), batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    return (ce * batch["mask"][:, 1:]).sum(1)


def _seq_data(n, seed):
    r = np.random.default_rng(seed)
    mask = (r.random((n, T_SEQ)) < 0.7).astype(np.float32)
    return {"tokens": r.integers(0, V_SEQ, (n, T_SEQ)).astype(np.int32), "mask": mask}


def _explicit_parts(model, pool, gt, normalize):
    """numpy reference: each layer's per-position gradient x_t dy_tᵀ from explicit cotangents (grad of the loss
    w.r.t. a zero perturbation of the layer's output), contracted with the task gradient's block."""
    out = []
    for i in range(len(pool["tokens"])):
        ex = {k: a[i:i + 1] for k, a in pool.items()}
        e1, e2 = jnp.zeros((1, T_SEQ - 1, 5)), jnp.zeros((1, T_SEQ - 1, V_SEQ))
        dy1, dy2 = jax.grad(lambda a, b: seq_loss(model, ex, a, b).sum(), argnums=(0, 1))(e1, e2)
        c = np.asarray(model.hidden(ex["tokens"]), np.float64)[0]
        x1, x2 = c, np.tanh(c @ np.asarray(model.l1.kernel[...], np.float64))
        row, lo = np.zeros(T_SEQ - 1), 0
        for x, dy in ((x1, np.asarray(dy1, np.float64)[0]), (x2, np.asarray(dy2, np.float64)[0])):
            per_t = np.einsum("ti,to->tio", x, dy)                       # [T, n_in, n_out]
            blk = gt[lo:lo + per_t[0].size].reshape(per_t.shape[1:])
            part = np.einsum("tio,io->t", per_t, blk)
            row += part / np.linalg.norm(per_t.sum(0)) if normalize else part
            lo += per_t[0].size
        out.append(row)
    return np.stack(out)


@pytest.mark.filterwarnings("ignore:jaxval. parameters of these modules")
@pytest.mark.parametrize("normalize", ["layer", None])
def test_parts_match_an_explicit_reference_and_sum_to_the_scores(normalize):
    from jaxval.valuation.linfik import linfik_parts

    model = Seq(nnx.Rngs(3))
    logra = LoGra(model, seq_loss, rank=None, init="identity", layers="l[12]")
    pool, task = _seq_data(7, 4), _seq_data(5, 5)
    parts = linfik_parts(logra, model, pool, task, lr=0.5, batch_size=3, normalize=normalize)   # padded batches
    assert parts.shape == (7, T_SEQ - 1)
    gt = np.asarray(explicit_grads(model, seq_loss, logra.projections, task), np.float64)
    if normalize:
        gt = np.asarray(layer_normalize(logra, gt), np.float64)
    ref = 0.5 * _explicit_parts(model, pool, gt.mean(0), normalize)
    np.testing.assert_allclose(parts, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    # (the reference is not trivially zero)
    assert np.abs(ref).max() > 1e-3
    scores = linfik(logra, model, pool, task, lr=0.5, batch_size=3, normalize=normalize)
    np.testing.assert_allclose(parts.sum(1), scores, rtol=1e-4, atol=1e-6 * np.abs(scores).max())


@pytest.mark.filterwarnings("ignore:jaxval. parameters of these modules")
def test_parts_take_a_task_gradient_and_refuse_bad_input():
    from jaxval import ConfigError
    from jaxval.valuation.linfik import linfik_parts, task_gradient

    model = Seq(nnx.Rngs(3))
    logra = LoGra(model, seq_loss, rank=3, layers="l[12]")
    pool, task = _seq_data(4, 6), _seq_data(3, 7)
    gt = task_gradient(logra, model, task, normalize="layer")
    np.testing.assert_allclose(linfik_parts(logra, model, pool, task_grad=gt),
                               linfik_parts(logra, model, pool, task), rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="exactly one"):
        linfik_parts(logra, model, pool)
    with pytest.raises(ConfigError, match="exactly one"):
        linfik_parts(logra, model, pool, task, task_grad=gt)
    with pytest.raises(ConfigError, match="entries"):
        linfik_parts(logra, model, pool, task_grad=np.zeros(logra.dim + 1))

    class Pooled(Seq):                       # a layer on the mean over positions: no shared position axis
        def __init__(self, rngs):
            super().__init__(rngs)
            self.l3 = nnx.Linear(4, 1, use_bias=False, rngs=rngs)

    def pooled_loss(m, b):
        return seq_loss(m, b) + m.l3(m.hidden(b["tokens"]).mean(1))[:, 0] ** 2

    pm = Pooled(nnx.Rngs(0))
    lg = LoGra(pm, pooled_loss, rank=2, layers="l[13]")
    with pytest.raises(ConfigError, match="one position axis"):
        linfik_parts(lg, pm, pool, task)
