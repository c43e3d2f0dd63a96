"""Tests of jaxval.store.GradientStore (tensorstore zarr3); every numeric check against numpy."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import ml_dtypes
import numpy as np
import pytest

from jaxval._src.store import GradientStore, StoreError, StoreNotFoundError, config_hash, location


def _rand(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _tree_digest(path):
    """{relative path: sha256 of content (files) or 'dir'} for everything under path."""
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path)] = "dir"
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _make(path, n=50, d=24, dtype="float32", chunk_rows=8, config=None, ids=None, data=None):
    s = GradientStore.create(path, dim=d, num_rows=n, dtype=dtype, chunk_rows=chunk_rows,
                             config={"layers": ["a", "b"], "rank": 4} if config is None else config, ids=ids)
    if data is not None:
        s.write(0, data, mark_done=True)
    return s


# ---------------------------------------------------------------------------------- round trips


def test_roundtrip_float32_exact(tmp_path):
    x = _rand(50, 24)
    s = _make(tmp_path / "s", dtype="float32")
    s.write(0, x[:13])            # uneven pieces, crossing chunk boundaries (chunk_rows=8)
    s.write(13, x[13:])
    assert len(s) == 50 and s.dim == 24 and s.dtype == "float32" and s.chunk_rows == 8
    np.testing.assert_array_equal(s.read(0, 50), x)
    np.testing.assert_array_equal(s.read(7, 21), x[7:21])
    r = GradientStore.open(tmp_path / "s")
    out = r.read(0, 50)
    assert out.dtype == np.float32 and out.shape == (50, 24)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(r.ids, np.arange(50))
    assert r.read(5, 5).shape == (0, 24)


@pytest.mark.parametrize("dtype,npdt", [("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)])
def test_roundtrip_low_precision(tmp_path, dtype, npdt):
    x = _rand(40, 16, seed=1) * 3
    s = _make(tmp_path / "s", n=40, d=16, dtype=dtype, data=x)
    out = GradientStore.open(tmp_path / "s").read(0, 40)
    ref = x.astype(npdt).astype(np.float32)   # round to nearest, as numpy / ml_dtypes do it
    np.testing.assert_array_equal(out, ref)
    eps = 2.0 ** -8 if dtype == "bfloat16" else 2.0 ** -11
    assert np.all(np.abs(out - x) <= eps * np.abs(x) + 1e-30)
    assert s.dtype == dtype


def test_write_accepts_float64_and_async(tmp_path):
    x = _rand(32, 8, seed=2)
    s = _make(tmp_path / "s", n=32, d=8)
    fut = s.write(0, x[:16].astype(np.float64), wait=False)
    buf = x[16:].copy()
    fut2 = s.write(16, buf, wait=False)
    buf[:] = 0                                # the store must have taken its own copy
    fut.result()
    fut2.result()
    s.mark_done(0, 32)
    np.testing.assert_array_equal(s.read(0, 32), x)
    with pytest.raises(ValueError, match="wait=True"):
        s.write(0, x, wait=False, mark_done=True)


def test_bf16_takes_half_the_bytes(tmp_path):
    x = _rand(512, 256, seed=3)
    s32 = _make(tmp_path / "f32", n=512, d=256, dtype="float32", chunk_rows=64, data=x)
    s16 = _make(tmp_path / "bf16", n=512, d=256, dtype="bfloat16", chunk_rows=64, data=x)
    ratio = s16.nbytes_on_disk() / s32.nbytes_on_disk()
    assert 0.4 <= ratio <= 0.6, ratio
    assert s32.nbytes_on_disk() >= 512 * 256 * 4
    assert s32.info()["bytes_on_disk"] == s32.nbytes_on_disk()


def test_chunk_layout_is_chunk_rows_by_dim(tmp_path):
    s = _make(tmp_path / "s", n=50, d=24, chunk_rows=8)
    assert list(s._grads.chunk_layout.read_chunk.shape) == [8, 24]
    assert list(s._grads.chunk_layout.write_chunk.shape) == [8, 24]
    md = json.loads((tmp_path / "s" / "grads" / "zarr.json").read_text())
    assert md["chunk_grid"]["configuration"]["chunk_shape"] == [8, 24]
    assert "sharding_indexed" not in json.dumps(md["codecs"])


# ---------------------------------------------------------------------------------- ids


def test_string_ids_round_trip(tmp_path):
    ids = [f"doc-{i}" for i in range(30)] + ["", "naïve ☃", "a" * 300]
    s = _make(tmp_path / "s", n=len(ids), d=4, ids=ids)
    r = GradientStore.open(tmp_path / "s")
    assert list(r.ids) == ids
    assert list(s.ids) == ids
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["ids_kind"] == "str"
    # compact: one byte table + offsets, not one record per row
    assert (tmp_path / "s" / "ids_bytes").is_dir() and (tmp_path / "s" / "ids_offsets").is_dir()
    assert len(ids[0]) < 100 and "doc-0" not in (tmp_path / "s" / "manifest.json").read_text()


def test_int_ids_round_trip(tmp_path):
    ids = np.array([2**40 + 7, -3, 0, 12, 99], dtype=np.int64)
    _make(tmp_path / "s", n=5, d=4, ids=ids)
    r = GradientStore.open(tmp_path / "s")
    assert r.ids.dtype == np.int64
    np.testing.assert_array_equal(r.ids, ids)
    _make(tmp_path / "t", n=3, d=4, ids=[5, 6, 7])
    np.testing.assert_array_equal(GradientStore.open(tmp_path / "t").ids, [5, 6, 7])


@pytest.mark.parametrize("ids", [[1, 2, 2, 3], ["a", "b", "a", "c"], np.array([4, 4, 5, 6])])
def test_duplicate_ids_raise_and_write_nothing(tmp_path, ids):
    with pytest.raises(StoreError, match="unique"):
        GradientStore.create(tmp_path / "s", dim=3, num_rows=4, ids=ids)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("ids", [[1, "a", 2], [1.5, 2.5, 3.5], [1, 2]])
def test_bad_ids_raise(tmp_path, ids):
    with pytest.raises(StoreError):
        GradientStore.create(tmp_path / "s", dim=3, num_rows=3, ids=ids)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------- done / iteration


def test_done_mask_and_pending(tmp_path):
    s = _make(tmp_path / "s", n=50, d=4, chunk_rows=8)
    ref = np.zeros(50, bool)
    assert not s.done_mask().any() and not s.is_complete()
    for a, b in [(0, 8), (16, 24), (21, 30), (48, 50)]:
        s.write(a, np.zeros((b - a, 4), np.float32))   # rows are marked done after their data are written
        s.mark_done(a, b)
        ref[a:b] = True
    np.testing.assert_array_equal(s.done_mask(), ref)
    np.testing.assert_array_equal(GradientStore.open(tmp_path / "s").done_mask(), ref)
    expect = [(a, min(a + 8, 50)) for a in range(0, 50, 8) if not ref[a:a + 8].all()]
    assert s.pending_blocks() == expect
    info = s.info()
    assert info["rows_done"] == ref.sum() and info["rows_total"] == 50 and not info["complete"]
    s.write(0, np.zeros((50, 4), np.float32))
    s.mark_done(0, 50)
    assert s.is_complete() and s.pending_blocks() == []


def test_iter_blocks_covers_rows_in_order(tmp_path):
    x = _rand(50, 6, seed=4)
    s = _make(tmp_path / "s", n=50, d=6, data=x)
    starts, blocks = zip(*s.iter_blocks(block_rows=7))
    assert list(starts) == list(range(0, 50, 7))
    np.testing.assert_array_equal(np.concatenate(blocks), x)
    starts, blocks = zip(*s.iter_blocks(block_rows=4, start=3, stop=18))
    assert list(starts) == [3, 7, 11, 15]
    np.testing.assert_array_equal(np.concatenate(blocks), x[3:18])
    assert [b.shape[0] for _, b in s.iter_blocks()] == [8] * 6 + [2]   # default: chunk_rows
    assert list(s.iter_blocks(start=10, stop=10)) == []


def test_iter_blocks_prefetches(tmp_path):
    s = _make(tmp_path / "s", n=20, d=3, data=_rand(20, 3))
    s._files = None     # the tensorstore route (local uncompressed stores are read from their chunk files)
    issued = []
    real = s._grads

    class Spy:
        def __getitem__(self, idx):
            view = real[idx]

            class V:
                def read(self_inner):
                    issued.append(idx.start)
                    return view.read()
            return V()

    s._grads = Spy()
    seen = []
    for start, _ in s.iter_blocks(block_rows=5):
        seen.append((start, list(issued)))
    # when block k is handed out, the read of block k+1 has already been issued
    assert seen == [(0, [0, 5]), (5, [0, 5, 10]), (10, [0, 5, 10, 15]), (15, [0, 5, 10, 15])]


# ---------------------------------------------------------------------------------- resume / config


def test_create_same_config_resumes(tmp_path):
    x = _rand(50, 24)
    s = _make(tmp_path / "s")
    s.write(0, x[:16], mark_done=True)
    before = _tree_digest(tmp_path / "s")
    r = _make(tmp_path / "s")                       # same args: opens, keeps data
    assert _tree_digest(tmp_path / "s") == before
    np.testing.assert_array_equal(r.read(0, 16), x[:16])
    assert r.done_mask().sum() == 16
    assert r.config == {"layers": ["a", "b"], "rank": 4}
    assert r.config_hash == config_hash({"rank": 4, "layers": ("a", "b")})


def test_config_hash_is_sha256_of_canonical_json():
    cfg = {"rank": 4, "layers": ["x", "y"], "seed": np.int64(3)}
    ref = hashlib.sha256(b'{"layers":["x","y"],"rank":4,"seed":3}').hexdigest()
    assert config_hash(cfg) == ref
    assert config_hash({"seed": 3, "layers": ("x", "y"), "rank": 4}) == ref
    assert config_hash(None) == hashlib.sha256(b"{}").hexdigest()


def test_overwrite_replaces_store_and_keeps_other_files(tmp_path):
    p = tmp_path / "s"
    _make(p, data=_rand(50, 24))
    (p / "notes.txt").write_text("mine")
    s = GradientStore.create(p, dim=10, num_rows=20, dtype="float32", config={"rank": 9}, overwrite=True)
    assert (p / "notes.txt").read_text() == "mine"
    assert len(s) == 20 and s.dim == 10 and not s.done_mask().any()
    np.testing.assert_array_equal(GradientStore.open(p).read(0, 20), np.zeros((20, 10), np.float32))
    assert GradientStore.open(p).config == {"rank": 9}


# ---------------------------------------------------------------------------------- errors leave disk intact


@pytest.mark.parametrize("change", [
    dict(config={"layers": ["a"], "rank": 8}),
    dict(d=25),
    dict(n=51),
    dict(dtype="bfloat16"),
    dict(ids=[f"r{i}" for i in range(50)]),
])
def test_create_with_different_settings_raises(tmp_path, change):
    p = tmp_path / "s"
    _make(p, data=_rand(50, 24))
    before = _tree_digest(p)
    with pytest.raises(StoreError, match="different|overwrite"):
        _make(p, **change)
    assert _tree_digest(p) == before


def test_open_not_a_store(tmp_path):
    p = tmp_path / "plain"
    p.mkdir()
    (p / "data.bin").write_bytes(b"\x00\x01")
    before = _tree_digest(p)
    with pytest.raises(StoreNotFoundError, match="manifest.json"):
        GradientStore.open(p)
    with pytest.raises(FileNotFoundError):
        GradientStore.open(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    assert _tree_digest(p) == before


def test_corrupt_manifest(tmp_path):
    p = tmp_path / "s"
    _make(p, data=_rand(50, 24))
    (p / "manifest.json").write_text('{"format": "jaxval.GradientStore", "dim": 2')
    before = _tree_digest(p)
    with pytest.raises(StoreError, match="corrupt"):
        GradientStore.open(p)
    with pytest.raises(StoreError, match="corrupt"):
        _make(p)
    assert _tree_digest(p) == before


def test_missing_manifest_but_arrays_present(tmp_path):
    p = tmp_path / "s"
    _make(p, data=_rand(50, 24))
    os.remove(p / "manifest.json")
    before = _tree_digest(p)
    with pytest.raises(StoreError, match="half-created"):
        GradientStore.open(p)
    with pytest.raises(StoreError, match="half-created"):
        _make(p)
    assert _tree_digest(p) == before


_RO_CHECK = textwrap.dedent("""
    import os, sys
    from jaxval import GradientStore, StoreError
    if os.geteuid() == 0:                 # root ignores permissions: drop to 'nobody' after importing
        os.setgid(65534)
        os.setuid(65534)
    for p in sys.argv[1:]:
        try:
            GradientStore.create(p, dim=3, num_rows=4)
        except StoreError as e:
            assert "cannot be written" in str(e), e
        else:
            raise SystemExit("no error for " + p)
