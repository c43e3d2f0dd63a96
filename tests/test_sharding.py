"""Parameters sharded over a (data 2 × model 4) mesh give the one-device results, on one process with 8
simulated CPU devices and on 2 processes × 4 devices under ``jax.distributed``.

A tiny GPT (``jaxval.models.gpt``) has every parameter that can be split placed over the mesh's ``model``
axis (``jaxval.distributed.shard_params``), and its batches over ``data``. Its LoGra gradients, logged
rows, EK-FAC preconditioner (compared through ``H⁻¹G``: eigenvectors have sign freedom), dot and cosine
scores and top-k must equal the one-device run of the same weights (and the gradients an explicit
``vmap(grad)``), its parameters must stay sharded through every stage, and the compiled step's per-device
argument bytes must be well below the full parameters. A regression test covers the shard_map trap of
NOTES.md: a zero created as a constant is device-invariant, so its cotangent is summed across devices.

The device work runs in subprocesses (the device count is fixed when JAX starts), each with a hard timeout.
"""

import io
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jaxval import distributed as dist

TOL = 1e-5   # relative (max |a - b| / max |b|): float summation order only

SETUP = textwrap.dedent('''
    import json, os, resource, sys, time, warnings
    T0 = time.time()
    warnings.filterwarnings("ignore", message="jaxval: parameters")   # LayerNorms are not LoGra layers
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils
    import jaxval as jv
    from jaxval import distributed as dist
    from jaxval.models import gpt

    CFG = gpt.GPTConfig(vocab_size=32, block_size=8, d_model=8, n_layer=1, n_head=2, d_mlp=16)
    N, T, K = 32, 8, 5
    rng = np.random.default_rng(0)

    def lm_batch(n):
        tokens = rng.integers(0, CFG.vocab_size, (n, T)).astype(np.int32)
        mask = (np.arange(T)[None] < rng.integers(3, T + 1, n)[:, None]).astype(np.float32)   # right padding
        return {"tokens": tokens, "mask": mask}

    data, qdata = lm_batch(N), lm_batch(N)     # queries: other sequences, the same shape (one compile)
    LOGRA = dict(rank=4, seed=0)
    LOG = dict(batch_size=16, dtype="float32", chunk_rows=16, progress=False)
    FIT = dict(kind="ekfac", damping=0.1, batch_size=16, progress=False)
    # uneven work across 2 processes: 3 chunks of 8 rows, process 0 owns chunks 0 and 2 (4 batches of 4),
    # process 1 chunk 1 (2 batches, then 2 padding steps); K-FAC statistics in the same pass
    SUB = 24
    sub = {k: v[:SUB] for k, v in data.items()}
    UNEVEN = dict(batch_size=4, dtype="float32", chunk_rows=8, progress=False, stats="kfac")

    def flat_stats(state, tag="kfac"):
        return {tag + jax.tree_util.keystr(p): np.asarray(v)
                for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}

    def build():
        """The GPT with seeded numpy weights (the same on every process; no eager per-leaf init compiles)."""
        model = nnx.eval_shape(lambda: gpt.GPT(CFG, rngs=nnx.Rngs(0)))
        w = np.random.default_rng(1)
        nnx.update(model, jax.tree.map(lambda s: jnp.asarray(w.normal(0, 0.5, s.shape).astype(s.dtype)),
                                       nnx.state(model)))
        return model

    def gather(x):
        """Host copy of a (possibly multi-process) global array."""
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def leaves(model):
        return [("/".join(map(str, p)), v[...]) for p, v in nnx.to_flat_state(nnx.state(model))]

    def shardings(model):
        return {p: x.sharding for p, x in leaves(model)}

    def tick(msg):
        r = resource.getrusage(resource.RUSAGE_SELF)
        print(f"{time.time() - T0:6.1f}s wall {r.ru_utime + r.ru_stime:6.1f}s cpu  {msg}", flush=True)

    def pipeline(logra, model, mesh, path):
        """Every stage on ``model`` with ``mesh=`` (None: one device), yielding after each stage."""
        put = (lambda b: b) if mesh is None else (lambda b: dist.global_batch(b, mesh))
        out = {"G": gather(logra.grads(model, put(data))), "q": gather(logra.grads(model, put(qdata)))}
        yield "grads", out
        store = jv.log_gradients(logra, model, data, path, mesh=mesh, **LOG)
        out["rows"] = store.read(0, len(store))
        yield "log", out
        pc = jv.fit_preconditioner(logra, model, data, mesh=mesh, **FIT)
        out["HG"] = np.asarray(pc.apply(out["rows"]))
        yield "fit", out
        for mode in ("dot", "cosine"):
            out[mode] = np.asarray(jv.influence(out["q"], store, precond=pc, logra=logra, model=model, mode=mode, mesh=mesh))
        v, i = jv.top_k(out["q"], store, k=K, precond=pc, logra=logra, model=model, mode="dot", mesh=mesh)
        out["topv"], out["topi"] = np.asarray(v), np.asarray(i)
        yield "score", out
''')

