"""The LoGra fast path, as compiled by XLA, contains no weight-gradient matrix products.

A weight gradient of a Linear layer W [n_in, n_out] is a product contracting over the tokens whose result
has W's shape. We compile (a) LoGra's jitted step and (b) the jitted training step of a small token model
with pairwise distinct sizes, and scan the optimised HLO for dot / matmul custom-call results of shape
[n_in, n_out] or [n_out, n_in]: (b) must have them (the check can see them), (a) must have none.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxval as jv
from jaxval.models import token_mlp
from jaxval._src.train import train_step_fn

VOCAB, D, HIDDEN, B, T, RANK = 56, 24, 40, 3, 10, 4

_RESULT = re.compile(r"=\s*(?:\(?)(f32|bf16|f16|f64)\[([0-9,]*)\]\{[^}]*\}\s*(dot|custom-call)\(")


def matmul_shapes(hlo_text: str) -> list[tuple[int, ...]]:
    """Result shapes of every dot and matmul-like custom-call in an HLO module's text."""
    out = []
    for line in hlo_text.splitlines():
        m = _RESULT.search(line)
        if not m:
            continue
        if m.group(3) == "custom-call" and "matmul" not in line.lower() and "dot" not in line.lower():
            continue
        out.append(tuple(int(s) for s in m.group(2).split(",") if s))
    return out


def weight_shapes(model) -> set[tuple[int, int]]:
    shapes = set()
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Linear):
            a, b = m.kernel[...].shape
            shapes |= {(a, b), (b, a), (a + 1, b), (b, a + 1)}
    return shapes


@pytest.fixture(scope="module")
def setup():
    model = token_mlp.TokenMLP(VOCAB, D, 2, HIDDEN, rngs=nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, token_mlp.random_batch(B, T, VOCAB, seed=0))
    return model, batch


def test_train_step_has_weight_gradient_products(setup):
    model, batch = setup
    step = train_step_fn(model, token_mlp.loss_fn)
    hlo = step.lower(nnx.state(model), batch).compile().as_text()
    found = [s for s in matmul_shapes(hlo) if s in weight_shapes(model)]
    assert found, "the check cannot see weight-gradient products in a training step"


@pytest.mark.parametrize("types,traced", [(None, False), ((nnx.Linear,), False), (None, True)])
def test_logra_step_has_no_weight_gradient_products(setup, types, traced):
    """``traced``: layers from the traced computation (``batch=``) rather than the module types."""
    model, batch = setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logra = jv.LoGra(model, token_mlp.loss_fn, rank=RANK, types=types, **({"batch": batch} if traced else {}))
    graphdef, state = nnx.split(model)
    hlo = logra.compiled_step(graphdef).lower(state, batch, logra.projections).compile().as_text()
    shapes = matmul_shapes(hlo)
    assert shapes, "no matrix products found: the HLO scan is broken"
    bad = [s for s in shapes if s in weight_shapes(model)]
    assert not bad, f"LoGra's compiled step computes weight-gradient-shaped products: {bad}"