""")


def test_create_in_read_only_dir():
    base = tempfile.mkdtemp(prefix="jaxval-ro-")   # not under pytest's 0700 tmp: 'nobody' must reach it
    try:
        os.chmod(base, 0o755)
        ro = os.path.join(base, "ro")
        os.mkdir(ro)
        with open(os.path.join(ro, "keep.txt"), "w") as f:
            f.write("x")
        os.chmod(ro, 0o555)
        before = _tree_digest(base)
        r = subprocess.run([sys.executable, "-c", _RO_CHECK, os.path.join(ro, "s"), ro,
                            os.path.join(ro, "a", "b")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr + r.stdout
        assert _tree_digest(base) == before
    finally:
        os.chmod(os.path.join(base, "ro"), 0o755)
        shutil.rmtree(base)


def test_create_under_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    before = _tree_digest(tmp_path)
    with pytest.raises(StoreError, match="not a folder"):
        GradientStore.create(f / "sub" / "s", dim=3, num_rows=4)
    with pytest.raises(StoreError, match="not a folder"):
        GradientStore.create(f, dim=3, num_rows=4)
    assert _tree_digest(tmp_path) == before


def test_bad_writes_and_reads_change_nothing(tmp_path):
    p = tmp_path / "s"
    s = _make(p, data=_rand(50, 24))
    before = _tree_digest(p)
    with pytest.raises(ValueError, match="outside"):
        s.write(45, _rand(10, 24))
    with pytest.raises(ValueError, match="shape"):
        s.write(0, _rand(4, 23))
    with pytest.raises(ValueError, match="outside"):
        s.read(40, 51)
    with pytest.raises(ValueError, match="outside"):
        s.mark_done(-1, 3)
    assert _tree_digest(p) == before


@pytest.mark.parametrize("kw", [dict(dim=0, num_rows=3), dict(dim=3, num_rows=3, dtype="int8"),
                                dict(dim=3, num_rows=3, config={"f": object()}),
                                dict(dim=3, num_rows=3, chunk_rows=0)])
def test_bad_create_arguments(tmp_path, kw):
    with pytest.raises(StoreError):
        GradientStore.create(tmp_path / "s", **kw)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------- locations


def test_kvstore_spec_and_gcs_url(tmp_path):
    x = _rand(10, 3)
    s = GradientStore.create({"driver": "file", "path": str(tmp_path / "k")}, dim=3, num_rows=10,
                             dtype="float32", chunk_rows=4)
    s.write(0, x)
    np.testing.assert_array_equal(GradientStore.open(tmp_path / "k").read(0, 10), x)
    loc = location("gs://my-bucket/runs/a")
    assert loc.kvstore("grads") == {"driver": "gcs", "bucket": "my-bucket", "path": "runs/a/grads/"}
    with pytest.raises(StoreError, match="URL"):
        location("s3x://b/p")


# ---------------------------------------------------------------------------------- several processes

_WORKER = textwrap.dedent("""
    import sys, numpy as np
    from jaxval import GradientStore
    x = np.load(sys.argv[1])
    for job in sys.argv[2:]:                      # PATH=a:b,c:d,...
        path, rows = job.split("=")
        s = GradientStore.open(path, timeout=30)  # no shape needed
        for part in rows.split(","):
            a, b = map(int, part.split(":"))
            s.write(a, x[a:b])
            s.mark_done(a, b)
