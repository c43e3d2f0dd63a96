"""Rows of a small complete local store stay on the device between scoring calls: the second call reads
nothing from disk, compiles nothing and gives the same scores, equal to a float64 numpy reference of the
stored (bfloat16-rounded) rows; a rewritten store, an incomplete one or one above the budget is read again."""

import jax
import ml_dtypes
import numpy as np
import pytest

import jaxval as jv
from conftest import CompileCounter
from jaxval import GradientStore
from jaxval._src.scoring import memo

Q, N, D = 5, 37, 24


class Reads:
    """Counts GradientStore.read calls (the engine's only way to the chunk files)."""

    def __init__(self, monkeypatch):
        self.n = 0
        orig = GradientStore.read

        def read(store, *a, **kw):
            self.n += 1
            return orig(store, *a, **kw)

        monkeypatch.setattr(GradientStore, "read", read)


def make_store(path, rows, dtype):
    s = GradientStore.create(path, dim=D, num_rows=N, dtype=dtype, chunk_rows=8)
    s.write(0, rows, mark_done=True)
    return s


def stored(rows, dtype):
    """The values a store of ``dtype`` holds, in float64 (numpy's own bfloat16 rounding)."""
    return rows.astype(ml_dtypes.bfloat16).astype(np.float64) if dtype == "bfloat16" else rows.astype(np.float64)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_second_call_reads_and_compiles_nothing(dtype, tmp_path, monkeypatch):
    memo.clear()
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((N, D)).astype(np.float32)
    make_store(tmp_path / "s", rows, dtype)
    ref = stored(rows, dtype)
    reads = Reads(monkeypatch)
    q1 = rng.standard_normal((Q, D)).astype(np.float32)
    a = jv.influence(q1, GradientStore.open(tmp_path / "s"), block_rows=16)
    assert reads.n > 0
    np.testing.assert_allclose(a, q1.astype(np.float64) @ ref.T, rtol=1e-5, atol=1e-5)
    jv.top_k(q1, GradientStore.open(tmp_path / "s"), k=3, block_rows=16)
    first = reads.n
    q2 = rng.standard_normal((Q, D)).astype(np.float32)
    with CompileCounter() as c:
        b = jv.influence(q2, GradientStore.open(tmp_path / "s"), block_rows=16)
        _, idx = jv.top_k(q2, GradientStore.open(tmp_path / "s"), k=3, block_rows=16)
    assert reads.n == first and c.n == 0
    np.testing.assert_allclose(b, q2.astype(np.float64) @ ref.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(idx, np.argsort(-(q2.astype(np.float64) @ ref.T), axis=1)[:, :3])


def test_rewritten_incomplete_or_too_large_store_is_read_again(tmp_path, monkeypatch):
    memo.clear()
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((N, D)).astype(np.float32)
    q = rng.standard_normal((Q, D)).astype(np.float32)
    s = make_store(tmp_path / "s", rows, "float32")
    jv.influence(q, s)
    s.write(0, -rows, mark_done=True)                         # rewritten in place: new file times
    np.testing.assert_allclose(jv.influence(q, GradientStore.open(tmp_path / "s")),
                               -q.astype(np.float64) @ rows.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    part = GradientStore.create(tmp_path / "p", dim=D, num_rows=N, dtype="float32", chunk_rows=8)
    part.write(0, rows[:16], mark_done=True)
    reads = Reads(monkeypatch)
    for _ in range(2):                                        # incomplete: never kept
        jv.influence(q, part, allow_incomplete=True, block_rows=16)
    assert reads.n == 2 * 3
    monkeypatch.setattr(memo, "ROWS_MAX_BYTES", 16 * D * 4)  # one block: the store does not fit
    big = make_store(tmp_path / "b", rows, "float32")
    n0 = reads.n
    for _ in range(2):
        out = jv.influence(q, big, block_rows=16)
    assert reads.n - n0 == 2 * 3
    np.testing.assert_allclose(out, q.astype(np.float64) @ rows.T.astype(np.float64), rtol=1e-5, atol=1e-5)
