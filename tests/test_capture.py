"""Layers found in the traced computation, for every frontend, against independent references.

Each reference is ``jax.vmap(jax.grad)`` of the same per-example loss with respect to the parameter
pytree, laid out here by hand as the layer's ``(n_in, n_out)`` matrix (bias appended as the last row):
identity projections at full rank must give exactly these matrices, random projections
``P_in W P_outᵀ`` of them.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxval as jv
from conftest import ce, explicit, rel_err

warnings.filterwarnings("ignore", message="jaxval: parameters")


def per_example_grads(params, loss_fn, batch):
    """``vmap(grad)`` of one example's loss w.r.t. a parameter pytree (the model as ``loss_fn(params, b)``)."""
    def one(p, ex):
        return loss_fn(p, jax.tree_util.tree_map(lambda a: a[None], ex))[0]

    return jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0)))(params, batch)   # compiled: one program


def check(lg, g, mats: dict, tol=1e-5):
    """Every layer's block of ``g`` equals ``P_in W_b P_outᵀ`` of the hand-laid-out reference ``mats``."""
    g = np.asarray(g, np.float64)
    assert sorted(mats) == sorted(l.name for l in lg.layers), ([l.name for l in lg.layers], sorted(mats))
    offs = lg.offsets()
    for layer in lg.layers:
        w = np.asarray(mats[layer.name], np.float64)
        assert w.shape[1:] == (layer.n_in, layer.n_out), (layer.name, w.shape, layer)
        p_in, p_out = (np.asarray(p, np.float64) for p in lg.projections[layer.name])
        want = np.einsum("kn,bnm,lm->bkl", p_in, w, p_out).reshape(len(w), -1)
        assert np.max(np.abs(want)) > 0
        assert rel_err(g[:, slice(*offs[layer.name])], want) <= tol, (layer.name, rel_err(g[:, slice(*offs[layer.name])], want))


def with_bias(k, b):
    return jnp.concatenate([k, b[:, None, :]], axis=1)


X = jax.random.normal(jax.random.key(1), (6, 5))
Y = jnp.arange(6) % 3
BATCH = {"x": X, "y": Y}


# ----------------------------------------------------------------------------- nnx

def nnx_reference(model, loss_fn, batch, wrt=nnx.Param):
    graphdef, params, rest = nnx.split(model, wrt, ...)
    per = per_example_grads(params, lambda p, b: loss_fn(nnx.merge(graphdef, p, rest), b), batch)
    return {tuple(path): v[...] if not isinstance(v, jax.Array) else v for path, v in nnx.to_flat_state(per)}


@pytest.mark.parametrize("with_batch", [False, True])
def test_nnx_root_linear(with_batch):
    """Logistic regression: the model *is* one nnx.Linear."""
    m = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    loss = lambda m, b: ce(m(b["x"]), b["y"])  # noqa: E731
    kw = {"batch": BATCH} if with_batch else {}
    ref = nnx_reference(m, loss, BATCH)
    mats = {"kernel": with_bias(ref[("kernel",)], ref[("bias",)])}
    lg = jv.LoGra(m, loss, rank=None, init="identity", **kw)
    check(lg, lg.grads(m, BATCH), mats)
    lg = jv.LoGra(m, loss, rank=(4, 2), **kw)
    check(lg, lg.grads(m, BATCH), mats)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 4, rngs=rngs)


class Stacked(nnx.Module):
    """MaxText style: blocks created with nnx.vmap, applied with nnx.scan."""

    def __init__(self, rngs):
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(key):
            return Block(nnx.Rngs(key))

        self.inp = nnx.Linear(5, 4, rngs=rngs)
        self.blocks = make(jax.random.split(jax.random.key(0), 3))
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(block, h):
            return jnp.tanh(block.fc(h))

        return self.head(body(self.blocks, jnp.tanh(self.inp(x))))


@pytest.mark.parametrize("with_batch", [False, True])
def test_nnx_scan_stack_each_slice_a_layer(with_batch):
    m = Stacked(nnx.Rngs(1))
    loss = lambda m, b: ce(m(b["x"]), b["y"])  # noqa: E731
    ref = nnx_reference(m, loss, BATCH)
    k, b = ref[("blocks", "fc", "kernel")], ref[("blocks", "fc", "bias")]   # [B, 3, 4, 4], [B, 3, 4]
    mats = {f"blocks/fc/{i}": with_bias(k[:, i], b[:, i]) for i in range(3)}
    mats["inp"] = with_bias(ref[("inp", "kernel")], ref[("inp", "bias")])
    mats["head"] = with_bias(ref[("head", "kernel")], ref[("head", "bias")])
    kw = {"batch": BATCH} if with_batch else {}
    lg = jv.LoGra(m, loss, rank=None, init="identity", **kw)
    check(lg, lg.grads(m, BATCH), mats)
    lg = jv.LoGra(m, loss, rank=3, **kw)
    check(lg, lg.grads(m, BATCH), mats)
    # each slice has its own projection
    assert not np.array_equal(np.asarray(lg.projections["blocks/fc/0"][0]), np.asarray(lg.projections["blocks/fc/1"][0]))


