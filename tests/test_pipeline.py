"""Tests of jaxval.pipeline.log_gradients (and the `jaxval log` / `jaxval info` commands).

Every stored row is checked against LoGra.grads computed directly; crash / multi-process tests run real
subprocesses (SIGKILL at random points, two concurrent writers) and compare with an uninterrupted run.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxval.distributed import xla_flags
import jaxval as jv
from jaxval._src import curvature
from jaxval.cli.app import main as cli_main
from jaxval.models import mlp
from jaxval._src.logging import log_gradients, store_config
from jaxval import GradientStore, StoreError
from conftest import CRASH_ROWS, crash_setup, small_mlp

warnings.filterwarnings("ignore", message="jaxval: parameters")

BF16 = ml_dtypes.bfloat16


def _tree_digest(path):
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path)] = "dir"
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _direct(logra, model, data, bs):
    n = len(next(iter(data.values())))
    return np.concatenate([np.asarray(logra.grads(model, {k: v[s:s + bs] for k, v in data.items()}))
                           for s in range(0, n, bs)])


@pytest.fixture(scope="module")
def small():
    return small_mlp()


# ------------------------------------------------------------------------------------ round trips


def test_rows_equal_direct_grads_fp32_exact_and_bf16_rounded(tmp_path, small):
    model, logra, data = small
    ref = _direct(logra, model, data, 32)                        # [200, D] float32, same batch cuts
    s32 = log_gradients(logra, model, data, tmp_path / "f32", batch_size=32, dtype="float32", chunk_rows=64,
                        progress=False)
    np.testing.assert_array_equal(s32.read(), ref)               # exact, ragged last block included
    s16 = log_gradients(logra, model, data, tmp_path / "bf16", batch_size=32, dtype="bfloat16", chunk_rows=64,
                        progress=False)
    got = GradientStore.open(tmp_path / "bf16").read()
    np.testing.assert_array_equal(got, ref.astype(BF16).astype(np.float32))   # round to nearest even
    assert np.all(np.abs(got - ref) <= 2.0 ** -8 * np.abs(ref))
    assert not np.array_equal(got, ref)                          # really stored in bf16
    for s in (s32, s16):
        assert s.is_complete() and len(s) == 200 and s.dim == logra.dim and s.chunk_rows == 64
        np.testing.assert_array_equal(s.ids, np.arange(200))
        assert s.config == store_config(logra, model, s.dtype)
        assert s.config["model_fingerprint"] == jv.model_fingerprint(model)


def test_ragged_batches_padding_and_defaults(tmp_path, small):
    model, logra, data = small
    data = {k: v[:77] for k, v in data.items()}                  # 77 = 2·32 + 13: a padded short batch
    ref = np.asarray(logra.grads(model, data))
    s = log_gradients(logra, model, data, tmp_path / "s", batch_size=32, dtype="float32", progress=False)
    assert s.chunk_rows == 77                                    # default: ~8 MiB, a multiple of 32, ≤ N
    np.testing.assert_allclose(s.read(), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    s2 = log_gradients(logra, model, data, tmp_path / "nopad", batch_size=32, dtype="float32", pad=False,
                       chunk_rows=32, progress=False)
    np.testing.assert_array_equal(s2.read(), s.read())


def test_bf16_store_is_half_the_bytes_and_ranks_like_fp32_on_trained_digits_mlp(tmp_path):
    from scipy.stats import spearmanr

    from jaxval.data.digits import load_digits
    from jaxval._src.train import train

    d = load_digits(seed=0)
    model = mlp.MLP((64, 64, 10), rngs=nnx.Rngs(0))
    train(model, mlp.loss_fn, {"x": d["x_train"], "y": d["y_train"]}, steps=150, batch_size=64, lr=3e-3,
          progress=False)
    acc = float(np.mean(np.asarray(mlp.predict(model, d["x_test"])) == d["y_test"]))
    assert acc > 0.85                                            # a real (trained) model
    logra = jv.LoGra(model, mlp.loss_fn, rank=16)
    train_set = {"x": d["x_train"], "y": d["y_train"]}
    kw = dict(batch_size=128, ids=d["idx_train"], chunk_rows=256, progress=False)
    a = log_gradients(logra, model, train_set, tmp_path / "f32", dtype="float32", **kw)
    b = log_gradients(logra, model, train_set, tmp_path / "bf16", dtype="bfloat16", **kw)
    ratio = b.nbytes_on_disk() / a.nbytes_on_disk()
    assert 0.45 <= ratio <= 0.55, ratio                          # half the bytes (ids, manifest aside)
    assert a.nbytes_on_disk() >= len(a) * logra.dim * 4
    g32, g16 = a.read(), b.read()
    q = np.asarray(logra.grads(model, {"x": d["x_test"][:20], "y": d["y_test"][:20]}))
    s32, s16 = q @ g32.T, q @ g16.T
    rho = [spearmanr(a, b)[0] for a, b in zip(s32, s16)]
    assert min(rho) >= 0.99, rho
    np.testing.assert_array_equal(GradientStore.open(tmp_path / "bf16").ids, d["idx_train"])


# ------------------------------------------------------------------------------------ ids, iterables


def test_ids_pass_through_and_duplicates_refused(tmp_path, small):
    model, logra, data = small
    ids = [f"example/{i:04d}" for i in range(200)][::-1]
    s = log_gradients(logra, model, data, tmp_path / "s", ids=ids, dtype="float32", chunk_rows=64, batch_size=32,
                      progress=False)
    assert list(GradientStore.open(tmp_path / "s").ids) == ids
    with pytest.raises(StoreError, match="unique"):
        log_gradients(logra, model, data, tmp_path / "dup", ids=[0, 1] + list(range(198)), progress=False)
    assert not (tmp_path / "dup" / "manifest.json").exists()
    with pytest.raises(StoreError, match="different ids"):            # a resume must pass the same ids
        log_gradients(logra, model, data, tmp_path / "s", ids=ids[::-1], dtype="float32", batch_size=32,
                      progress=False)
    np.testing.assert_array_equal(s.read(), GradientStore.open(tmp_path / "s").read())


def test_iterable_of_id_batch_pairs_equals_arrays(tmp_path, small):
    model, logra, data = small
    arr = log_gradients(logra, model, data, tmp_path / "arr", dtype="float32", chunk_rows=64, batch_size=32,
                        progress=False)
    # batches of 48 straddle the 64-row blocks; ids given per batch
    items = [([f"r{i}" for i in range(s, min(s + 48, 200))], {k: v[s:s + 48] for k, v in data.items()})
             for s in range(0, 200, 48)]
    it = log_gradients(logra, model, items, tmp_path / "it", dtype="float32", chunk_rows=64, progress=False)
    np.testing.assert_allclose(it.read(), arr.read(), rtol=1e-5, atol=1e-7)
    assert list(it.ids) == [f"r{i}" for i in range(200)] and it.is_complete()
    # a one-shot generator needs the ids (or num_rows) up front
    gen = ((None, {k: v[s:s + 50] for k, v in data.items()}) for s in range(0, 200, 50))
    with pytest.raises(ValueError, match="one-shot"):
        log_gradients(logra, model, gen, tmp_path / "gen", progress=False)
    gen = ((None, {k: v[s:s + 50] for k, v in data.items()}) for s in range(0, 200, 50))
    g = log_gradients(logra, model, gen, tmp_path / "gen", num_rows=200, dtype="float32", chunk_rows=64,
                      progress=False)
    np.testing.assert_allclose(g.read(), arr.read(), rtol=1e-5, atol=1e-7)
    # yielding other ids than the store's on a resume is refused
    bad = [([f"x{i}" for i in range(s, min(s + 48, 200))], b) for (_, b), s in zip(items, range(0, 200, 48))]
    st = GradientStore.open(tmp_path / "it")
    st._done[0:64].write(np.zeros(64, np.uint8)).result()      # make block 0 pending again
    with pytest.raises(ValueError, match="differ from the store's ids"):
        log_gradients(logra, model, bad, tmp_path / "it", ids=[f"r{i}" for i in range(200)], dtype="float32",
                      progress=False)


# ------------------------------------------------------------------------------------ resume, config


def test_resume_after_an_error_computes_only_pending_blocks(tmp_path, small):
    model, logra, data = small
    ref = log_gradients(logra, model, data, tmp_path / "ref", dtype="bfloat16", chunk_rows=32, batch_size=32,
                        progress=False).read()
    seen = []

    def boom(s, e):
        seen.append((s, e))
        if len(seen) == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        log_gradients(logra, model, data, tmp_path / "s", dtype="bfloat16", chunk_rows=32, batch_size=32,
                      progress=False, on_block=boom)
    st = GradientStore.open(tmp_path / "s")
    pending = st.pending_blocks()
    assert 0 < st.num_done() < 200 and st.num_done() >= 3 * 32
    again = []
    s = log_gradients(logra, model, data, tmp_path / "s", dtype="bfloat16", batch_size=32, progress=False,
                      on_block=lambda a, b: again.append((a, b)))
    assert sorted(again) == pending                              # nothing done twice
    np.testing.assert_array_equal(s.read(), ref)
    assert s.is_complete()
    before = _tree_digest(tmp_path / "s")                        # a complete store: a rerun changes nothing
    log_gradients(logra, model, data, tmp_path / "s", dtype="bfloat16", batch_size=32, progress=False,
                  on_block=lambda a, b: pytest.fail("recomputed a finished block"))
    assert _tree_digest(tmp_path / "s") == before


@pytest.mark.parametrize("change", ["projection_seed", "rank", "weights", "dtype", "data_size", "extra"])
def test_rerun_with_another_config_refuses_and_leaves_store_identical(tmp_path, small, change):
    model, logra, data = small
    path = tmp_path / "s"
    log_gradients(logra, model, data, path, dtype="bfloat16", chunk_rows=64, batch_size=32, progress=False,
                  extra_config={"data": "a"})
    before = _tree_digest(path)
    kw = dict(dtype="bfloat16", progress=False, extra_config={"data": "a"}, batch_size=32)
    m2, lg2, d2 = model, logra, data
    if change == "projection_seed":
        lg2, match = jv.LoGra(model, mlp.loss_fn, rank=4, seed=1), "logra.projection_sha256"
    elif change == "rank":
        lg2, match = jv.LoGra(model, mlp.loss_fn, rank=3), "dim"
    elif change == "weights":
        m2 = mlp.MLP((8, 16, 4), rngs=nnx.Rngs(7))
        lg2, match = jv.LoGra(m2, mlp.loss_fn, rank=4), "model_fingerprint"
    elif change == "dtype":
        kw["dtype"], match = "float32", "dtype"
    elif change == "data_size":
        d2, match = {k: v[:150] for k, v in data.items()}, "num_rows"
    else:
        kw["extra_config"], match = {"data": "b"}, "extra.data"
    with pytest.raises(StoreError, match=match) as ei:
        log_gradients(lg2, m2, d2, path, **kw)
    assert "overwrite=True" in str(ei.value)
    assert _tree_digest(path) == before
    if change in ("extra", "dtype"):                            # overwrite=True replaces it
        s = log_gradients(lg2, m2, d2, path, overwrite=True, **kw)
        assert s.is_complete() and s.config == store_config(lg2, m2, kw["dtype"], kw["extra_config"])


def test_half_created_store_from_a_crash_during_create_is_recovered(tmp_path, small):
    model, logra, data = small
    path = tmp_path / "s"
    st = GradientStore.create(path, dim=logra.dim, num_rows=200, dtype="bfloat16", chunk_rows=64,
                              config={"whatever": 1})
    os.remove(path / "manifest.json")                            # as if killed before the manifest was written
    with pytest.warns(UserWarning, match="half-created"):
        s = log_gradients(logra, model, data, path, dtype="bfloat16", chunk_rows=64, batch_size=32,
                          progress=False)
    assert s.is_complete()
    # a half-created store of another shape is not ours: refused, untouched
    GradientStore.create(tmp_path / "o", dim=logra.dim + 1, num_rows=200, config={})
    os.remove(tmp_path / "o" / "manifest.json")
    before = _tree_digest(tmp_path / "o")
    with pytest.raises(StoreError, match="half-created"):
        log_gradients(logra, model, data, tmp_path / "o", progress=False)
    assert _tree_digest(tmp_path / "o") == before
    del st


def test_bad_arguments(tmp_path, small):
    model, logra, data = small
    for kw, match in [({"batch_size": 0}, "batch_size"), ({"stats": "ekfac"}, "stats"),
                      ({"process_index": 2, "process_count": 2}, "process_index"),
                      ({"dtype": "int8"}, "dtype"), ({"max_inflight": 0}, "max_inflight"),
                      ({"process_index": 1, "process_count": 2, "overwrite": True}, "racy")]:
        with pytest.raises(ValueError, match=match):
            log_gradients(logra, model, data, tmp_path / "s", progress=False, **kw)
    with pytest.raises(ValueError, match="leading"):
        log_gradients(logra, model, {"x": data["x"], "y": data["y"][:10]}, tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match=r"\(ids, batch\)"):
        log_gradients(logra, model, [data, data], tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match="not a jaxval GradientStore|not valid JSON"):
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "manifest.json").write_text("{}")
        log_gradients(logra, model, data, tmp_path / "junk", progress=False)
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("kind", ["kfac", "raw"])
def test_statistics_in_the_same_pass(tmp_path, small, kind):
    model, logra, data = small
    ref = curvature.accumulate(logra, model, data, kind, batch_size=32, progress=False)
    store, st = log_gradients(logra, model, data, tmp_path / "s", batch_size=32, chunk_rows=64, stats=kind,
                              dtype="float32", progress=False)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), st, ref)
    np.testing.assert_array_equal(store.read(), _direct(logra, model, data, 32))
    # on a resume (all rows stored already) the statistics are still those of the whole dataset
    _, st2 = log_gradients(logra, model, data, tmp_path / "s", batch_size=32, stats=kind, dtype="float32",
                           progress=False)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), st2, ref)
    if kind == "kfac":
        pc, pc_ref = (curvature.finalize(x, logra, damping=1e-3) for x in (st2, ref))
        g = store.read(0, 5)
        np.testing.assert_allclose(pc.apply(g), pc_ref.apply(g), rtol=1e-3, atol=1e-5)


def test_mesh_data_parallel_on_4_devices(tmp_path, small):
    """Batches split over a 4-device mesh (one process): same rows and statistics as one device."""
    model, logra, data = small
    code = textwrap.dedent("""
        import sys, warnings, numpy as np, jax
        warnings.simplefilter("ignore")
        sys.path.insert(0, sys.argv[1])
        from conftest import small_mlp
        from jaxval import log_gradients
        model, logra, data = small_mlp()
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        store, st = log_gradients(logra, model, data, sys.argv[2], batch_size=32, chunk_rows=64, dtype="float32",
                                  stats="kfac", mesh=mesh, progress=False)
        np.savez(sys.argv[3], **{k: np.asarray(getattr(st, k)["layers/0"]) for k in ("A", "S", "tokens")},
                 ex=st.examples)
        print(len(jax.devices()))
    """)
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), str(tmp_path / "s"),
                        str(tmp_path / "st.npz")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "4"
    ref = _direct(logra, model, data, 32)
    np.testing.assert_allclose(GradientStore.open(tmp_path / "s").read(), ref, rtol=1e-5, atol=1e-6)
    st = np.load(tmp_path / "st.npz")
    acc = curvature.accumulate(logra, model, data, "kfac", batch_size=32, progress=False)
    assert float(st["ex"]) == 200
    for k in ("A", "S", "tokens"):
        np.testing.assert_allclose(st[k], getattr(acc, k)["layers/0"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ subprocesses

_N, _CR = CRASH_ROWS, 64

_CHILD = textwrap.dedent("""
    import sys, warnings
    warnings.filterwarnings("ignore")
    sys.path.insert(0, sys.argv[1])
    from conftest import crash_setup
    from jaxval import log_gradients
    path, pi, pc = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    model, logra, data, ids = crash_setup()
    print("ready", flush=True)
    log_gradients(logra, model, data, path, batch_size=32, dtype="bfloat16", ids=ids, chunk_rows={cr},
                  process_index=pi, process_count=pc, progress=False,
                  on_block=lambda s, e: print("block", s, e, flush=True))
    print("end", flush=True)
