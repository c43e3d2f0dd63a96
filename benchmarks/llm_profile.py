"""Where the time of LoGra's step goes on SmolLM2-135M on XLA:CPU: the step split into programs timed
side by side (interleaved, medians), with XLA's compiled cost analysis (FLOPs) for each.

    .venv/bin/python benchmarks/llm_profile.py [--batch 4] [--seq-len 128] [--reps 3]

Programs, all jitted, on the same batch of random tokens:

- ``forward``: summed LM loss (no backward),
- ``act_backward``: forward + backward through the activations only: the gradient w.r.t. the RMSNorm
  scales (elementwise, no weight-gradient matrix products) needs every layer's output cotangent, as LoGra
  does, without any projection: LoGra's floor,
- ``logra_mlp``: ``LoGra.grads`` at rank 64 on the 90 MLP layers (as the peers benchmark),
- ``train``: forward + backward w.r.t. all parameters,
- ``head_ce``: the tied vocabulary head + cross-entropy alone, forward + backward w.r.t. its input,
- ``block``: one transformer block, forward + backward w.r.t. its input (× 30 in the model).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import jaxval as jv  # noqa: E402
from jaxval.models import llama  # noqa: E402
from jaxval._src.train import train_step_fn  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/llm_profile.json"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    model, _ = llama.load_smollm2()
    b, t = args.batch, args.seq_len
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(3, model.cfg.vocab_size, (b, t)), jnp.int32),
             "mask": jnp.ones((b, t), jnp.float32)}
    graphdef, state = nnx.split(model)
    norms, rest = nnx.state(model, lambda path, x: "norm" in str(path[-2]) if len(path) > 1 else False, ...)

    @jax.jit
    def forward(state, batch):
        return jnp.sum(llama.loss_fn(nnx.merge(graphdef, state), batch))

    @jax.jit
    def act_backward(norms, rest, batch):
        return jax.grad(lambda n: jnp.sum(llama.loss_fn(nnx.merge(graphdef, n, rest), batch)))(norms)

    lg = jv.LoGra(model, llama.loss_fn, rank=64, layers="mlp")
    step = lg.compiled_step(graphdef)
    train = train_step_fn(model, llama.loss_fn)

    h = jax.random.normal(jax.random.key(0), (b, t, model.cfg.d_model))
    targets = batch["tokens"]

    @jax.jit
    def head_ce(state, h):
        def f(h):
            m = nnx.merge(graphdef, state)
            logits = m.embed.attend(m.norm(h)).astype(jnp.float32)
            return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
        return jax.grad(f)(h)

    cos, sin = llama.rope_tables(jnp.arange(t), model.cfg.dh, model.cfg.rope_base)
    bdef, bstate = nnx.split(model.blocks[0])

    @jax.jit
    def block(bstate, h):
        return jax.grad(lambda h: jnp.sum(nnx.merge(bdef, bstate)(h, cos, sin)[0] ** 2))(h)

    progs = {"forward": (forward, (state, batch)), "act_backward": (act_backward, (norms, rest, batch)),
             "logra_mlp": (step, (state, batch, lg.projections)), "train": (train, (state, batch)),
             "head_ce": (head_ce, (state, h)), "block": (block, (bstate, h))}
    res = {}
    for name, (f, a) in progs.items():
        c = f.lower(*a).compile()
        ca = c.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        jax.block_until_ready(f(*a))
        res[name] = {"gflop": float(ca.get("flops", 0)) / 1e9, "times_s": []}
        print(f"compiled {name}", flush=True)
    for _ in range(args.reps):
        for name, (f, a) in progs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*a))
            res[name]["times_s"].append(time.perf_counter() - t0)
    for r in res.values():
        r["median_s"] = statistics.median(r["times_s"])
        r["gflop_per_s"] = r["gflop"] / r["median_s"]
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "jax": jax.__version__,
            "batch": b, "seq_len": t, "command": " ".join(["python"] + sys.argv)}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "programs": res}, f, indent=1)
    print(f"\nSmolLM2-135M, {b} × {t} tokens, float32, load {meta['loadavg'][0]:.1f}")
    print("| program | GFLOP (XLA cost analysis) | median s | GFLOP/s |")
    print("|---|---:|---:|---:|")
    for name, r in res.items():
        print(f"| {name} | {r['gflop']:.1f} | {r['median_s']:.3f} | {r['gflop_per_s']:.0f} |")


if __name__ == "__main__":
    main()