# One process, 8 devices: the one-device reference, the sharded run, the checks that need live arrays
SINGLE = SETUP + textwrap.dedent('''
    from jax.sharding import PartitionSpec as P
    out_dir = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    tick("start")

    # the one-device reference: LoGra's grads and EK-FAC fit, then scores and top-k in float64 numpy
    ref_model = build()
    logra = jv.LoGra(ref_model, gpt.loss_fn, **LOGRA)   # reads the weights of the model it is given
    G, q = np.asarray(logra.grads(ref_model, data)), np.asarray(logra.grads(ref_model, qdata))
    pc = jv.fit_preconditioner(logra, ref_model, data, **FIT)
    HG, Hq = (np.asarray(pc.apply(x), np.float64) for x in (G, q))
    dot = Hq @ G.T
    cosine = dot / np.sqrt((q * Hq).sum(1))[:, None] / np.sqrt((G * HG).sum(1))[None, :]
    topi = np.argsort(-dot, axis=1, kind="stable")[:, :K]
    ref = {"G": G, "q": q, "rows": G, "HG": HG, "dot": dot, "cosine": cosine, "topi": topi,
           "topv": np.take_along_axis(dot, topi, 1)}
    # the K-FAC sums of the first SUB examples from the fit driver (not log_gradients), one device
    ref.update(flat_stats(jv.curvature.accumulate(logra, ref_model, sub, "kfac", batch_size=8, progress=False)))
    tick("reference")
    gd = nnx.graphdef(ref_model)
    explicit = jax.jit(lambda st, b: jv.explicit_grads(nnx.merge(gd, st), gpt.loss_fn, logra.projections, b))
    ref["explicit"] = np.asarray(explicit(nnx.state(ref_model), data))
    tick("explicit vmap(grad)")
    np.savez(os.path.join(out_dir, "reference.npz"), **ref)

    mesh = dist.make_mesh(data=2, model=4)
    model = dist.shard_params(build(), mesh)
    before = shardings(model)
    res = {"split": np.array([any(a == "model" for a in x.sharding.spec) for _, x in leaves(model)]),
           "splittable": np.array([any(n % 4 == 0 for n in x.shape) for _, x in leaves(model)]),
           "addressable": np.array([len({s.device for s in x.addressable_shards}) for _, x in leaves(model)])}
    kept = []
    for stage, out in pipeline(logra, model, mesh, os.path.join(out_dir, "sharded.store")):
        kept.append(shardings(model) == before)
        tick(f"sharded {stage}")
    res.update(out)
    res["kept"] = np.array(kept)

    # the compiled step's per-device argument bytes against the full parameter bytes: the very step
    # logra.grads ran (its compilation is cached); its arguments are the state, the device's batch rows and
    # the projections (replicated, each device holds them all: subtracted, they do not scale with the model)
    step, state = logra.step_for(model)
    compiled = step.lower(state, dist.global_batch(data, mesh), logra.projections).compile()
    full = sum(x.nbytes for _, x in leaves(model))
    proj = sum(x.nbytes for x in jax.tree.leaves(logra.projections))
    res["arg_fraction"] = (compiled.memory_analysis().argument_size_in_bytes - proj) / full
    res["shard_fraction"] = sum(x.addressable_shards[0].data.nbytes for _, x in leaves(model)) / full
    tick("memory analysis")

    # NOTES.md trap: LoGra's step called inside shard_map with the batch split over all 8 devices. A zero
    # perturbation created as a constant is device-invariant and its cotangent would be summed across
    # devices (wpe's input, the positions, is a constant too)
    inside = jax.shard_map(lambda b: logra.grads(ref_model, b), mesh=mesh, in_specs=(P(("data", "model")),),
                           out_specs=P(("data", "model")))
    res["shard_map"] = np.asarray(jax.jit(inside)(data))
    tick("shard_map")
    np.savez(os.path.join(out_dir, "sharded.npz"), **res)
    tick("done")
''')