class WithLoRA(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.LoRALinear(5, 4, lora_rank=2, rngs=rngs)
        self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.fc(x)))


def test_nnx_lora_adapters_only():
    m = WithLoRA(nnx.Rngs(0))
    m.fc.lora.lora_b[...] = jax.random.normal(jax.random.key(3), (2, 4))   # B = 0 at init: no signal
    loss = lambda m, b: ce(m(b["x"]), b["y"])  # noqa: E731
    ref = nnx_reference(m, loss, BATCH, wrt=nnx.LoRAParam)
    mats = {"fc/lora/lora_a": ref[("fc", "lora", "lora_a")], "fc/lora/lora_b": ref[("fc", "lora", "lora_b")]}
    for kw in ({}, {"batch": BATCH}):
        lg = jv.LoGra(m, loss, rank=None, init="identity", wrt=nnx.LoRAParam, **kw)
        check(lg, lg.grads(m, BATCH), mats)
    lg = jv.LoGra(m, loss, rank=(2, 2), wrt=nnx.LoRAParam)
    check(lg, lg.grads(m, BATCH), mats)


def test_nnx_jit_remat_custom_vjp_products():
    """Products inside jax.jit, jax.checkpoint and a custom_vjp function are found (and differentiated)."""

    @jax.custom_vjp
    def scaled(x, w):
        return x @ w

    scaled.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Param(jax.random.normal(jax.random.key(0), (5, 6)))
            self.b = nnx.Param(jax.random.normal(jax.random.key(1), (6, 4)))
            self.c = nnx.Param(jax.random.normal(jax.random.key(2), (4, 3)))

        def __call__(self, x):
            h = jax.jit(lambda x, a: jnp.tanh(x @ a))(x, self.a[...])
            h = jax.checkpoint(lambda h, b: jnp.tanh(h @ b))(h, self.b[...])
            return scaled(h, self.c[...])

    m = Net(nnx.Rngs(0))
    loss = lambda m, b: ce(m(b["x"]), b["y"])  # noqa: E731
    ref = nnx_reference(m, loss, BATCH)
    mats = {n: ref[(n,)] for n in "abc"}
    lg = jv.LoGra(m, loss, rank=None, init="identity", batch=BATCH)
    check(lg, lg.grads(m, BATCH), mats)


# ----------------------------------------------------------------------------- linen

def test_linen_bridge_to_nnx():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Dense(7, name="hidden")(x))
            return nn.Dense(3, name="out")(h)

    m = nnx.bridge.ToNNX(MLP(), rngs=nnx.Rngs(0)).lazy_init(X)
    loss = lambda m, b: ce(m(b["x"]), b["y"])  # noqa: E731
    # reference from the linen module itself, on the same weights
    params = {"hidden": {k: m.hidden[k][...] for k in ("kernel", "bias")},
              "out": {k: m.out[k][...] for k in ("kernel", "bias")}}
    ref = per_example_grads(params, lambda p, b: ce(MLP().apply({"params": p}, b["x"]), b["y"]), BATCH)
    mats = {n: with_bias(ref[n]["kernel"], ref[n]["bias"]) for n in ("hidden", "out")}
    lg = jv.LoGra(m, loss, rank=None, init="identity", batch=BATCH)
    check(lg, lg.grads(m, BATCH), mats)


