"""Scale-out: 2 processes × 2 CPU devices on 127.0.0.1 (jax.distributed) log, fit and score a small model
exactly like one process; a process that dies mid-run is reported and a rerun resumes; no process is left.

Every launch has a hard timeout (the launcher kills its children's process groups), so the module stays
bounded even on a loaded 2-core machine (the limits are generous: on a busy CI box JAX alone can take 40 s to start).
"""

import io
import json
import os
import sys
import textwrap
import time

import numpy as np
import pytest

import jaxval as jv
from jaxval import distributed as dist
from conftest import rel_err

SETUP = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import jaxval as jv

    class MLP2(nnx.Module):
        def __init__(self, rngs, d=8, h=6, c=3):
            self.l1 = nnx.Linear(d, h, rngs=rngs)
            self.l2 = nnx.Linear(h, c, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    def ce_loss(m, b):
        return -jax.nn.log_softmax(m(b["x"]))[jnp.arange(b["y"].shape[0]), b["y"]]

    rng = np.random.default_rng(0)
    N = 96
    data = {"x": rng.normal(size=(N, 8)).astype(np.float32), "y": rng.integers(0, 3, N).astype(np.int32)}
    qdata = {"x": rng.normal(size=(5, 8)).astype(np.float32), "y": rng.integers(0, 3, 5).astype(np.int32)}
    model = MLP2(nnx.Rngs(0))
    logra = jv.LoGra(model, ce_loss, rank=4, seed=0)
    LOG = dict(batch_size=8, dtype="float32", chunk_rows=16)
    FIT = dict(kind="ekfac", damping=0.1, batch_size=32)
''')

WORKER = textwrap.dedent('''
    import json, os, sys, time
    T0 = time.time()
    from jaxval import distributed as dist
    topo = dist.initialize(timeout=180)         # from the JAXVAL_* env vars set by the launcher
''') + SETUP + textwrap.dedent('''
    from jaxval import GradientStore
    out = sys.argv[1]
    # count this process's store writes; optionally die right after its first block is marked done
    crash = int(os.environ.get("CRASH_PROCESS", "-1")) == jax.process_index()
    writes = [0]
    _write, _mark = GradientStore.write, GradientStore.mark_done
    def write(self, *a, **k):
        writes[0] += 1
        return _write(self, *a, **k)
    def mark_done(self, *a, **k):
        _mark(self, *a, **k)
        if crash:
            print("simulated crash", flush=True)
            os._exit(3)
    GradientStore.write, GradientStore.mark_done = write, mark_done
    print(f"init {time.time() - T0:.1f}s", flush=True)

    path = os.path.join(out, "store")
    jv.log_gradients(logra, model, data, path, progress=False, **LOG)
    with open(os.path.join(out, f"writes_{topo.process_index}.json"), "w") as f:
        json.dump({"writes": writes[0]}, f)
    print(f"logged {time.time() - T0:.1f}s", flush=True)
    store = GradientStore.open(path)
    G = store.read(0, len(store))
    q = np.asarray(logra.grads(model, qdata))
    pc = jv.fit_preconditioner(logra, model, data, progress=False, **FIT)   # the global mesh: every process
    print(f"fitted {time.time() - T0:.1f}s", flush=True)
    res = {"store": G, "done": store.done_mask().astype(np.int64), "HG": np.asarray(pc.apply(G)),
           "eig": np.concatenate([pc.eigenvalues(n) for n in pc.names]),
           "scores": jv.influence(q, store, precond=pc, logra=logra, model=model, mode="dot"),      # rows split across the processes
           "cos": jv.influence(q, store, precond=pc, logra=logra, model=model, mode="cosine"),
           "self": jv.self_influence(store, pc, mesh=dist.global_mesh())}
    res["psum"] = dist.sum_across_processes({"a": np.full((3, 2), jax.process_index() + 1.0, np.float32),
                                              "n": np.int64(jax.process_index() + 1)})["a"]
    res["topv"], res["topi"] = jv.top_k(q, store, k=5, precond=pc, logra=logra, model=model, mode="dot")
    res["botv"], res["boti"] = jv.top_k(q, store, k=70, precond=pc, logra=logra, model=model, mode="l2", largest=False)   # k > rows per process
    dist.write_once(os.path.join(out, f"result_{topo.process_count}.npz"), lambda p: np.savez(p, **res))
    print(f"worker done {time.time() - T0:.1f}s", flush=True)
''')


def reference(tmp):
    """The one-process, one-device run with the plain library (in this pytest process)."""

    ns = {}
    exec(SETUP, ns)
    logra, model, data = ns["logra"], ns["model"], ns["data"]
    store = jv.log_gradients(logra, model, data, str(tmp / "store"), progress=False, **ns["LOG"])
    G = store.read(0, len(store))
    assert np.allclose(G, np.asarray(logra.grads(model, data)), rtol=1e-5, atol=1e-6)   # batch 8 vs 96: float order
    pc = jv.fit_preconditioner(logra, model, data, progress=False, **ns["FIT"])
    pc1 = jv.fit_preconditioner(logra, model, data, mesh=dist.global_mesh(), progress=False, **ns["FIT"])
    q = np.asarray(logra.grads(model, ns["qdata"]))
    v, i = jv.top_k(q, store, k=5, precond=pc, logra=logra, model=model, mode="dot")
    bv, bi = jv.top_k(q, store, k=70, precond=pc, logra=logra, model=model, mode="l2", largest=False)
    return {"store": G, "HG": np.asarray(pc.apply(G)), "HG1": np.asarray(pc1.apply(G)),
            "eig": np.concatenate([pc.eigenvalues(n) for n in pc.names]),
            "scores": np.asarray(jv.influence(q, store, precond=pc, logra=logra, model=model, mode="dot")),
            "cos": jv.influence(q, store, precond=pc, logra=logra, model=model, mode="cosine"), "self": jv.self_influence(store, pc),
            "scores1": jv.influence(q, store, precond=pc1, logra=logra, model=model, mode="dot"), "topv": np.asarray(v), "topi": np.asarray(i),
            "botv": bv, "boti": bi}


def live_in_group(pgid, wait=5.0):
    """Pids of processes in process group ``pgid`` that are not zombies (polled up to ``wait`` s, since a
    SIGKILLed process disappears asynchronously)."""
    deadline = time.monotonic() + wait
    while True:
        live = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    stat = open(f"/proc/{d}/stat").read()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()      # state, ppid, pgrp, ...
                if int(fields[2]) == pgid and fields[0] != "Z":
                    live.append(int(d))
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.1)


def run(n, out, timeout, **env):
    buf = io.StringIO()
    e = {k: v for k, v in os.environ.items() if k not in ("CRASH_PROCESS", "CRASH_AFTER_WRITES")}
    e.update({k: str(v) for k, v in env.items()})
    e["JAX_PLATFORMS"] = "cpu"
    codes = dist.launch(n, [sys.executable, str(out / "worker.py"), str(out)], timeout=timeout, local_devices=2,
                        env=e, out=buf)
    for pid in codes.pids:  # every child and its process group is gone
        assert live_in_group(pid) == [], pid
    return codes, buf.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    two = tmp_path_factory.mktemp("two")
    (two / "worker.py").write_text(WORKER)
    # process 1 dies right after its first block is marked done (the other blocks are not)
    codes_crash, log_crash = run(2, two, timeout=240, CRASH_PROCESS=1)  # generous: a loaded 2-core CI box
    from jaxval import GradientStore

    done_after_crash = GradientStore.open(str(two / "store")).done_mask()
    codes2, log2 = run(2, two, timeout=300)                # the rerun resumes
    assert list(codes2) == [0, 0], log2
    ref = reference(tmp_path_factory.mktemp("one"))
    return {"ref": ref, "two": two, "crash": (codes_crash, log_crash), "log2": log2,
            "done_after_crash": done_after_crash}


def test_one_process_global_mesh_matches_the_plain_library(runs):
    r = runs["ref"]
    assert rel_err(r["HG1"], r["HG"]) < 1e-5
    assert rel_err(r["scores1"], r["scores"]) < 1e-5


def test_two_processes_equal_one_process(runs):
    a, b = runs["ref"], np.load(runs["two"] / "result_2.npz")
    assert b["done"].all()
    assert rel_err(b["store"], a["store"]) < 1e-5
    assert rel_err(b["HG"], a["HG"]) < 1e-5
    assert rel_err(b["eig"], a["eig"]) < 1e-5
    assert rel_err(b["scores"], a["scores"]) < 1e-5
    assert rel_err(b["cos"], a["cos"]) < 1e-5 and rel_err(b["self"], a["self"]) < 1e-5
    assert rel_err(b["botv"], a["botv"]) < 1e-5
    np.testing.assert_array_equal(b["boti"], a["boti"])
    assert rel_err(b["topv"], a["topv"]) < 1e-5
    np.testing.assert_array_equal(b["topi"], a["topi"])
    np.testing.assert_array_equal(b["psum"], np.full((3, 2), 3.0))          # 1 + 2 over the two processes
    assert "[p0] worker done" in runs["log2"] and "[p1] worker done" in runs["log2"]


def test_crash_is_reported_and_rerun_resumes(runs):
    codes, log = runs["crash"]
    assert codes[1] == 3, log
    assert codes[0] != 0, log                   # the survivor was stopped, not left waiting in a collective
    assert "[launch] process 1" in log and "exited with code 3" in log
    assert "[p1] simulated crash" in log
    # 96 rows = 6 chunks of 16; process p owns chunks p, p+2, p+4. Process 1 died right after finishing
    # its first chunk: that chunk survived, and the rerun wrote exactly the chunks not done, each by its owner
    chunk_done = runs["done_after_crash"].reshape(6, 16)
    assert (chunk_done.all(1) == chunk_done.any(1)).all()        # whole chunks only
    assert chunk_done[1].all() and not chunk_done.all()
    for p in (0, 1):
        pending = [c for c in range(p, 6, 2) if not chunk_done[c].all()]
        assert json.loads((runs["two"] / f"writes_{p}.json").read_text())["writes"] == len(pending), p


def test_launcher_stops_everything_on_timeout(tmp_path):
    buf = io.StringIO()
    codes = dist.launch(2, [sys.executable, "-c", "import time, subprocess, sys; "
                            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                            "print('up', flush=True); time.sleep(60)"], timeout=3, out=buf, grace=1)
    assert all(c is not None and c < 0 for c in codes), codes
    assert "timeout" in buf.getvalue() and "[p1] up" in buf.getvalue()
    for pid in codes.pids:                      # grandchildren too: the whole process group is gone
        assert live_in_group(pid) == [], pid


def test_ownership_and_startup_helpers(monkeypatch):
    blocks = [dist.owned_blocks(100, 16, p, 3) for p in range(3)]
    flat = sorted(b for bs in blocks for b in bs)
    assert flat == [(s, min(s + 16, 100)) for s in range(0, 100, 16)]           # disjoint, complete, aligned
    assert blocks[1] == [(16, 32), (64, 80)]                                    # round-robin, as the pipeline
    rs = [dist.owned_range(10, p, 4) for p in range(4)]
    assert rs[0][0] == 0 and rs[-1][1] == 10 and all(a[1] == b[0] for a, b in zip(rs, rs[1:]))
    monkeypatch.setenv(dist.ENV_NUM_PROCESSES, "2")
    monkeypatch.delenv(dist.ENV_COORDINATOR, raising=False)
    monkeypatch.delenv(dist.ENV_PROCESS_ID, raising=False)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="coordinator"):
            dist.initialize()


def test_xla_flags_keep_the_parents_settings_and_set_one_device_count():
    parent = "--xla_foo=1 --xla_force_host_platform_device_count=8 --xla_bar=true"
    assert dist.xla_flags(4, parent).split() == ["--xla_foo=1", "--xla_bar=true",
                                                 "--xla_force_host_platform_device_count=4"]
    assert dist.xla_flags(None, parent).split() == ["--xla_foo=1", "--xla_bar=true"]
    assert dist.xla_flags(2, "") == "--xla_force_host_platform_device_count=2"