# Two processes × 4 devices: the same sharded stages over one global (data 2 × model 4) mesh. Each stage
# runs even if an earlier one raised (scores then use the gradients instead of the store), and its error is
# recorded, so the parent test reports every stage that does not work across processes yet.
WORKER = SETUP + textwrap.dedent('''
    import traceback
    out_dir = sys.argv[1]
    topo = dist.initialize(timeout=60)          # from the JAXVAL_* variables set by the launcher
    assert (topo.process_count, jax.local_device_count(), jax.device_count()) == (2, 4, 8), topo
    tick("initialized")
    mesh = dist.make_mesh(data=2, model=4)
    model = dist.shard_params(build(), mesh)
    before = shardings(model)
    logra = jv.LoGra(model, gpt.loss_fn, **LOGRA)
    out, errors, kept = {}, {}, []

    def stage(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded for the parent test
            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {e}"[:2000]
        kept.append(shardings(model) == before)
        tick(name + (" FAILED" if name in errors else ""))
        dist.barrier(name)

    def grads():
        out["G"] = gather(logra.grads(model, dist.global_batch(data, mesh)))
        out["q"] = gather(logra.grads(model, dist.global_batch(qdata, mesh)))

    def log():
        out["store"] = jv.log_gradients(logra, model, data, os.path.join(out_dir, "two.store"), mesh=mesh, **LOG)
        out["rows"] = out["store"].read(0, len(out["store"]))
        path = os.path.join(out_dir, "uneven.store")
        store, st = jv.log_gradients(logra, model, sub, path, mesh=mesh, **UNEVEN)
        out["uneven_rows"] = store.read(0, len(store))
        out.update(flat_stats(st))
        # again on the complete store (a resume): nothing to write, the statistics recomputed from every row
        _, st = jv.log_gradients(logra, model, sub, path, mesh=mesh, **UNEVEN)
        out.update(flat_stats(st, "resumed"))
        # a resume whose pending work differs per process: process 1's only chunk (rows 16-24) is already done
        # (written here with sentinel rows), so it runs a padding step only while process 0 logs chunk 0
        # (LOG's batch shape: the step compiled above)
        from jaxval._src.logging import store_config
        path, cfg = os.path.join(out_dir, "partial.store"), store_config(logra, model, "float32")
        if jax.process_index() == 0:
            pre = jv.GradientStore.create(path, dim=logra.dim, num_rows=SUB, dtype="float32", chunk_rows=16,
                                          config=cfg)
            pre.write(16, np.full((8, logra.dim), 7.0, np.float32), mark_done=True)
        dist.barrier("partial store")
        store = jv.log_gradients(logra, model, sub, path, mesh=mesh, **LOG)
        out["partial_rows"] = store.read(0, len(store))

    def fit():
        out["pc"] = jv.fit_preconditioner(logra, model, data, mesh=mesh, **FIT)
        out["HG"] = np.asarray(out["pc"].apply(out["G"]))

    def score():
        train, pc = out.get("store", out["G"]), out.get("pc")
        for mode in ("dot", "cosine"):
            out[mode] = np.asarray(jv.influence(out["q"], train, precond=pc, logra=logra, model=model, mode=mode, mesh=mesh))
        v, i = jv.top_k(out["q"], train, k=K, precond=pc, logra=logra, model=model, mode="dot", mesh=mesh)
        out["topv"], out["topi"] = np.asarray(v), np.asarray(i)

    for name, fn in (("grads", grads), ("log", log), ("fit", fit), ("score", score)):
        stage(name, fn)
    res = {k: v for k, v in out.items() if isinstance(v, np.ndarray)}
    res["kept"] = np.array(kept)
    res["split"] = np.array([any(a == "model" for a in x.sharding.spec) for _, x in leaves(model)])
    res["global"] = np.array([not x.is_fully_addressable for _, x in leaves(model)])
    res["errors"] = np.array(json.dumps(errors))
    res["used_store"], res["used_pc"] = np.array("store" in out), np.array("pc" in out)
    dist.write_once(os.path.join(out_dir, "two.npz"), lambda p: np.savez(p, **res))
    tick("worker done")
''')


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def env_for(devices: int | None) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("JAXVAL_")}
    e.update(XLA_FLAGS=dist.xla_flags(devices or None), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return e


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    (out / "single.py").write_text(SINGLE)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(out / "single.py"), str(out)], capture_output=True, text=True,
                       env=env_for(8), timeout=420)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    print(r.stdout, f"single process: {time.monotonic() - t0:.1f} s")
    return {"ref": dict(np.load(out / "reference.npz")), "res": dict(np.load(out / "sharded.npz"))}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    (out / "worker.py").write_text(WORKER)
    buf = io.StringIO()
    t0 = time.monotonic()
    codes = dist.launch(2, [sys.executable, str(out / "worker.py"), str(out)], timeout=300, local_devices=4,
                        env=env_for(None), out=buf)
    log = buf.getvalue()
    print(log, f"two processes: {time.monotonic() - t0:.1f} s")
    return {"codes": list(codes), "log": log, "res": dict(np.load(out / "two.npz")) if (out / "two.npz").exists()
            else None}


