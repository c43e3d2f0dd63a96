"""XLA:CPU on the token model: where the time goes (compiled cost analysis) and which flags / batch sizes help.

    .venv/bin/python benchmarks/xla_cpu.py [--reps 7] [--configs baseline xnnpack ...] [--out benchmarks/results/xla_cpu.json]

Each configuration runs in its own subprocess (``XLA_FLAGS`` is read once, when the XLA backend starts).
In each child: the token model (``TokenMLP`` 1000/256/4/1024, 2.6M params), LoGra rank 64 on every
``nnx.Linear`` (9 layers, as in ``benchmarks/peers``), and three jitted programs on the same batch:

- ``forward``: mean LM loss only (no backward),
- ``act_backward``: forward + backward through the activations only (gradient w.r.t. the embedding table:
  every layer's output cotangent, no weight-gradient products, no projections): LoGra's floor,
- ``logra``: ``LoGra.compiled_step(graphdef)(state, batch, projections)`` -> ([B, D] float32, [B] losses, None),
- ``train``: ``jaxval.train.train_step_fn`` -> (loss, weight gradients).

For each: ``jit(f).lower(...).compile().cost_analysis()`` (flops, bytes accessed, transcendentals) and
wall-time medians, the three timed round-robin (interleaved) ``--reps`` times. float32 only (a bf16
projection would change results; it is not measured here).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics as st
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "baseline": ("", 16),
    "xnnpack": ("--xla_cpu_use_xnnpack=true", 16),
    "onednn": ("--xla_cpu_use_onednn=true", 16),
    "no_multi_thread_eigen": ("--xla_cpu_multi_thread_eigen=false", 16),
    "fast_math": ("--xla_cpu_enable_fast_math=true", 16),
    "xnn_fusion": ("--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce", 16),
    "onednn_fusion": ("--xla_cpu_experimental_onednn_fusion_type=dot,eltwise", 16),
    "batch8": ("", 8),
    "batch32": ("", 32),
}


def child(batch: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sys.path.insert(0, str(ROOT))
    from jaxval import LoGra
    from jaxval.models.token_mlp import TokenMLP, loss_fn, random_batch
    from jaxval._src.train import train_step_fn

    model = TokenMLP(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    logra = LoGra(model, loss_fn, rank=64, types=(nnx.Linear,))
    b = {k: jnp.asarray(v) for k, v in random_batch(batch, 128).items()}

    @jax.jit
    def forward(state, batch):
        return jnp.mean(loss_fn(nnx.merge(graphdef, state), batch))

    # backward through the activations only: the gradient w.r.t. the embedding table (a scatter-add, no
    # weight-gradient matrix products) needs every layer's input cotangent, as LoGra does, but no projections
    emb_state, rest = nnx.state(model, nnx.PathContains("embed"), ...)

    @jax.jit
    def act_backward(emb_state, rest, batch):
        return jax.grad(lambda e: jnp.mean(loss_fn(nnx.merge(graphdef, e, rest), batch)))(emb_state)

    logra_step = logra.compiled_step(graphdef)
    train = train_step_fn(model, loss_fn)
    progs = {"forward": (forward, (state, b)), "act_backward": (act_backward, (emb_state, rest, b)),
             "logra": (logra_step, (state, b, logra.projections)),
             "train": (train, (state, b))}
    out = {"batch": batch, "tokens": batch * 128, "dim": logra.dim, "jax": jax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "cost": {}, "compile_s": {}, "times_s": {}}
    for name, (f, args) in progs.items():
        t0 = time.perf_counter()
        comp = f.lower(*args).compile()
        out["compile_s"][name] = time.perf_counter() - t0
        ca = comp.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out["cost"][name] = {k: float(ca[k]) for k in ("flops", "bytes accessed", "transcendentals")
                             if ca and k in ca}
        jax.block_until_ready(f(*args))  # warm (jit cache hit after lower/compile? run once anyway)
        out["times_s"][name] = []
    for _ in range(reps):
        for name, (f, args) in progs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            out["times_s"][name].append(time.perf_counter() - t0)
    out["median_ms"] = {k: 1e3 * st.median(v) for k, v in out["times_s"].items()}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/xla_cpu.json"))
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.child, args.reps)), flush=True)
        return
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "command": " ".join(sys.argv)}
    rows = {}
    for name in args.configs:
        flags, batch = CONFIGS[name]
        env = {**os.environ, "XLA_FLAGS": flags}
        t0 = time.time()
        p = subprocess.run([sys.executable, __file__, "--child", str(batch), "--reps", str(args.reps)],
                           env=env, capture_output=True, text=True)
        lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not lines:
            err = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
            rows[name] = {"xla_flags": flags, "batch": batch, "error": err, "returncode": p.returncode}
            print(f"{name:24s} FAILED rc={p.returncode}: {err}", flush=True)
            continue
        r = json.loads(lines[-1][7:])
        r["wall_s"], r["loadavg"] = time.time() - t0, os.getloadavg()
        rows[name] = r
        m = r["median_ms"]
        print(f"{name:24s} B={batch:2d} fwd {m['forward']:7.1f} ms  act-bwd {m['act_backward']:7.1f} ms  logra {m['logra']:7.1f} ms  "
              f"train {m['train']:7.1f} ms  logra/train {m['logra'] / m['train']:.2f}  "
              f"load {r['loadavg'][0]:.2f}", flush=True)
    meta["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "configs": rows}, f, indent=1)

    base = rows.get("baseline")
    if base and "cost" in base:
        print("\ncost analysis (baseline, B=16):")
        print("| program | GFLOP | GB accessed | transcendentals (M) | median ms | GFLOP/s |")
        print("|---|---|---|---|---|---|")
        for k in ("forward", "act_backward", "logra", "train"):
            c = base["cost"][k]
            print(f"| {k} | {c.get('flops', 0) / 1e9:.2f} | {c.get('bytes accessed', 0) / 1e9:.3f} | "
                  f"{c.get('transcendentals', 0) / 1e6:.2f} | {base['median_ms'][k]:.1f} | "
                  f"{c.get('flops', 0) / 1e6 / base['median_ms'][k]:.1f} |")
    print("\n| config | XLA_FLAGS | B | forward ms | act-backward ms | LoGra ms | train ms | LoGra/train | "
          "LoGra examples/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | `{r['xla_flags']}` | {r['batch']} | failed: {r['error'][:80]} | | | | | |")
            continue
        m = r["median_ms"]
        print(f"| {name} | `{r['xla_flags'] or '(none)'}` | {r['batch']} | {m['forward']:.1f} | "
              f"{m['act_backward']:.1f} | {m['logra']:.1f} | "
              f"{m['train']:.1f} | {m['logra'] / m['train']:.2f} | {r['batch'] / m['logra'] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