def test_linen_function_form_with_nn_scan():
    nn = pytest.importorskip("flax.linen")

    class Cell(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(nn.Dense(5)(h)), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            cells = nn.scan(Cell, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            h, _ = cells(name="cells")(x, None)
            return nn.Dense(3, name="head")(h)

    net = Net()
    params = net.init(jax.random.key(0), X)["params"]
    loss = lambda p, b: ce(net.apply({"params": p}, b["x"]), b["y"])  # noqa: E731
    ref = per_example_grads(params, loss, BATCH)
    k, b = ref["cells"]["Dense_0"]["kernel"], ref["cells"]["Dense_0"]["bias"]
    mats = {f"cells/Dense_0/{i}": with_bias(k[:, i], b[:, i]) for i in range(3)}
    mats["head"] = with_bias(ref["head"]["kernel"], ref["head"]["bias"])
    lg = jv.LoGra(params, loss, rank=None, init="identity", batch=BATCH)
    check(lg, lg.grads(params, BATCH), mats)
    lg = jv.LoGra(params, loss, rank=(3, 2), batch=BATCH)
    check(lg, lg.grads(params, BATCH), mats)


# ----------------------------------------------------------------------------- equinox

def test_equinox_partition():
    eqx = pytest.importorskip("equinox")
    k1, k2 = jax.random.split(jax.random.key(0))
    model = eqx.nn.Sequential([eqx.nn.Linear(5, 7, key=k1), eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(7, 3, key=k2)])
    params, static = eqx.partition(model, eqx.is_array)
    loss = lambda p, b: ce(jax.vmap(eqx.combine(p, static))(b["x"]), b["y"])  # noqa: E731
    ref = per_example_grads(params, loss, BATCH)
    # equinox's weight is (out, in): the layer's matrix is its transpose
    mats = {f"layers/{i}": with_bias(jnp.swapaxes(ref.layers[i].weight, 1, 2), ref.layers[i].bias) for i in (0, 2)}
    lg = jv.LoGra(params, loss, rank=None, init="identity", batch=BATCH)
    check(lg, lg.grads(params, BATCH), mats)
    lg = jv.LoGra(params, loss, rank=3, batch=BATCH)
    check(lg, lg.grads(params, BATCH), mats)


# ----------------------------------------------------------------------------- plain JAX

V, C = 11, 4
TOK = {"tok": jax.random.randint(jax.random.key(4), (3, 6), 0, V)}


def lm_params():
    k = jax.random.split(jax.random.key(0), 2)
    return {"emb": jax.random.normal(k[0], (V, C)), "mix": {"w": jax.random.normal(k[1], (C, C)) / 2,
                                                             "b": jnp.linspace(-1, 1, C)}}


def lm_loss(p, b):
    """Tied embedding head: the table is gathered for the input and multiplied for the logits."""
    h = jnp.tanh(p["emb"][b["tok"]] @ p["mix"]["w"] + p["mix"]["b"])
    lp = jax.nn.log_softmax(h @ p["emb"].T)[:, :-1]
    return -jnp.take_along_axis(lp, b["tok"][:, 1:, None], -1)[..., 0].sum(1)


def test_plain_jax_tied_embedding_head():
    p = lm_params()
    ref = per_example_grads(p, lm_loss, TOK)
    # both uses of the table summed in its gradient; the mix weight's bias is its own leaf
    mats = {"emb": ref["emb"], "mix/w": with_bias(ref["mix"]["w"], ref["mix"]["b"])}
    lg = jv.LoGra(p, lm_loss, rank=None, init="identity", batch=TOK)
    assert {l.name: l.kind for l in lg.layers} == {"emb": "embed", "mix/w": "linear"}
    check(lg, lg.grads(p, TOK), mats)
    lg = jv.LoGra(p, lm_loss, rank=(3, 2), batch=TOK)
    check(lg, lg.grads(p, TOK), mats)
    # the explicit reference of the library agrees
    assert rel_err(lg.grads(p, TOK), explicit(p, lm_loss, lg.projections, TOK)) <= 1e-5


def test_vmap_over_single_examples_inside_loss():
    p = lm_params()

    def loss(p, b):
        def one(tok):   # one sequence [T], no example axis inside
            return lm_loss(p, {"tok": tok[None]})[0]
        return jax.vmap(one)(b["tok"])

    ref = per_example_grads(p, loss, TOK)
    mats = {"emb": ref["emb"], "mix/w": with_bias(ref["mix"]["w"], ref["mix"]["b"])}
    lg = jv.LoGra(p, loss, rank=3, batch=TOK)
    check(lg, lg.grads(p, TOK), mats)


def test_time_major_with_t_equal_b_is_right():
    p = {"w": jax.random.normal(jax.random.key(1), (4, 4))}
    batch = {"x": jax.random.normal(jax.random.key(2), (4, 4, 4))}   # B = T = C = 4

    def loss(p, b):
        h = jnp.swapaxes(b["x"], 0, 1)            # [T, B, C]: the example axis is not first
        return (jnp.tanh(h @ p["w"]) ** 2).sum((0, 2))

    ref = per_example_grads(p, loss, batch)
    lg = jv.LoGra(p, loss, rank=None, init="identity", batch=batch)
    check(lg, lg.grads(p, batch), {"w": ref["w"]})


def test_recurrent_weight_in_scan_is_one_layer():
    p = {"wx": jax.random.normal(jax.random.key(1), (3, 4)), "wh": jax.random.normal(jax.random.key(2), (4, 4)) / 2}
    batch = {"x": jax.random.normal(jax.random.key(3), (5, 7, 3))}   # [B, T, C]

    def loss(p, b):
        def step(h, x):
            h = jnp.tanh(x @ p["wx"] + h @ p["wh"])
            return h, None
        h, _ = jax.lax.scan(step, jnp.zeros((b["x"].shape[0], 4)), jnp.swapaxes(b["x"], 0, 1))
        return (h ** 2).sum(1)

    ref = per_example_grads(p, loss, batch)
    lg = jv.LoGra(p, loss, rank=None, init="identity", batch=batch)
    check(lg, lg.grads(p, batch), {"wx": ref["wx"], "wh": ref["wh"]})


def test_function_form_downstream_logging_and_statistics(tmp_path):
    p = lm_params()
    data = {"tok": jax.random.randint(jax.random.key(9), (10, 6), 0, V)}
    lg = jv.LoGra(p, lm_loss, rank=3, batch=TOK)
    store = jv.log_gradients(lg, p, data, tmp_path / "s", batch_size=4, dtype="float32", progress=False)
    ref = np.asarray(explicit(p, lm_loss, lg.projections, data), np.float64)
    assert rel_err(store.read(), ref) <= 1e-5
    pc = jv.fit_preconditioner(lg, p, data, kind="kfac", batch_size=4, progress=False)
    assert pc.kind == "kfac"


# ----------------------------------------------------------------------------- refused

def test_batch_mean_inside_model_raises():
    p = {"w": jax.random.normal(jax.random.key(1), (5, 4))}

    def loss(p, b):
        h = b["x"] @ p["w"]
        h = h - h.mean(0)                       # a mean over the examples
        return (jnp.tanh(h) ** 2).sum(1)

    with pytest.raises(ValueError, match="examples interact"):
        jv.LoGra(p, loss, rank=2, batch=BATCH)


def test_examples_mixed_without_a_reduction_raise_at_the_first_batch():
    """Reversing the batch mixes examples without any reduction: the first batch's check refuses it."""
    p = {"w": jax.random.normal(jax.random.key(1), (5, 4))}

    def loss(p, b):
        h = jnp.tanh(b["x"] @ p["w"])
        return (h * h[::-1]).sum(1)

    lg = jv.LoGra(p, loss, rank=2, batch=BATCH)
    with pytest.raises(ValueError, match="examples interact"):
        lg.grads(p, BATCH)


def test_active_dropout_raises_and_eval_mode_works():
    class Drop(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(5, 3, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.fc(x))

    m = Drop(nnx.Rngs(0))
    loss = lambda m, b: ce(m(b["x"]), b["y"])  # noqa: E731
    lg = jv.LoGra(m, loss, rank=2)
    with pytest.raises(ValueError, match=r"random numbers.*model\.eval\(\)"):
        lg.grads(m, BATCH)
    m.eval()
    assert lg.grads(m, BATCH).shape == (6, lg.dim)


def test_parameter_used_outside_products_is_named():
    p = {"w": jax.random.normal(jax.random.key(1), (5, 3)), "scale": jnp.ones(3)}

    def loss(p, b):     # weight decay inside the per-example loss: its gradient is not a product
        return ce(b["x"] @ p["w"] * p["scale"], b["y"]) + 1e-2 * (p["w"] ** 2).sum()

    with pytest.raises(ValueError, match=r"'w'.*integer_pow"):
        jv.LoGra(p, loss, rank=2, batch=BATCH)


def test_untracked_parameters_named_in_one_warning():
    p = {"w": jax.random.normal(jax.random.key(1), (5, 3)), "scale": jnp.ones(3)}
    loss = lambda p, b: ce(b["x"] @ p["w"] * p["scale"], b["y"])  # noqa: E731
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lg = jv.LoGra(p, loss, rank=2, batch=BATCH)
    msgs = [str(x.message) for x in w if "not tracked" in str(x.message)]
    assert len(msgs) == 1 and "scale" in msgs[0]
    assert [l.name for l in lg.layers] == ["w"]


def test_function_form_needs_a_batch():
    with pytest.raises(ValueError, match="batch="):
        jv.LoGra({"w": jnp.ones((2, 2))}, lambda p, b: b @ p["w"], rank=2)


def test_size_one_output_axes_keep_their_bias():
    """A reshape of a bias with a size-1 axis loses which axis it was (nnx.Linear to 1 output, one attention
    head): the layer still gets its bias and its rows equal the projected vmap(grad) reference."""
    from jaxval.models import gpt

    cfg = gpt.GPTConfig(vocab_size=16, block_size=8, d_model=8, n_layer=1, n_head=1, d_mlp=16)
    model = gpt.GPT(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 16, (4, 8)).astype(np.int32), "mask": np.ones((4, 8), np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # LayerNorm scales are not LoGra layers
        logra = jv.LoGra(model, gpt.loss_fn, rank=4, seed=0)
        got = np.asarray(logra.grads(model, batch))
        ref = np.asarray(explicit(model, gpt.loss_fn, logra.projections, batch))
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
