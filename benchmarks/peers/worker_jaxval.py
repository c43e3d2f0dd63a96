"""jaxval side of the peer benchmark (run under jaxval's venv; driven by run.py over stdin/stdout)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jaxval as jv  # noqa: E402
from jaxval import GradientStore  # noqa: E402
from jaxval import influence as jv_influence  # noqa: E402
from jaxval.evaluation.baselines import ekfac_streamed_scores, streamed_scores  # noqa: E402
from jaxval import fit_preconditioner  # noqa: E402
from jaxval.models import llama, mlp, token_mlp  # noqa: E402
from jaxval._src.train import train_step_fn  # noqa: E402

import common  # noqa: E402

S: dict = {}


def _block(x):
    return jax.block_until_ready(x)


def setup(workload, weights, rank=64, n_log=128, n_score=1024, q=64, seed=0, compute_dtype=None):
    w = common.WORKLOADS[workload]
    if w["kind"] == "token":
        model = token_mlp.TokenMLP(w["vocab"], w["d"], w["n_block"], w["hidden"], rngs=nnx.Rngs(seed))
        loss_fn = token_mlp.loss_fn
    elif w["kind"] == "llama":
        model, _ = llama.load_smollm2()
        loss_fn = llama.loss_fn
        with open(weights + ".json", "w") as f:       # architecture for the torch twin
            json.dump(dataclasses.asdict(model.cfg), f)
    else:
        model = mlp.MLP(w["sizes"], rngs=nnx.Rngs(seed))
        loss_fn = mlp.loss_fn
    flat = {"/".join(str(p) for p in path): np.asarray(v.value)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    np.savez(weights, **flat)
    logra = jv.LoGra(model, loss_fn, rank=rank, layers=w.get("layers"), types=(nnx.Linear,),
                     compute_dtype=compute_dtype)
    graphdef, state = nnx.split(model)
    state = logra.step_state(model, state)       # Linear kernels pre-cast once with compute_dtype
    step = logra.compiled_step(graphdef)
    train = train_step_fn(model, loss_fn)
    log_b = [jax.tree.map(jnp.asarray, b) for b in common.batches(workload, n_log, seed=1)]
    score_b = [jax.tree.map(jnp.asarray, b) for b in common.batches(workload, n_score, seed=2)]
    q_b = [jax.tree.map(jnp.asarray, b) for b in common.batches(workload, q, seed=3, split="test")]
    S.update(workload=workload, model=model, loss_fn=loss_fn, logra=logra, state=state, step=step,
             train=train, tstate=nnx.state(model), log_b=log_b, score_b=score_b, q_b=q_b)
    t0 = time.perf_counter()
    g, losses, _ = _block(step(state, log_b[0], logra.projections))
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    _block(train(S["tstate"], log_b[0]))
    t_compile_train = time.perf_counter() - t0
    return {"dim": logra.dim, "params": int(sum(x.size for x in flat.values())),
            "layers": [l.name for l in logra.layers], "loss0": float(jnp.sum(losses)),
            "compile_logra_s": t_compile, "compile_train_s": t_compile_train,
            "jax": jax.__version__, "devices": str(jax.devices())}


def train(n=4):
    ts = []
    for i in range(n):
        b = S["log_b"][i % len(S["log_b"])]
        t0 = time.perf_counter()
        _block(S["train"](S["tstate"], b))
        ts.append(time.perf_counter() - t0)
    return {"times": ts}


def grads(n=4):
    ts = []
    for i in range(n):
        b = S["log_b"][i % len(S["log_b"])]
        t0 = time.perf_counter()
        _block(S["step"](S["state"], b, S["logra"].projections))
        ts.append(time.perf_counter() - t0)
    return {"times": ts}


def _log(batches, path, dtype="bfloat16"):
    n = sum(int(next(iter(b.values())).shape[0]) for b in batches)
    logra = S["logra"]
    store = GradientStore.create(path, logra.dim, n, dtype=dtype, config=logra.config(), overwrite=True)
    start = 0
    pending = None
    for b in batches:
        g, _, _ = S["step"](S["state"], b, logra.projections)
        if pending is not None:            # write the previous block while this one computes
            store.write(pending[0], np.asarray(pending[1]), mark_done=True)
        pending = (start, g)
        start += int(g.shape[0])
    store.write(pending[0], np.asarray(pending[1]), mark_done=True)
    return store, n


def log(path, dtype="bfloat16"):
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    store, n = _log(S["log_b"], path, dtype)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "n": n, "examples_per_s": n / dt, "disk_bytes": common.du(path),
            "apparent_bytes": common.apparent(path), "bytes_per_example": common.du(path) / n}


def score_prep(path, dtype="bfloat16"):
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    store, n = _log(S["score_b"], path, dtype)
    dt = time.perf_counter() - t0
    gq = jnp.concatenate([S["step"](S["state"], b, S["logra"].projections)[0] for b in S["q_b"]])
    S["gq"], S["store_path"] = _block(gq), path
    return {"seconds": dt, "n": n, "examples_per_s": n / dt, "bytes_per_example": common.du(path) / n}


def score(mode="dot"):
    store = GradientStore.open(S["store_path"])
    t0 = time.perf_counter()
    s = np.asarray(jv_influence(S["gq"], store, mode=mode, progress=False, unchecked=True))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "shape": list(s.shape), "checksum": float(np.abs(s).sum())}


# ----------------------------------------------------------------------------- un-projected EK-FAC
# (the Kronfluence comparison, run_kronfluence.py): jaxval.baselines.ekfac_scores split into its timed parts

def ekfac_prep(n=2048, q=64):
    """Identity "projections" (rank None: exact per-layer factors) on every Linear; N training examples
    (seed 1: the Kronfluence worker's), Q test queries (seed 3)."""
    w = common.WORKLOADS[S["workload"]]
    lg = jv.LoGra(S["model"], S["loss_fn"], rank=None, init="identity", layers=w.get("layers"), types=(nnx.Linear,))
    train_b = [jax.tree.map(jnp.asarray, b) for b in common.batches(S["workload"], n, seed=1)]
    q_b = [jax.tree.map(jnp.asarray, b) for b in common.batches(S["workload"], q, seed=3, split="test")]
    S.update(ek_logra=lg, ek_train=train_b, ek_q=q_b, ek_batch=w["batch"])
    loss0 = float(jnp.sum(S["loss_fn"](S["model"], train_b[0])))
    return {"dim": lg.dim, "n": sum(int(b["y"].shape[0]) for b in train_b),
            "q": sum(int(b["y"].shape[0]) for b in q_b), "loss0": loss0,
            "layers": [[l.name, l.k_in, l.k_out] for l in lg.layers]}


def ekfac_fit(relative_damping=0.1, damping=None, fisher="empirical", warm=False):
    """``warm``: on the first training batch only (compiles what the full fit needs: same shapes)."""
    data = S["ek_train"][:1] if warm else S["ek_train"]
    t0 = time.perf_counter()
    pc = fit_preconditioner(S["ek_logra"], S["model"], data, kind="ekfac", damping=damping,
                            relative_damping=None if damping is not None else relative_damping,
                            batch_size=S["ek_batch"], fisher=fisher, progress=False)
    _block(pc.factors)
    dt = time.perf_counter() - t0
    S["ek_pc"] = pc
    return {"seconds": dt, "damping": {k: float(v) for k, v in pc.damping.items()},
            "mean_eigenvalue": {n: float(jnp.mean(pc.factors[n]["L"])) for n in pc.names}}


def ekfac_score(out, relative_damping=None, damping=None, warm=False, route="eigen"):
    """Scores [Q, N] -> ``out`` (.npy), training gradients streamed in batches (``[N, D]`` never stored).
    ``route="eigen"``: ``baselines.ekfac_streamed_scores`` (queries and training pairs rotated into the
    EK-FAC eigenbasis, no ``apply``); ``"apply"``: query gradients, ``pc.apply``, ``streamed_scores``.
    ``damping`` / ``relative_damping``: re-damp the fitted factors (untimed) instead of the fit's damping.
    ``warm``: score against the first training batch only."""
    pc, lg, model = S["ek_pc"], S["ek_logra"], S["model"]
    if damping is not None or relative_damping is not None:
        pc = pc.with_damping(damping=damping, relative_damping=None if damping is not None else relative_damping)
    t0 = time.perf_counter()
    train = S["ek_train"][:1] if warm else S["ek_train"]
    if route == "eigen":
        qs = {k: jnp.concatenate([b[k] for b in S["ek_q"]]) for k in S["ek_q"][0]}
        tr = {k: jnp.concatenate([b[k] for b in train]) for k in train[0]}
        s = ekfac_streamed_scores(lg, model, qs, tr, pc, S["ek_batch"])
    elif route == "apply":
        gq = jnp.concatenate([lg.grads(model, b) for b in S["ek_q"]])
        hq = pc.apply(gq)
        s = _block(jnp.asarray(streamed_scores(lg, model, hq, train, S["ek_batch"])))
    else:
        raise ValueError(f"route must be 'eigen' or 'apply', got {route!r}")
    dt = time.perf_counter() - t0
    s = np.asarray(s)
    np.save(out, s)
    return {"seconds": dt, "shape": list(s.shape), "path": out,
            "damping": {k: float(v) for k, v in pc.damping.items()}}


if __name__ == "__main__":
    common.serve(dict(setup=setup, train=train, grads=grads, log=log, score_prep=score_prep, score=score,
                      ekfac_prep=ekfac_prep, ekfac_fit=ekfac_fit, ekfac_score=ekfac_score))