""").format(cr=_CR)


@pytest.fixture(scope="module")
def crash_ref(tmp_path_factory):
    """The uninterrupted single-process run (in this process) and an env for child processes."""
    model, logra, data, ids = crash_setup()
    path = tmp_path_factory.mktemp("ref") / "store"
    store = log_gradients(logra, model, data, path, batch_size=32, dtype="bfloat16", ids=ids, chunk_rows=_CR,
                          progress=False)
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))   # children: compile once
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["XLA_FLAGS"] = xla_flags()
    return {"model": model, "logra": logra, "data": data, "ids": ids, "rows": store.read(), "env": env,
            "path": path}


def _spawn(path, crash_ref, tmp_path, pi=0, pc=1, tag="c"):
    err = open(tmp_path / f"{tag}.err", "wb")
    return subprocess.Popen([sys.executable, "-c", _CHILD, os.path.dirname(__file__), str(path), str(pi), str(pc)],
                            stdout=subprocess.PIPE, stderr=err, env=crash_ref["env"])


def _assert_equals_reference(path, crash_ref):
    s = GradientStore.open(path)
    assert s.is_complete()
    np.testing.assert_array_equal(s.read(), crash_ref["rows"])   # row for row, bit for bit
    assert list(s.ids) == crash_ref["ids"]
    assert s.config_hash == GradientStore.open(crash_ref["path"]).config_hash


def test_sigkill_at_random_points_then_resume_equals_uninterrupted_run(tmp_path, crash_ref):
    path = tmp_path / "store"
    rnd = random.Random(20240611)
    done_after = []
    for k in range(3):
        p = _spawn(path, crash_ref, tmp_path, tag=f"kill{k}")
        target, blocks = rnd.randint(2, 8), 0        # kill after a random number of this run's blocks ...
        while blocks < target:
            line = p.stdout.readline()
            if not line:
                p.wait()
                pytest.fail(f"child ended early (rc {p.returncode}): {(tmp_path / f'kill{k}.err').read_text()}")
            blocks += line.startswith(b"block")
        time.sleep(rnd.uniform(0.0, 0.03))           # ... plus a random fraction of a block: any point
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        assert p.returncode == -signal.SIGKILL       # it was killed mid-run, not finished
        done_after.append(GradientStore.open(path).num_done())
    assert 0 < done_after[0] <= done_after[1] <= done_after[2] < _N, done_after
    assert done_after[2] > done_after[0]             # the resumed runs made progress
    st = GradientStore.open(path)
    pending = st.pending_blocks()
    mask = st.done_mask()
    assert mask.sum() % _CR == 0                     # whole blocks only
    # resume to completion; only the pending blocks are computed
    again = []
    log_gradients(crash_ref["logra"], crash_ref["model"], crash_ref["data"], path, batch_size=32,
                  dtype="bfloat16", ids=crash_ref["ids"], chunk_rows=_CR, progress=False,
                  on_block=lambda s, e: again.append((s, e)))
    assert sorted(again) == pending
    _assert_equals_reference(path, crash_ref)


def test_two_processes_log_disjoint_shards_concurrently(tmp_path, crash_ref):
    path = tmp_path / "store"
    procs = [_spawn(path, crash_ref, tmp_path, pi=i, pc=2, tag=f"p{i}") for i in (1, 0)]   # 1 waits for 0
    outs = {}
    for i, p in zip((1, 0), procs):
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, (tmp_path / f"p{i}.err").read_text()
        outs[i] = [tuple(map(int, l.split()[1:])) for l in out.decode().splitlines() if l.startswith("block")]
    nblocks = _N // _CR
    assert sorted(s // _CR for s, _ in outs[0]) == list(range(0, nblocks, 2))
    assert sorted(s // _CR for s, _ in outs[1]) == list(range(1, nblocks, 2))
    _assert_equals_reference(path, crash_ref)


# ------------------------------------------------------------------------------------ CLI


_CLI_CFG = """
name: tiny_digits
seed: 0
model: {{kind: mlp, sizes: [64, 16, 10], train: {{steps: 30, batch_size: 32, lr: 0.01}}, {model}}}
data: {{kind: digits, split: train, limit: 300}}
logra: {{rank: {rank}, init: gaussian, seed: 0}}
log: {{output: {out}, dtype: bfloat16, batch_size: 32, chunk_rows: 64}}
"""


def test_cli_log_and_info(tmp_path, capsys):
    from jaxval.cli import config as C

    out, ckpt = tmp_path / "digits.store", tmp_path / "model.ckpt"
    cfg_path = tmp_path / "c.yaml"
    # 1) no checkpoint: the model is trained first (and saved, for the next steps)
    cfg_path.write_text(_CLI_CFG.format(rank=4, out=out, model=f"save_trained: {ckpt}"))
    assert cli_main(["log", "--config", str(cfg_path), "--no-progress"]) == 0
    s = GradientStore.open(out)
    assert s.is_complete() and len(s) == 300
    # 2) the same model from its checkpoint: the rerun is a resume with nothing to do (same fingerprint)
    cfg_path.write_text(_CLI_CFG.format(rank=4, out=out, model=f"checkpoint: {ckpt}"))
    model, _, data, ids, logra = C.prepare(C.load_config(cfg_path), progress=False)
    ref = _direct(logra, model, data, 32)
    np.testing.assert_array_equal(s.read(), ref.astype(BF16).astype(np.float32))
    np.testing.assert_array_equal(s.ids, ids)
    assert s.config["extra"]["data"]["kind"] == "digits"
    before = _tree_digest(out)
    assert cli_main(["log", "--config", str(cfg_path), "--no-progress"]) == 0
    assert _tree_digest(out) == before
    capsys.readouterr()
    assert cli_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rows done     300 / 300 (100.0%)" in text and "bfloat16" in text and "layers/0" in text
    assert f"bytes on disk {s.nbytes_on_disk()}" in text
    assert cli_main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows_done"] == 300 and info["bytes_on_disk"] == s.nbytes_on_disk()
    assert info["manifest"]["config_hash"] == s.config_hash
    # 3) another rank: refused with a clear message, store unchanged
    cfg_path.write_text(_CLI_CFG.format(rank=3, out=out, model=f"checkpoint: {ckpt}"))
    assert cli_main(["log", "--config", str(cfg_path), "--no-progress"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert _tree_digest(out) == before
    assert cli_main(["info", str(tmp_path / "nothing")]) == 2
    assert "no GradientStore" in capsys.readouterr().err


def test_shipped_configs_parse():
    from jaxval.cli import config as C

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for name in ("digits_mlp.yaml", "shakespeare_gpt.yaml"):
        cfg = C.load_config(os.path.join(root, name))
        assert cfg["log"]["output"] and cfg["model"]["kind"] in C.MODEL_KINDS
    with pytest.raises(C.ConfigError, match="model.kind"):
        C.normalize_config({"model": {"kind": "resnet"}, "data": {"kind": "digits"}, "log": {"output": "x"}})


# ------------------------------------------------------------------------------------ the log pass as the only model pass

_FIT_CFG = """
name: tiny_digits_fit
seed: 0
model: {{kind: mlp, sizes: [64, 12, 10], train: {{steps: 20, batch_size: 32, lr: 0.01}}}}
data: {{kind: digits, split: train, limit: 160}}
logra: {{rank: 3, init: gaussian, seed: 0}}
log: {{output: {out}, dtype: {dtype}, batch_size: 32, chunk_rows: 64, stats: kfac}}
fit: {{relative_damping: 0.1}}
"""


def _model_pass_reference(cfg_path, out, kind):
    """The model-pass fit with the model `jaxval log` saved beside the store (no retraining)."""
    from jaxval.cli import app
    from jaxval.cli import config as C

    cfg = C.load_config(cfg_path)
    cfg["model"] = dict(cfg["model"], checkpoint=app.model_path(str(out)))
    model, _, data, _, logra = C.prepare(cfg, progress=False)
    return jv.fit_preconditioner(logra, model, data, kind=kind, relative_damping=0.1, batch_size=32, progress=False)


def _no_model_pass(monkeypatch):
    """Any pass through the model (the one compiled step builder) or any retraining raises."""
    from jaxval._src import train as train_mod

    def refuse(*a, **k):
        raise AssertionError("a pass through the model")

    monkeypatch.setattr(jv.LoGra, "compiled_step", refuse)
    monkeypatch.setattr(train_mod, "train", refuse)


@pytest.mark.parametrize("kind", ["ekfac", "kfac", "raw"])
def test_cli_fit_from_logged_statistics_makes_no_model_pass(tmp_path, monkeypatch, kind):
    out, cfg_path = tmp_path / "d.store", tmp_path / "c.yaml"
    cfg_path.write_text(_FIT_CFG.format(out=out, dtype="float32"))
    assert cli_main(["log", "--config", str(cfg_path), "--no-progress"]) == 0
    assert os.path.isdir(f"{out}.model") and os.path.isdir(f"{out}.kfac.stats")
    with monkeypatch.context() as mp:
        _no_model_pass(mp)
        assert cli_main(["fit", "--config", str(cfg_path), "--kind", kind, "--no-progress"]) == 0
    pc = jv.Preconditioner.load(f"{out}.{kind}.precond")
    ref = _model_pass_reference(cfg_path, out, kind)
    g = GradientStore.open(out).read()
    # through H⁻¹G (eigenvectors have sign freedom); float32 rows: the same up to summation order
    assert np.max(np.abs(pc.apply(g) - ref.apply(g))) <= 1e-5 * np.max(np.abs(ref.apply(g)))
    for n in ref.names:
        assert pc.damping[n] == pytest.approx(ref.damping[n], rel=1e-5)


def test_fit_from_bf16_store_is_close_and_fallback_uses_the_saved_model(tmp_path, monkeypatch):
    out, cfg_path = tmp_path / "b.store", tmp_path / "c.yaml"
    cfg_path.write_text(_FIT_CFG.format(out=out, dtype="bfloat16"))
    assert cli_main(["log", "--config", str(cfg_path), "--no-progress"]) == 0
    store = GradientStore.open(out)
    pc = jv.fit_from_store(store, f"{out}.kfac.stats", kind="ekfac", relative_damping=0.1)
    ref = _model_pass_reference(cfg_path, out, "ekfac")
    g = store.read()
    # eigenvalues re-fitted from bfloat16-rounded rows: close, not equal
    err = np.max(np.abs(pc.apply(g) - ref.apply(g))) / np.max(np.abs(ref.apply(g)))
    assert 0 < err <= 5e-3, err   # measured 4.6e-4
    # no statistics: `jaxval fit --kind ekfac` makes the model pass with the saved model, never retrains
    import shutil

    from jaxval._src import train as train_mod

    shutil.rmtree(f"{out}.kfac.stats")
    with monkeypatch.context() as mp:
        mp.setattr(train_mod, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
        assert cli_main(["fit", "--config", str(cfg_path), "--no-progress"]) == 0
    again = jv.Preconditioner.load(f"{out}.ekfac.precond")
    assert np.max(np.abs(again.apply(g) - ref.apply(g))) <= 1e-5 * np.max(np.abs(ref.apply(g)))


def test_statistics_refuse_another_store(tmp_path, small):
    model, logra, data = small
    a, st = log_gradients(logra, model, data, tmp_path / "a", batch_size=32, stats="kfac", dtype="float32",
                          progress=False)
    assert isinstance(st, jv.KFACState)
    jv.save_statistics(str(tmp_path / "a.stats"), st, a)
    back = jv.load_statistics(str(tmp_path / "a.stats"), a)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, st)
    b = log_gradients(logra, model, {k: v[:100] for k, v in data.items()}, tmp_path / "b", batch_size=32,
                      dtype="float32", progress=False)
    with pytest.raises(StoreError, match="another store"):
        jv.fit_from_store(b, str(tmp_path / "a.stats"), kind="kfac")
    with pytest.raises(ValueError, match="stats='kfac'"):
        jv.fit_from_store(b, None, kind="ekfac")
