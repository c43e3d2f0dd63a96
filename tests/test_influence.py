"""Tests of the scoring engine (jaxval.influence) against float64 numpy references."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxval.distributed import xla_flags
from jaxval._src import scoring as inf
from jaxval._src.scoring.kernels import bf16_parts
from jaxval._src.scoring.sources import TrainRows
from conftest import SolvePrecond, influence_reference as reference, spd

Q, N, D = 5, 37, 12  # N is prime: no block size below N divides it


class NumpyPrecond:
    """H⁻¹ g with numpy (conftest.SolvePrecond's solve, not traceable under jit: exercises the eager path)."""

    def __init__(self, H):
        self.H = np.asarray(H, np.float64)

    def apply(self, g):
        return np.linalg.solve(self.H, np.asarray(g, np.float64).T).T.astype(np.float32)


class FakeStore:
    """Minimal store: __len__, .dim, .read(start, stop); records reads."""

    def __init__(self, data, path=None):
        self._data = np.asarray(data, np.float32)
        self.dim = self._data.shape[1]
        self.path = path
        self.reads = []

    def __len__(self):
        return self._data.shape[0]

    def read(self, start, stop):
        self.reads.append((start, stop))
        return self._data[start:stop].copy()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((Q, D)).astype(np.float32)
    z = rng.standard_normal((N, D)).astype(np.float32)
    H = spd(D, 1)
    return q, z, H


def assert_rel(actual, expected, tol=1e-5):
    actual = np.asarray(actual, np.float64)
    err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert err <= tol, f"max relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("mode", inf.MODES)
@pytest.mark.parametrize("use_h", [False, True])
def test_modes_match_float64_reference(data, mode, use_h):
    q, z, H = data
    pc = SolvePrecond(H) if use_h else None
    out = inf.influence(q, z, precond=pc, mode=mode, block_rows=8)
    assert out.shape == (Q, N) and out.dtype == np.float32
    assert_rel(out, reference(q, z, H if use_h else None, mode))


def test_non_traceable_precond_eager_path(data):
    q, z, H = data
    pc = NumpyPrecond(H)
    for mode in ("dot", "cosine", "l2"):
        assert_rel(inf.influence(q, z, precond=pc, mode=mode, block_rows=10), reference(q, z, H, mode))
    assert_rel(inf.self_influence(z, pc, block_rows=10), np.diag(reference(z, z, H)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PytreePrecond:
    """A preconditioner that is a pytree of arrays: passed to cached kernels as an argument."""

    Hinv: jax.Array

    def apply(self, g):
        return g @ self.Hinv.T


def test_pytree_precond_kernels_cached_not_stale(data):
    q, z, H = data
    H2 = spd(D, 7)
    compiles = []
    listener = lambda name, *a, **k: compiles.append(name) if name.endswith("backend_compile_duration") else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for h in (H, H2):  # same structure, other arrays: reuses the compiled kernels, sees the new H
            pc = PytreePrecond(jnp.asarray(np.linalg.inv(h), jnp.float32))
            for mode in ("dot", "cosine"):
                assert_rel(inf.influence(q, z, precond=pc, mode=mode, block_rows=16), reference(q, z, h, mode))
            v, i = inf.top_k(q, z, 3, precond=pc, mode="l2", block_rows=16)
            np.testing.assert_array_equal(i, np.argsort(-reference(q, z, h, "l2"), axis=1, kind="stable")[:, :3])
            np.testing.assert_allclose(inf.self_influence(z, pc), np.diag(reference(z, z, h)), rtol=1e-5)
            if h is H:
                n_first = len(compiles)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert n_first > 0 and len(compiles) == n_first  # the second preconditioner compiled nothing


def test_cosine_bounded_and_zero_rows(data):
    q, z, H = data
    z = z.copy()
    z[3] = 0.0  # zero gradient: cosine / relative are defined as 0, not nan
    for mode in ("cosine", "relative"):
        out = inf.influence(q, z, precond=SolvePrecond(H), mode=mode)
        assert np.all(np.isfinite(out)) and np.all(out[:, 3] == 0)
    cos = inf.influence(q, z, precond=SolvePrecond(H), mode="cosine")
    assert np.all(np.abs(cos) <= 1 + 1e-6)


@pytest.mark.parametrize("block_rows", [1, 5, 7, 36, 37, 100, None])
def test_block_sizes(data, block_rows):
    q, z, H = data
    out = inf.influence(q, z, precond=SolvePrecond(H), mode="l2", block_rows=block_rows, prefetch=1)
    assert_rel(out, reference(q, z, H, "l2"))


def test_self_influence_is_diagonal_of_full_matrix(data):
    _, z, H = data
    pc = SolvePrecond(H)
    full = inf.influence(z, z, precond=pc, mode="dot", block_rows=6)
    si = inf.self_influence(z, pc, block_rows=6)
    assert si.shape == (N,) and si.dtype == np.float32
    np.testing.assert_allclose(si, np.diag(full), rtol=1e-5)
    assert_rel(si, np.diag(reference(z, z, H)))
    # identity precond: squared norms
    np.testing.assert_allclose(inf.self_influence(z), (z.astype(np.float64) ** 2).sum(1), rtol=1e-5)


def test_given_self_influence_is_used(data):
    q, z, H = data
    pc = SolvePrecond(H)
    si = inf.self_influence(z, pc)
    for mode in ("cosine", "relative", "l2"):
        a = inf.influence(q, z, precond=pc, mode=mode, block_rows=9)
        b = inf.influence(q, z, precond=pc, mode=mode, block_rows=9, self_influence=si)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the given values really are used (not recomputed)
    b = inf.influence(q, z, mode="l2", self_influence=np.zeros(N, np.float32))
    assert_rel(b, reference(q, z, None, "dot"))
    with pytest.raises(ValueError, match="shape"):
        inf.influence(q, z, mode="l2", self_influence=np.zeros(N - 1))


def test_store_and_jax_inputs(data):
    q, z, H = data
    pc = SolvePrecond(H)
    ref = inf.influence(q, z, precond=pc, mode="cosine", block_rows=8)
    store = FakeStore(z)
    out = inf.influence(q, store, precond=pc, mode="cosine", block_rows=8)
    np.testing.assert_array_equal(out, ref)
    # streamed once, in order, covering every row exactly once
    assert store.reads == [(s, min(s + 8, N)) for s in range(0, N, 8)]
    out = inf.influence(jnp.asarray(q), jnp.asarray(z), precond=pc, mode="cosine", block_rows=8)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    # memmap on disk
    v, i = inf.top_k(q, store, 4, precond=pc, block_rows=8)
    v2, i2 = inf.top_k(q, z, 4, precond=pc, block_rows=8)
    np.testing.assert_array_equal(i, i2)


class IterStore(FakeStore):
    """A store with its own iter_blocks (used by default instead of read)."""

    def __init__(self, data, step=None):
        super().__init__(data)
        self.step = step
        self.iterated = 0

    def iter_blocks(self, block_rows):
        step = self.step or block_rows
        for s in range(0, len(self), step):
            self.iterated += 1
            yield s, self._data[s:s + step].copy()


def test_store_iter_blocks_and_prefetch_thread(data):
    q, z, H = data
    pc = SolvePrecond(H)
    ref = reference(q, z, H, "relative")
    st = IterStore(z)
    assert_rel(inf.influence(q, st, precond=pc, mode="relative", block_rows=8), ref)
    assert st.iterated == 5 and st.reads == []
    for prefetch in (0, 1, 3):  # 0: plain read; k > 0: background thread
        st = IterStore(z)
        assert_rel(inf.influence(q, st, precond=pc, mode="relative", block_rows=8, prefetch=prefetch), ref)
        assert st.iterated == 0 and len(st.reads) == 5
    with pytest.raises(ValueError, match="iter_blocks"):
        inf.influence(q, IterStore(z, step=5), block_rows=8)


def test_memmap_input(data, tmp_path):
    q, z, _ = data
    mm = np.memmap(tmp_path / "g.f32", dtype=np.float32, mode="w+", shape=z.shape)
    mm[:] = z
    mm.flush()
    mm = np.memmap(tmp_path / "g.f32", dtype=np.float32, mode="r", shape=z.shape)
    assert_rel(inf.influence(q, mm, block_rows=10), reference(q, z))


def _ties_data():
    rng = np.random.default_rng(3)
    # small integers: every score is exact in float32, so equal rows give exactly equal scores
    q = rng.integers(-2, 3, size=(Q, D)).astype(np.float32)
    z = rng.integers(-2, 3, size=(N, D)).astype(np.float32)
    z[20] = z[2]  # duplicates across block boundaries
    z[33] = z[2]
    z[11] = z[30]
    z[7] = 0.0
    z[8] = 0.0  # many exact-zero scores (and -0.0 vs 0.0)
    z[25] = -z[2] * 0.0
    return q, z


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("k", [1, 6, 37])
def test_top_k_matches_stable_argsort(largest, k):
    q, z = _ties_data()
    S = q.astype(np.float64) @ z.T.astype(np.float64)
    assert len(np.unique(S[0])) < N  # there really are ties
    order = np.argsort(-S if largest else S, axis=1, kind="stable")[:, :k]
    v, i = inf.top_k(q, z, k, largest=largest, block_rows=8)
    assert v.shape == (Q, k) and v.dtype == np.float32 and i.dtype == np.int64
    np.testing.assert_array_equal(i, order)
    np.testing.assert_array_equal(v, np.take_along_axis(S, order, axis=1).astype(np.float32))


@pytest.mark.parametrize("mode", ["cosine", "l2"])
def test_top_k_modes_with_precond(data, mode):
    q, z, H = data
    pc = SolvePrecond(H)
    S = reference(q, z, H, mode)
    for largest in (True, False):
        v, i = inf.top_k(q, z, 5, precond=pc, mode=mode, largest=largest, block_rows=3)  # k > block_rows
        order = np.argsort(-S if largest else S, axis=1, kind="stable")[:, :5]
        np.testing.assert_array_equal(i, order)
        assert_rel(v, np.take_along_axis(S, order, axis=1))


def test_top_k_bad_k(data):
    q, z, _ = data
    with pytest.raises(ValueError, match="k must be"):
        inf.top_k(q, z, N + 1)
    with pytest.raises(ValueError, match="k must be"):
        inf.top_k(q, z, 0)


def test_groups_sum_to_total_dot_identity(data):
    q, z, _ = data
    groups = {
        "attn": slice(0, 4),
        "mlp": np.array([4, 6, 8, 10, 5]),
        "rest": np.isin(np.arange(D), [7, 9, 11]),
    }
    out = inf.influence(q, FakeStore(z), groups=groups, block_rows=10)
    assert set(out) == set(groups)
    total = inf.influence(q, z)
    np.testing.assert_allclose(sum(out.values()), total, rtol=1e-5, atol=1e-5)
    assert_rel(out["mlp"], reference(q[:, groups["mlp"]], z[:, groups["mlp"]]))


def test_groups_exact_for_block_diagonal_precond(data):
    q, z, _ = data
    # block-diagonal H with two "layers" (columns 0:5 and 5:12)
    H1, H2 = spd(5, 4), spd(7, 5)
    H = np.zeros((D, D))
    H[:5, :5], H[5:, 5:] = H1, H2
    groups = {"layer1": slice(0, 5), "layer2": slice(5, D)}
    pc = SolvePrecond(H)
    for mode in inf.MODES:
        out = inf.influence(q, z, precond=pc, mode=mode, groups=groups, block_rows=16)
        assert_rel(out["layer1"], reference(q[:, :5], z[:, :5], H1, mode))
        assert_rel(out["layer2"], reference(q[:, 5:], z[:, 5:], H2, mode))
    si = inf.self_influence(z, pc, groups=groups)
    out = inf.influence(q, z, precond=pc, mode="l2", groups=groups, self_influence=si)
    assert_rel(out["layer2"], reference(q[:, 5:], z[:, 5:], H2, "l2"))
    with pytest.raises(ValueError, match="dict"):
        inf.influence(q, z, precond=pc, mode="l2", groups=groups, self_influence=si["layer1"])


def test_cached_self_influence_fingerprint(data, tmp_path):
    _, z, H = data
    pc = SolvePrecond(H)
    store = FakeStore(z, path=tmp_path)
    store.manifest = {"created_utc": "a"}
    a = inf.cached_self_influence(store, pc, key="spd")
    other = FakeStore(2 * z, path=tmp_path)  # same shape, re-created with other data
    other.manifest = {"created_utc": "b"}
    b = inf.cached_self_influence(other, pc, key="spd")
    assert len(other.reads) > 0
    np.testing.assert_allclose(b, 4 * a, rtol=1e-5)
    other.is_complete = lambda: False  # incomplete stores are not cached
    (tmp_path / "self_influence_spd.npy").unlink()
    inf.cached_self_influence(other, pc, key="spd")
    assert not (tmp_path / "self_influence_spd.npy").exists()


def test_cached_self_influence(data, tmp_path):
    _, z, H = data
    pc = SolvePrecond(H)
    store = FakeStore(z, path=tmp_path)
    a = inf.cached_self_influence(store, pc, key="spd")
    assert (tmp_path / "self_influence_spd.npy").exists()
    n_reads = len(store.reads)
    b = inf.cached_self_influence(store, pc, key="spd")
    assert len(store.reads) == n_reads  # served from the cache
    np.testing.assert_array_equal(a, b)
    assert_rel(a, np.diag(reference(z, z, H)))
    ident = inf.cached_self_influence(store)  # identity: default key
    assert (tmp_path / "self_influence_identity.npy").exists()
    np.testing.assert_allclose(ident, (z.astype(np.float64) ** 2).sum(1), rtol=1e-5)
    with pytest.raises(ValueError, match="key"):
        inf.cached_self_influence(store, pc)
    # a grown store is recomputed
    grown = FakeStore(np.concatenate([z, z[:3]]), path=tmp_path)
    c = inf.cached_self_influence(grown, pc, key="spd")
    assert c.shape == (N + 3,) and len(grown.reads) > 0
    # no path: just computed
    np.testing.assert_array_equal(inf.cached_self_influence(FakeStore(z), pc, key="spd"), a)


def test_bad_inputs(data):
    q, z, _ = data
    with pytest.raises(ValueError, match="mode"):
        inf.influence(q, z, mode="cos")
    with pytest.raises(ValueError, match="D="):
        inf.influence(q[:, :5], z)
    with pytest.raises(TypeError, match="store"):
        inf.influence(q, [[1.0]])
    with pytest.raises(TypeError, match="apply"):
        inf.influence(q, z, precond=object())
    with pytest.raises(ValueError, match="group"):
        inf.influence(q, z, groups={"a": np.array([0, D])})


def test_progress_bar_and_store_errors_propagate(data, capsys):
    q, z, _ = data
    out = inf.influence(q, z, block_rows=2, progress=True)
    assert_rel(out, reference(q, z))

    class Broken(FakeStore):
        def read(self, start, stop):
            if start >= 10:
                raise OSError("disk gone")
            return super().read(start, stop)

    with pytest.raises(OSError, match="disk gone"):
        inf.influence(q, Broken(z), block_rows=5)


_SHARDED = textwrap.dedent(
    """
    import json, sys
    import numpy as np, jax, jax.numpy as jnp
    sys.path.insert(0, sys.argv[1])
    from conftest import SolvePrecond, spd
    from jaxval._src import scoring as inf
    from jaxval._src.scoring.sources import Placer
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    q = rng.standard_normal((5, 12)).astype(np.float32)
    z = rng.standard_normal((37, 12)).astype(np.float32)
    pc = SolvePrecond(spd(12, 1))
    meshes = {"mesh": jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
              "make_mesh": jax.make_mesh((2, 2), ("a", "b"))}
    single = {m: inf.influence(q, z, precond=pc, mode=m, block_rows=6) for m in ("cosine", "l2")}
    va, ia = inf.top_k(q, z, 7, precond=pc, mode="relative", block_rows=6)
    sa = inf.self_influence(z, pc)
    # blocks really are split over the 4 devices (block_rows 6 -> 8 rows, 2 per device)
    placer = Placer(meshes["mesh"])
    blk = placer.block(np.zeros((8, 12), np.float32))
    assert len({s.device for s in blk.addressable_shards}) == 4
    assert all(s.data.shape == (2, 12) for s in blk.addressable_shards)
    res = {}
    for name, mesh in meshes.items():
        for mode, a in single.items():
            b = inf.influence(q, z, precond=pc, mode=mode, block_rows=6, mesh=mesh)
            res[f"{name}/{mode}"] = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
        vb, ib = inf.top_k(q, z, 7, precond=pc, mode="relative", block_rows=6, mesh=mesh)
        res[f"{name}/topk_idx_equal"] = bool((ia == ib).all())
        res[f"{name}/topk_val"] = float(np.max(np.abs(va - vb)))
        sb = inf.self_influence(z, pc, block_rows=6, mesh=mesh)
        res[f"{name}/self"] = float(np.max(np.abs(sa - sb)))
    print("RESULT" + json.dumps(res))
    """
)


def test_sharded_equals_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(4)
    env["JAX_PLATFORMS"] = "cpu"
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.run(
        [sys.executable, "-c", _SHARDED, here],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")][-1]
    res = json.loads(line[len("RESULT"):])
    for key, val in res.items():
        if key.endswith("topk_idx_equal"):
            assert val, key
        else:
            assert val <= 1e-5, (key, val)


def test_with_gradient_store(data, tmp_path):
    store_mod = pytest.importorskip("jaxval._src.store")
    q, z, H = data
    store = store_mod.GradientStore.create(tmp_path / "s", dim=D, num_rows=N, dtype="float32", chunk_rows=8)
    store.write(0, z, mark_done=True)
    pc = SolvePrecond(H)
    assert_rel(inf.influence(q, store, precond=pc, mode="cosine"), reference(q, z, H, "cosine"))
    si = inf.cached_self_influence(store, pc, key="spd")
    assert (tmp_path / "s" / "self_influence_spd.npy").exists()
    assert_rel(si, np.diag(reference(z, z, H)))
    reopened = store_mod.GradientStore.open(tmp_path / "s")
    np.testing.assert_array_equal(inf.cached_self_influence(reopened, pc, key="spd"), si)


def test_bf16_query_split_is_exact():
    """q == p0 + p1 + p2 exactly (float64 sum), each part representable in bfloat16, so that a bfloat16 GEMM
    with float32 accumulation computes q · z exactly up to summation order. (XLA:CPU flushes subnormals:
    for |q| < ~1e-31 the last parts can be flushed, an error below 1e-38 absolute; not tested.)"""
    rng = np.random.default_rng(5)
    q = (rng.standard_normal((7, 300)) * np.exp(rng.uniform(-25, 25, (7, 300)))).astype(np.float32)
    q[0, :5] = [0.0, -0.0, 1.0, np.float32(1 + 2**-23), -3.5e-30]
    parts = np.asarray(bf16_parts(jnp.asarray(q))).astype(np.float64).reshape(3, 7, 300)
    np.testing.assert_array_equal(parts.sum(0), q.astype(np.float64))


@pytest.mark.parametrize("mode", ["dot", "cosine", "l2"])
def test_bfloat16_store_scored_natively(data, tmp_path, mode):
    """A bfloat16 GradientStore is scored from its stored rows without a float32 copy (exact query
    split); the scores equal a float64 reference on the bf16-rounded rows to float32 accuracy, with
    preconditioner, groups and top_k, and equal scoring the float32 rows the store hands out."""
    store_mod = pytest.importorskip("jaxval._src.store")
    import ml_dtypes
    q, z, H = data
    s = store_mod.GradientStore.create(tmp_path / "s", dim=D, num_rows=N, dtype="bfloat16", chunk_rows=8)
    s.write(0, z, mark_done=True)
    zb = z.astype(ml_dtypes.bfloat16).astype(np.float32)
    src = TrainRows(s)
    assert src.native and str(src.read(0, 8).dtype) == "bfloat16"
    pc = SolvePrecond(H)
    for precond, h in ((None, None), (pc, H)):
        out = inf.influence(q, s, precond=precond, mode=mode, block_rows=8)
        assert_rel(out, reference(q, zb, h, mode), tol=2e-6)
        assert_rel(out, inf.influence(q, s.read(0, N), precond=precond, mode=mode, block_rows=8), tol=2e-6)
    groups = {"a": slice(0, 5), "b": np.arange(5, D)}
    g = inf.influence(q, s, mode="dot", groups=groups, block_rows=16)
    assert_rel(g["a"], reference(q[:, :5], zb[:, :5]), tol=2e-6)
    assert_rel(g["b"], reference(q[:, 5:], zb[:, 5:]), tol=2e-6)
    v, i = inf.top_k(q, s, 4, precond=pc, mode=mode, block_rows=8)
    ref = reference(q, zb, H, mode)
    np.testing.assert_array_equal(np.sort(i, 1), np.sort(np.argsort(-ref, 1, kind="stable")[:, :4], 1))
    assert_rel(inf.self_influence(s, pc, block_rows=8), np.diag(reference(zb, zb, H)), tol=2e-6)
