"""Repeated scoring calls compile nothing, and the training self-influence kept between calls is never
served for other rows, another preconditioner or another damping (a stale value is a wrong score that
looks right). References: float64 numpy with the explicit matrix H⁻¹ of a K-FAC-form preconditioner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxval as jv
from conftest import CompileCounter
from jaxval._src.scoring import memo
from jaxval._src.scoring.groups import selectors_key
from jaxval._src.scoring.kernels import PreconditionerSpec
from jaxval._src.scoring.sources import TrainRows

SHAPES = ((4, 3), (2, 5))          # two "layers": D = 12 + 10
D = sum(a * b for a, b in SHAPES)
Q, N = 6, 41


def make_pc(seed=0, damping=0.1):
    """A kfac-kind jv.Preconditioner with random orthogonal bases and positive eigenvalues."""
    rng = np.random.default_rng(seed)
    factors = {}
    for i, (ki, ko) in enumerate(SHAPES):
        qa = np.linalg.qr(rng.standard_normal((ki, ki)))[0].astype(np.float32)
        qs = np.linalg.qr(rng.standard_normal((ko, ko)))[0].astype(np.float32)
        factors[f"l{i}"] = {"QA": qa, "QS": qs, "L": rng.uniform(0.2, 3.0, (ki, ko)).astype(np.float32)}
    names = tuple(factors)
    return jv.Preconditioner("kfac", names, SHAPES, factors, {n: damping for n in names}, {})


def h_inverse(pc) -> np.ndarray:
    """The dense float64 H⁻¹ of ``pc`` (block diagonal; block = Q diag(1/(L+λ)) Qᵀ, Q = Q_A ⊗ Q_S)."""
    out = np.zeros((D, D))
    o = 0
    for name, (ki, ko) in zip(pc.names, pc.shapes):
        f = {k: np.asarray(v, np.float64) for k, v in pc.factors[name].items()}
        qk = np.kron(f["QA"], f["QS"])  # row-major vec of a (k_in, k_out) block
        inv = qk @ np.diag(1.0 / (f["L"].ravel() + float(pc.damping[name]))) @ qk.T
        out[o:o + ki * ko, o:o + ki * ko] = inv
        o += ki * ko
    return out


def reference(q, z, hinv, mode):
    q, z = np.asarray(q, np.float64), np.asarray(z, np.float64)
    s = q @ hinv @ z.T
    qs, zs = np.einsum("qd,de,qe->q", q, hinv, q), np.einsum("nd,de,ne->n", z, hinv, z)
    return {"dot": s, "cosine": s / np.sqrt(qs)[:, None] / np.sqrt(zs)[None, :],
            "relative": s / np.sqrt(zs)[None, :], "l2": s - 0.5 * zs[None, :]}[mode]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture()
def rows():
    rng = np.random.default_rng(1)
    return rng.standard_normal((N, D)).astype(np.float32)


def test_counter_sees_compilations():
    with CompileCounter() as c:
        jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(7))
    assert c.n >= 1


def test_preconditioner_is_a_pytree_and_jit_caches_by_structure(rows):
    pc = make_pc()
    leaves, treedef = jax.tree_util.tree_flatten(pc)
    assert len(leaves) == 3 * 2 + 2 and jax.tree_util.tree_unflatten(treedef, leaves).names == pc.names
    f = jax.jit(lambda p, g: p.apply(g))
    g = jnp.asarray(rows[:8])
    before = [np.asarray(x).copy() for x in leaves]
    for p in (pc, pc.with_damping(damping=2.0), make_pc(seed=5, damping=0.3)):
        assert rel(f(p, g), np.asarray(rows[:8], np.float64) @ h_inverse(p).T) < 1e-5
        assert rel(p.apply(g), np.asarray(rows[:8], np.float64) @ h_inverse(p).T) < 1e-5
    assert f._cache_size() == 1                   # other damping / other arrays: same compiled code
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree_util.tree_leaves(pc)))
    assert pc.damping["l0"] == 0.1 and isinstance(pc.damping["l0"], np.float64)


def test_save_load_round_trip_keeps_the_structure(tmp_path, rows):
    pc = make_pc()
    pc.save(str(tmp_path / "pc"))
    back = jv.Preconditioner.load(str(tmp_path / "pc"))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(pc)
    np.testing.assert_array_equal(np.asarray(back.apply(rows)), np.asarray(pc.apply(rows)))


@pytest.mark.parametrize("on_device", [True, False])
def test_repeated_calls_compile_nothing(rows, on_device):
    pc = make_pc()
    train = jnp.asarray(rows) if on_device else rows
    rng = np.random.default_rng(2)
    calls = {
        "dot": lambda q, p: jv.influence(q, train, precond=p, mode="dot"),
        "cosine": lambda q, p: jv.influence(q, train, precond=p, mode="cosine"),
        "top_k": lambda q, p: jv.top_k(q, train, 5, precond=p, mode="dot")[0],
        "self": lambda q, p: jv.self_influence(train, p),
    }
    for call in calls.values():                   # first calls: compile
        call(rng.standard_normal((Q, D)).astype(np.float32), pc)
    queries = [rng.standard_normal((Q, D)).astype(np.float32) for _ in range(3)]
    other = pc.with_damping(damping=0.7)
    with CompileCounter() as c:
        for q in queries:                         # fresh query values of the same shape
            for p in (pc, other):
                out = {name: call(q, p) for name, call in calls.items()}
                hinv = h_inverse(p)
                assert rel(out["dot"], reference(q, rows, hinv, "dot")) < 1e-5
                assert rel(out["cosine"], reference(q, rows, hinv, "cosine")) < 1e-5
    assert c.n == 0, f"{c.n} compilations in repeated calls"


def test_cached_self_influence_never_stale(rows):
    memo.clear()
    rng = np.random.default_rng(3)
    q = rng.standard_normal((Q, D)).astype(np.float32)
    z = jnp.asarray(rows)
    pc = make_pc()
    variants = [pc, pc.with_damping(damping=2.0), make_pc(seed=9), None]
    for _ in range(2):                            # the second round is served from the cache
        for p in variants:
            hinv = np.eye(D) if p is None else h_inverse(p)
            for mode in ("cosine", "relative", "l2"):
                assert rel(jv.influence(q, z, precond=p, mode=mode), reference(q, rows, hinv, mode)) < 1e-5
            v, i = jv.top_k(q, z, 4, precond=p, mode="l2")
            ref = reference(q, rows, hinv, "l2")
            np.testing.assert_array_equal(i, np.argsort(-ref, 1, kind="stable")[:, :4])
    # other rows with the same values, shapes or ids: computed for themselves
    z2 = jnp.asarray(rows[::-1].copy())
    assert rel(jv.influence(q, z2, precond=pc, mode="cosine"), reference(q, rows[::-1], h_inverse(pc), "cosine")) < 1e-5
    # groups: a cached full-width value is not served for a group
    g = jv.influence(q, z, precond=pc, mode="l2", groups={"l1": slice(12, D)})["l1"]
    assert rel(g, reference(q[:, 12:], rows[:, 12:], h_inverse(pc)[12:, 12:], "l2")) < 1e-5


def test_cache_is_really_used_and_only_for_immutable_inputs(rows):
    memo.clear()
    q = np.random.default_rng(4).standard_normal((Q, D)).astype(np.float32)
    z = jnp.asarray(rows)
    pc = make_pc()
    jv.influence(q, z, precond=pc, mode="cosine")
    ident = memo.identify(TrainRows(z), PreconditionerSpec(pc, D), selectors_key([slice(None)]))
    cached = memo.lookup(ident)
    assert cached is not None and rel(cached[0], np.einsum("nd,de,ne->n", rows, h_inverse(pc), rows)) < 1e-5
    assert not cached[0].flags.writeable
    # poison the entry: the next call must use it (a zero self-influence gives a cosine of 0)
    memo.remember(ident, [np.zeros(N, np.float32)])
    assert np.all(jv.influence(q, z, precond=pc, mode="cosine") == 0)
    # ... but another damping, another preconditioner and other rows are not served it
    for p in (pc.with_damping(damping=0.5), make_pc(seed=1)):
        assert memo.lookup(memo.identify(TrainRows(z), PreconditionerSpec(p, D), selectors_key([slice(None)]))) is None
        assert rel(jv.influence(q, z, precond=p, mode="cosine"), reference(q, rows, h_inverse(p), "cosine")) < 1e-5
    memo.clear()
    # numpy rows are mutable: never cached, so an in-place change is always seen
    zn = rows.copy()
    assert memo.identify(TrainRows(zn), PreconditionerSpec(pc, D), selectors_key([slice(None)])) is None
    jv.influence(q, zn, precond=pc, mode="l2")
    zn *= 3.0
    assert rel(jv.influence(q, zn, precond=pc, mode="l2"), reference(q, zn, h_inverse(pc), "l2")) < 1e-5
    # a preconditioner with a numpy-array leaf, or any non-pytree object: never cached
    class Closure:
        def __init__(self, m):
            self.m = m

        def apply(self, g):
            return g @ self.m

    c = Closure(jnp.asarray(h_inverse(pc), jnp.float32))
    assert memo.identify(TrainRows(z), PreconditionerSpec(c, D), selectors_key([slice(None)])) is None
    jv.influence(q, z, precond=c, mode="cosine")
    c.m = jnp.asarray(2 * h_inverse(pc), jnp.float32)  # mutated between calls: the new H is used
    assert rel(jv.influence(q, z, precond=c, mode="l2"), reference(q, rows, 2 * h_inverse(pc), "l2")) < 1e-5


def test_complete_store_cached_recreated_store_not_stale(rows, tmp_path):
    from jaxval import GradientStore

    memo.clear()
    q = np.random.default_rng(6).standard_normal((Q, D)).astype(np.float32)
    pc = make_pc()
    path = tmp_path / "s"
    s = GradientStore.create(path, dim=D, num_rows=N, dtype="float32", chunk_rows=8)
    s.write(0, rows[:20], mark_done=True)        # incomplete: not cached
    assert memo.identify(TrainRows(s), PreconditionerSpec(pc, D), selectors_key([slice(None)])) is None
    s.write(20, rows[20:], mark_done=True)
    assert rel(jv.influence(q, s, precond=pc, mode="cosine"), reference(q, rows, h_inverse(pc), "cosine")) < 1e-5
    assert memo.lookup(memo.identify(TrainRows(s), PreconditionerSpec(pc, D), selectors_key([slice(None)])))
    other = 2.0 * rows[::-1]
    s2 = GradientStore.create(path, dim=D, num_rows=N, dtype="float32", chunk_rows=8, overwrite=True)
    s2.write(0, other, mark_done=True)
    assert rel(jv.influence(q, s2, precond=pc, mode="l2"), reference(q, other, h_inverse(pc), "l2")) < 1e-5
    # rows of a complete store rewritten in place (same manifest): not served the old value
    s2.write(0, rows, mark_done=True)
    assert rel(jv.influence(q, s2, precond=pc, mode="cosine"), reference(q, rows, h_inverse(pc), "cosine")) < 1e-5
    assert rel(jv.self_influence(s2, pc), np.einsum("nd,de,ne->n", rows, h_inverse(pc), rows)) < 1e-5


class Tracable:
    def apply(self, g):
        return 2.0 * g


class NotTraceable:
    def apply(self, g):
        return np.asarray(g) * 2.0


class Broken:
    def apply(self, g):
        raise RuntimeError("bug inside apply")


class WrongShape:
    def apply(self, g):
        return g[:, :3]


def test_preconditioner_classification(rows):
    assert PreconditionerSpec(None, D).kind == "identity"
    assert PreconditionerSpec(make_pc(), D).kind == "pytree"
    assert PreconditionerSpec(Tracable(), D).kind == "closure"
    assert PreconditionerSpec(NotTraceable(), D).kind == "eager"
    q = rows[:3]
    for p in (Tracable(), NotTraceable()):
        assert rel(jv.influence(q, rows, precond=p), 2.0 * q.astype(np.float64) @ rows.T.astype(np.float64)) < 1e-6
    with pytest.raises(RuntimeError, match="bug inside apply"):   # not swallowed into the eager path
        jv.influence(q, rows, precond=Broken())
    with pytest.raises(ValueError, match="shape"):
        jv.influence(q, rows, precond=WrongShape())
    with pytest.raises(TypeError, match="apply"):
        jv.influence(q, rows, precond=np.eye(D))


def test_disk_cached_self_influence_follows_rows_rewritten_in_place(rows, tmp_path):
    from jaxval import GradientStore

    pc = make_pc()
    s = GradientStore.create(tmp_path / "s", dim=D, num_rows=N, dtype="float32", chunk_rows=8)
    s.write(0, rows, mark_done=True)
    a = jv.cached_self_influence(s, pc, key="k")
    assert rel(a, np.einsum("nd,de,ne->n", rows, h_inverse(pc), rows)) < 1e-5
    s.write(0, 3.0 * rows, mark_done=True)        # same manifest, other rows
    b = jv.cached_self_influence(GradientStore.open(tmp_path / "s"), pc, key="k")
    assert rel(b, 9.0 * a) < 1e-5
    # the same key for another damping: recomputed, not served
    c = jv.cached_self_influence(s, pc.with_damping(damping=5.0), key="k")
    assert rel(c, 9.0 * np.einsum("nd,de,ne->n", rows, h_inverse(pc.with_damping(damping=5.0)), rows)) < 1e-5
