"""The provenance hashes cached on a LoGra follow the weights: a new set of parameter arrays (an update, an
in-place assignment) gives a new fingerprint, equal to a fresh sha256 of the bytes."""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxval as jv


def _sha(model) -> str:
    """Independent reference: sha256 over (path, shape, dtype) and the bytes of every nnx.Param, in order."""
    h = hashlib.sha256()
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        a = np.asarray(v[...])
        h.update(json.dumps([list(map(str, path)), list(a.shape), str(a.dtype)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _setup():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

    def loss(m, b):
        return jnp.sum((m(b["x"]) - b["y"]) ** 2, axis=-1)

    return model, jv.LoGra(model, loss, rank=2)


def test_fingerprint_follows_the_weights():
    model, logra = _setup()
    fp0 = jv.Provenance.of(logra, model).fingerprint
    k0 = np.asarray(model.kernel[...])
    assert fp0 == _sha(model) == jv.model_fingerprint(model)
    assert jv.Provenance.of(logra, model).fingerprint == fp0          # cached, same arrays
    model.kernel[...] = model.kernel[...] + 1.0                        # new array in the same Param
    fp1 = jv.Provenance.of(logra, model).fingerprint
    assert fp1 != fp0 and fp1 == _sha(model)
    model.kernel[...] = jnp.asarray(k0)                                # the old values again, a new array object
    assert jv.Provenance.of(logra, model).fingerprint == fp0


def test_config_hash_follows_the_projections():
    model, logra = _setup()
    h0 = logra.config_hash()
    assert h0 == jv.Provenance.of(logra).config_hash
    name = logra.layers[0].name
    p_in, p_out = logra.projections[name]
    logra.projections[name] = (p_in * 2.0, p_out)
    assert logra.config_hash() != h0
    other = jv.LoGra(model, lambda m, b: jnp.sum(m(b["x"]), -1), rank=2)   # same config, another object
    assert other.config_hash() == h0


def test_two_loggras_do_not_share_a_cache():
    model, a = _setup()
    _, b = _setup()
    fa = a.fingerprint(model)
    model.bias[...] = jnp.ones_like(model.bias[...])
    assert b.fingerprint(model) == _sha(model) != fa
    assert a.fingerprint(model) == _sha(model)
    assert isinstance(jax.tree_util.tree_leaves(nnx.state(model))[0], jax.Array)
