"""Throughput of LoGra.grads vs the jitted training step and vs explicit vmap(grad) + projection.

For each model (MLP and GPT at three sizes) and one batch, times (median of --reps runs after a
compile/warm-up run, the three variants interleaved A B C A B C ... so that machine noise hits all
alike):

  logra     LoGra.grads (fast path: one backward through activations, projected blocks)
  train     the model's jitted forward + backward of the mean loss (value_and_grad), no update
  explicit  jv.explicit_grads: vmap(grad) per-example full gradients, then the projection

Prints a table and writes JSON. Runs unchanged on CPU or GPU.

    python benchmarks/grads_throughput.py [--rank 64] [--reps 5] [--out benchmarks/results/grads_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxval as jv
from jaxval.models import gpt, mlp
from jaxval._src.train import train_step_fn


def block(x):
    jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)
    return x


def workloads(args):
    rng = np.random.default_rng(0)
    for name, sizes in (("mlp-s", (784, 256, 10)), ("mlp-m", (784, 1024, 1024, 10)),
                        ("mlp-l", (784, 2048, 2048, 2048, 10))):
        model = mlp.MLP(sizes, rngs=nnx.Rngs(0))
        b = args.mlp_batch
        batch = {"x": jnp.asarray(rng.normal(size=(b, sizes[0])), jnp.float32),
                 "y": jnp.asarray(rng.integers(0, sizes[-1], b), jnp.int32)}
        yield name, model, mlp.loss_fn, batch, b
    for name, cfg in gpt.sizes().items():
        if args.only_small and name != "small":
            continue
        model = gpt.GPT(cfg, rngs=nnx.Rngs(0))
        b, t = args.gpt_batch, max(cfg.block_size, 128) if name != "small" else cfg.block_size
        t = min(t, cfg.block_size)
        batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32),
                 "mask": jnp.ones((b, t), jnp.float32)}
        yield f"gpt-{name}", model, gpt.loss_fn, batch, b


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        block(fn())
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--mlp-batch", type=int, default=256)
    p.add_argument("--gpt-batch", type=int, default=16)
    p.add_argument("--only-small", action="store_true", help="smoke run: skip the larger GPTs")
    p.add_argument("--no-explicit", action="store_true")
    p.add_argument("--out", default="benchmarks/results/grads_throughput.json")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    rows = []
    for name, model, loss_fn, batch, b in workloads(args):
        logra = jv.LoGra(model, loss_fn, rank=args.rank)
        state = nnx.state(model)
        step = train_step_fn(model, loss_fn)
        explicit = jax.jit(lambda batch: jv.explicit_grads(model, loss_fn, logra.projections, batch))
        fns = {"logra": lambda: logra.grads(model, batch), "train": lambda: step(state, batch)}
        if not args.no_explicit:
            fns["explicit"] = lambda: explicit(batch)
        for fn in fns.values():  # compile + warm up
            block(fn())
        times = {k: [] for k in fns}
        for _ in range(args.reps):
            for k, fn in fns.items():
                times[k] += timed(fn, 1)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"model": name, "params": gpt.param_count(model), "batch": b,
               "tokens_per_example": int(batch["tokens"].shape[1]) if "tokens" in batch else 1,
               "rank": args.rank, "dim": logra.dim,
               **{f"{k}_s": med[k] for k in med}, **{f"{k}_ex_per_s": b / med[k] for k in med},
               "logra_vs_train": med["train"] / med["logra"]}
        if "explicit" in med:
            row["speedup_vs_explicit"] = med["explicit"] / med["logra"]
        rows.append(row)
        print(f"{name:8s} params={row['params']:>10,d} " + "  ".join(
            f"{k}={b / med[k]:9.1f} ex/s" for k in med) + f"  logra/train={row['logra_vs_train']:.2f}"
            + (f"  logra/explicit={row['speedup_vs_explicit']:.1f}x" if "explicit" in med else ""), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "platform": platform.platform(),
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print("\n| model | params | batch × tokens | LoGra ex/s | train step ex/s | explicit ex/s | LoGra / train | LoGra / explicit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['batch']}×{r['tokens_per_example']} | "
              f"{r['logra_ex_per_s']:.1f} | {r['train_ex_per_s']:.1f} | "
              f"{r.get('explicit_ex_per_s', float('nan')):.1f} | {r['logra_vs_train']:.2f} | "
              f"{r.get('speedup_vs_explicit', float('nan')):.1f}× |")
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
