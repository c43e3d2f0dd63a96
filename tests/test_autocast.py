"""LoGra with compute_dtype="bfloat16" (jaxval.autocast) against float64 / float32 references."""

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import jaxval as jv
from jaxval._src import autocast
from jaxval.models import llama, token_mlp
from conftest import explicit

warnings.filterwarnings("ignore", message="jaxval: parameters")


def _bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def test_matmul_and_its_vjp_are_products_of_bf16_rounded_operands():
    """Forward: bf16(x) · bf16(w) accumulated in float32; backward: dx = bf16(ct) · bf16(w)ᵀ; no weight
    gradient (zero). Checked against float64 products of the rounded operands."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 40)).astype(np.float32)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    ct = rng.standard_normal((3, 5, 24)).astype(np.float32)
    y, vjp = jax.vjp(lambda x, w: autocast.matmul(x, w, "bfloat16"), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(ct))
    assert y.dtype == jnp.float32 and dx.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), _bf16(x) @ _bf16(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), _bf16(ct) @ _bf16(w).T, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(dw))
    # and they differ from the float32 product by bf16 rounding, not more
    assert 1e-4 < np.max(np.abs(np.asarray(y) - x @ w)) / np.max(np.abs(x @ w)) < 2e-2


def _token_model():
    m = token_mlp.TokenMLP(61, 32, 2, 48, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    batch = {"tokens": jnp.asarray(rng.integers(0, 61, (6, 12), dtype=np.int32)),
             "mask": jnp.ones((6, 12), jnp.float32)}
    return m, token_mlp.loss_fn, batch


def _tiny_llama():
    m = llama.Llama(llama.tiny_config(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    batch = {"tokens": jnp.asarray(rng.integers(0, 97, (5, 10), dtype=np.int32)),
             "mask": jnp.ones((5, 10), jnp.float32)}
    return m, llama.loss_fn, batch


@pytest.mark.parametrize("make,layers", [(_token_model, None), (_tiny_llama, "mlp"), (_tiny_llama, None)])
def test_bf16_logra_close_to_float32_gradients(make, layers):
    """Per-example gradients from bf16 products agree with explicit float32 vmap(grad) gradients (projected)
    to bf16 accuracy: every example's cosine > 0.999 and relative error < 3e-2; the float32 path stays
    exact (1e-5). The tiny Llama has a tied head (Embed.attend) and untracked attention projections."""
    m, loss_fn, batch = make()
    kw = dict(rank=8, layers=layers, types=(nnx.Linear,))
    lg32 = jv.LoGra(m, loss_fn, **kw)
    lg16 = jv.LoGra(m, loss_fn, compute_dtype="bfloat16", **kw)
    ref = np.asarray(explicit(m, loss_fn, lg32.projections, batch), np.float64)
    g32 = np.asarray(lg32.grads(m, batch), np.float64)
    g16 = np.asarray(lg16.grads(m, batch), np.float64)
    assert np.max(np.abs(g32 - ref)) / np.max(np.abs(ref)) < 1e-5
    rel = np.linalg.norm(g16 - ref, axis=1) / np.linalg.norm(ref, axis=1)
    cos = np.sum(g16 * ref, 1) / np.linalg.norm(g16, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 3e-2 and cos.min() > 0.999, (rel.max(), cos.min())
    assert rel.min() > 1e-5                 # bf16 products really ran (not silently float32)
    losses32 = lg32.grads_and_losses(m, batch)[1]
    losses16 = lg16.grads_and_losses(m, batch)[1]
    np.testing.assert_allclose(np.asarray(losses16), np.asarray(losses32), rtol=2e-2)


def test_precast_kernels_give_identical_results_and_are_reused():
    m, loss_fn, batch = _token_model()
    lg = jv.LoGra(m, loss_fn, rank=8, types=(nnx.Linear,), compute_dtype="bfloat16")
    graphdef, state = nnx.split(m)
    step = lg.compiled_step(graphdef)
    a = np.asarray(step(state, batch, lg.projections)[0])                 # kernels converted in the step
    cast = lg.step_state(m, state)
    kinds = {tuple(p): v.get_value().dtype for p, v in nnx.to_flat_state(cast)}
    assert kinds[("head", "kernel")] == jnp.bfloat16 and kinds[("embed", "embedding")] == jnp.float32
    assert kinds[("head", "bias")] == jnp.float32
    b = np.asarray(step(cast, batch, lg.projections)[0])
    np.testing.assert_array_equal(a, b)
    assert lg.step_state(m, state) is cast                                   # same weights: reused
    assert lg.step_state(m, nnx.split(m)[1]) is cast                         # re-split, same arrays


def test_config_and_log_gradients_record_compute_dtype(tmp_path):
    m, loss_fn, batch = _token_model()
    lg32 = jv.LoGra(m, loss_fn, rank=4, types=(nnx.Linear,))
    lg16 = jv.LoGra(m, loss_fn, rank=4, types=(nnx.Linear,), compute_dtype="bfloat16")
    assert "compute_dtype" not in lg32.config() and lg16.config()["compute_dtype"] == "bfloat16"
    assert jv.LoGra(m, loss_fn, rank=4, types=(nnx.Linear,), compute_dtype="float32").compute_dtype is None
    data = {k: np.asarray(v) for k, v in batch.items()}
    store = jv.log_gradients(lg16, m, data, tmp_path / "s", batch_size=2, progress=False)
    np.testing.assert_allclose(store.read(0, 6), np.asarray(lg16.grads(m, batch)).astype(ml_dtypes.bfloat16)
                               .astype(np.float32), rtol=1e-2, atol=1e-6)
    with pytest.raises(jv.StoreError):       # a float32-compute log is another configuration
        jv.log_gradients(lg32, m, data, tmp_path / "s", batch_size=2, progress=False)


def test_bad_compute_dtype():
    m, loss_fn, _ = _token_model()
    with pytest.raises(ValueError, match="compute_dtype"):
        jv.LoGra(m, loss_fn, rank=4, compute_dtype="float16")