def check_equal_to_reference(res, ref):
    """Every stage's output of a sharded run against the one-device run."""
    for key in ("G", "q", "rows", "HG", "dot", "cosine", "topv"):
        assert rel(res[key], ref[key]) < TOL, (key, rel(res[key], ref[key]))
    np.testing.assert_array_equal(res["topi"], ref["topi"])
    assert np.abs(res["cosine"]).max() <= 1 + 1e-5 and np.abs(ref["dot"]).max() > 0


def test_one_device_reference_matches_explicit_vmap_grad(single):
    ref = single["ref"]
    assert np.abs(ref["explicit"]).max() > 0
    assert rel(ref["G"], ref["explicit"]) < TOL


def test_sharded_params_on_8_devices_equal_one_device(single):
    res, ref = single["res"], single["ref"]
    # every parameter with a dimension divisible by 4 is split over `model`, and no device holds all of it
    np.testing.assert_array_equal(res["split"], res["splittable"])
    assert res["split"].all()
    assert (res["addressable"] == 8).all()
    assert rel(res["G"], ref["explicit"]) < TOL            # independent reference: vmap(grad), one device
    check_equal_to_reference(res, ref)


def test_sharded_params_keep_their_sharding_and_memory(single):
    res = single["res"]
    assert res["kept"].shape == (4,) and res["kept"].all()       # after grads, log, fit, scores
    # each device holds 1/4 of the parameters (replicated over `data`); the compiled step's arguments
    # (state + the device's batch rows) stay well below the full parameter bytes (0.35 here)
    assert abs(float(res["shard_fraction"]) - 0.25) < 1e-9, res["shard_fraction"]
    assert 0.25 <= float(res["arg_fraction"]) < 0.5, res["arg_fraction"]


def test_per_example_grads_inside_shard_map(single):
    """Regression (NOTES.md): inside shard_map a constant zero perturbation is device-invariant and its
    cotangent is summed over the devices: wrong per-example gradients (by ~1.3x here), no error."""
    res, ref = single["res"], single["ref"]
    assert rel(res["shard_map"], ref["explicit"]) < TOL


def two_processes(two) -> tuple[dict, dict]:
    assert two["codes"] == [0, 0], two["log"][-6000:]
    assert "[p0]" in two["log"] and "[p1]" in two["log"] and "worker done" in two["log"]
    return two["res"], json.loads(str(two["res"]["errors"]))


def test_two_processes_sharded_params_and_grads(two, single):
    res, errors = two_processes(two)
    assert "grads" not in errors, errors["grads"]
    assert res["split"].all() and res["global"].all()    # global arrays split over both processes' devices
    assert res["kept"].shape == (4,) and res["kept"].all()   # after every stage, failed ones included
    for key in ("G", "q"):
        assert rel(res[key], single["ref"][key]) < TOL, key
    assert rel(res["G"], single["ref"]["explicit"]) < TOL


def test_two_processes_log_into_one_store(two, single):
    res, errors = two_processes(two)
    assert "log" not in errors, errors["log"]
    ref = single["ref"]
    assert rel(res["rows"], ref["rows"]) < TOL
    # uneven work (one process pads with repeats of its last batch): rows, and the K-FAC sums counted once
    # per real row (global sums: the fit driver's on one device), on a fresh store and on a resume
    assert rel(res["uneven_rows"], ref["rows"][:24]) < TOL
    part = res["partial_rows"]      # resumed with only process 0's chunk pending: the done chunk is kept
    assert (part[16:] == 7.0).all() and rel(part[:16], ref["rows"][:16]) < TOL
    keys = sorted(k for k in ref if k.startswith("kfac"))
    assert len(keys) > 4 and float(ref["kfac.examples"]) == 24
    for key in keys:
        for got in (res[key], res["resumed" + key[4:]]):
            assert rel(got, ref[key]) < TOL, (key, got, ref[key])


def test_two_processes_ekfac_fit(two, single):
    res, errors = two_processes(two)
    assert "fit" not in errors, errors["fit"]
    assert rel(res["HG"], single["ref"]["HG"]) < TOL


def test_two_processes_scores_and_top_k(two, single):
    res, errors = two_processes(two)
    assert "score" not in errors, errors["score"]
    assert bool(res["used_pc"]), errors                 # scored with the two-process EK-FAC fit
    ref = single["ref"]
    for key in ("dot", "cosine", "topv"):
        assert rel(res[key], ref[key]) < TOL, key
    np.testing.assert_array_equal(res["topi"], ref["topi"])