""")


def test_two_processes_write_disjoint_halves(tmp_path):
    n, d, cr = 64, 32, 8
    x = _rand(n, d, seed=5)
    npy = tmp_path / "x.npy"
    np.save(npy, x)
    ref = _make(tmp_path / "one", n=n, d=d, chunk_rows=cr, dtype="bfloat16", data=x)   # one process
    _make(tmp_path / "two", n=n, d=d, chunk_rows=cr, dtype="bfloat16")
    _make(tmp_path / "mix", n=n, d=d, chunk_rows=cr, dtype="bfloat16")
    jobs = []
    for w in range(2):
        # "two": chunk-aligned halves, block by block; "mix": 4-row pieces interleaved inside shared chunks
        half = ",".join(f"{a}:{a + cr}" for a in range(w * n // 2, (w + 1) * n // 2, cr))
        mixed = ",".join(f"{a}:{a + 4}" for a in range(4 * w, n, 8))
        jobs.append([f"{tmp_path / 'two'}={half}", f"{tmp_path / 'mix'}={mixed}"])
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(npy), *j],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for j in jobs]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    for name in ("two", "mix"):
        s = GradientStore.open(tmp_path / name)
        np.testing.assert_array_equal(s.read(0, n), ref.read(0, n))
        np.testing.assert_array_equal(s.read(0, n), x.astype(ml_dtypes.bfloat16).astype(np.float32))
        np.testing.assert_array_equal(s.done_mask(), np.ones(n, bool))


# ---------------------------------------------------------------------------------- direct chunk-file reads

@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_chunk_file_reads_equal_tensorstore(tmp_path, dtype):
    """A local uncompressed store is read straight from its zarr3 chunk files; every row range, in
    the stored dtype and as float32, equals tensorstore's own read, including chunks never written
    (zeros), a partly written chunk and the edge chunk."""
    x = _rand(100, 37, seed=3)
    s = GradientStore.create(tmp_path / "s", dim=37, num_rows=100, dtype=dtype, chunk_rows=16)
    s.write(0, x[:40])            # chunk 2 (rows 32-47) half written, chunk 3 never
    s.write(64, x[64:90])          # edge chunk 6 (rows 96-99) never written
    s = GradientStore.open(tmp_path / "s")
    assert s._files is not None
    ref = np.asarray(s._grads[0:100].read().result())        # tensorstore, stored dtype
    for a, b in [(0, 100), (3, 5), (15, 17), (40, 70), (95, 100), (0, 1), (31, 97)]:
        native, f32 = s.read(a, b, native=True), s.read(a, b)
        assert native.dtype == ref.dtype and f32.dtype == np.float32
        assert native.ctypes.data % 64 == 0 and f32.ctypes.data % 64 == 0
        np.testing.assert_array_equal(native.view(np.uint8), ref[a:b].view(np.uint8))
        np.testing.assert_array_equal(f32, ref[a:b].astype(np.float32))
    assert s.read(50, 50).shape == (0, 37)
    np.testing.assert_array_equal(
        np.concatenate([b for _, b in s.iter_blocks(24, native=True)]).view(np.uint8), ref.view(np.uint8))


def test_chunk_file_reads_only_for_plain_local_layout(tmp_path):
    s = GradientStore.create(tmp_path / "z", dim=8, num_rows=20, dtype="bfloat16", chunk_rows=4, compress=True)
    x = _rand(20, 8)
    s.write(0, x)
    s = GradientStore.open(tmp_path / "z")
    assert s._files is None                      # zstd chunks: tensorstore decodes them
    np.testing.assert_array_equal(s.read(0, 20), x.astype(s.read(0, 1, native=True).dtype).astype(np.float32))
    n = s.read(2, 9, native=True)
    assert n.ctypes.data % 64 == 0 and n.shape == (7, 8)


def test_truncated_chunk_file_is_an_error(tmp_path):
    s = _make(tmp_path / "s", n=16, d=5, chunk_rows=8, data=_rand(16, 5))
    chunk = tmp_path / "s" / "grads" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    s = GradientStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="shorter than its chunk"):
        s.read(0, 16)
    np.testing.assert_array_equal(s.read(0, 8), _rand(16, 5)[:8])     # the intact chunk still reads
