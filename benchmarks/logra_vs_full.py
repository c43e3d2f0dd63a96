"""LoGra vs the EK-FAC/TRAK-style route as the model grows: the small-scale echo of the LoGra paper's 6,500×.

    .venv/bin/python benchmarks/logra_vs_full.py [--reps 2] [--k 4096] [--sizes 1m 10m 40m 135m]

Llama models of the SmolLM2 architecture (random weights; the largest is SmolLM2-135M's exact config),
128-token examples, gradients of the MLP layers only (gate/up/down of every block, as in the paper):

- ``logra``: ``LoGra.grads`` at rank 64 (D = 4096 per layer), batch 8;
- ``full``: the route of the EK-FAC / TRAK baselines: the full per-example gradient of the same layers
  (``vmap(grad)``, P parameters per example; batch chosen so that they take <= ~1.5 GB), then a dense
  Rademacher projection to ``k`` dimensions generated block-wise from a key
  (``jaxval.baselines.dense_projection``, the [P, k] matrix never exists). k = 2048 (TRAK's default) is far
  below LoGra's D (90 × 4096 on SmolLM2): generous to the full route. The projection's cost is linear in
  P (one scan step per ``block`` rows), so it is timed on ``--proj-sample`` columns of a ``--proj-batch``
  gradient and scaled by P / sample (measured, then scaled: the full projection of SmolLM2's 80M MLP
  parameters would take ~10 minutes per batch here).

Examples/s of each, side by side (interleaved reps, medians after a compile call), their ratio, JSON and
a PNG (ratio vs parameters).
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
from jaxval.evaluation.baselines import dense_projection  # noqa: E402
from jaxval.models import llama  # noqa: E402

SIZES = {
    "1m": dict(vocab_size=2048, d_model=128, n_layer=4, n_head=4, n_kv_head=2, d_ff=384),
    "10m": dict(vocab_size=8192, d_model=256, n_layer=8, n_head=4, n_kv_head=2, d_ff=768),
    "40m": dict(vocab_size=16384, d_model=384, n_layer=16, n_head=6, n_kv_head=2, d_ff=1024),
    "135m": None,  # SmolLM2-135M
}


def is_mlp_param(path, x) -> bool:
    return isinstance(x, nnx.Param) and "mlp" in "/".join(str(p) for p in path)


def per_example_grads(model):
    """jitted ``batch -> [B, P]``: full per-example gradients of the MLP parameters (``vmap(grad)``)."""
    graphdef, mlp_params, rest = nnx.split(model, is_mlp_param, ...)
    flat0, unravel = jax.flatten_util.ravel_pytree(mlp_params)

    def single(flat, example):
        m = nnx.merge(graphdef, unravel(flat), rest)
        return llama.loss_fn(m, jax.tree.map(lambda a: a[None], example))[0]

    fn = jax.jit(jax.vmap(jax.grad(single), in_axes=(None, 0)))
    return (lambda batch: fn(flat0, batch)), int(flat0.size)


def timed(fn, reps_out: list):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    reps_out.append(time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--k", type=int, default=2048, help="dense projection dimension (TRAK's default 2048)")
    ap.add_argument("--block", type=int, default=65536, help="rows of the projection generated per scan step")
    ap.add_argument("--proj-batch", type=int, default=64, help="examples sharing one generated projection")
    ap.add_argument("--proj-sample", type=int, default=2**20, help="gradient columns the projection is timed on")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--logra-batch", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/logra_vs_full.json"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    rows = []
    for name in args.sizes:
        cfg = llama.smollm2_135m_config() if SIZES[name] is None else llama.smollm2_135m_config(**SIZES[name])
        model = llama.Llama(cfg, rngs=nnx.Rngs(0))
        params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        lg = jv.LoGra(model, llama.loss_fn, rank=64, layers="mlp")
        grads, p_mlp = per_example_grads(model)
        fb = int(max(1, min(args.logra_batch, 1.5e9 // (4 * p_mlp))))
        rng = np.random.default_rng(0)

        def batch(b):
            return {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, args.seq_len)), jnp.int32),
                    "mask": jnp.ones((b, args.seq_len), jnp.float32)}

        bl, bf = batch(args.logra_batch), batch(fb)
        # the dense projection costs exactly (P / block) scan steps: time it on a P_sample-column slice of
        # a [proj_batch, P] gradient and scale by P / P_sample (the random matrix is generated per call,
        # so it is amortised over proj_batch examples, as a large-batch TRAK run would)
        p_sample = min(p_mlp, args.proj_sample)
        g_sample = jax.random.normal(jax.random.key(1), (args.proj_batch, p_sample))
        key = jax.random.key(0)
        fns = {"logra": lambda: lg.grads(model, bl), "grads": lambda: grads(bf),
               "proj": lambda: dense_projection(g_sample, key, k=args.k, block=args.block)}
        first = {}
        for k_, f in fns.items():
            t = []
            timed(f, t)
            first[k_] = t[0]
        times = {k_: [] for k_ in fns}
        for _ in range(args.reps):
            for k_, f in fns.items():
                timed(f, times[k_])
        med = {k_: statistics.median(v) for k_, v in times.items()}
        grad_s = med["grads"] / fb
        proj_s = med["proj"] * (p_mlp / p_sample) / args.proj_batch
        r = {"size": name, "params": int(params), "mlp_params": p_mlp, "logra_dim": lg.dim, "k": args.k,
             "logra_batch": args.logra_batch, "grads_batch": fb, "proj_batch": args.proj_batch,
             "proj_sample_cols": p_sample, "seq_len": args.seq_len,
             "logra_ex_per_s": args.logra_batch / med["logra"], "full_grad_s_per_ex": grad_s,
             "dense_proj_s_per_ex": proj_s, "full_ex_per_s": 1.0 / (grad_s + proj_s),
             "grads_only_ex_per_s": 1.0 / grad_s, "times_s": times, "first_call_s": first}
        r["ratio"] = r["logra_ex_per_s"] / r["full_ex_per_s"]
        r["ratio_vs_grads_only"] = r["logra_ex_per_s"] / r["grads_only_ex_per_s"]
        rows.append(r)
        print(f"{name:5s} params {params / 1e6:7.1f}M  MLP {p_mlp / 1e6:6.1f}M  LoGra {r['logra_ex_per_s']:8.2f} ex/s  "
              f"full grads {grad_s:.3f} s/ex + dense proj {proj_s:.3f} s/ex  ratio {r['ratio']:.1f}× "
              f"(vs grads alone {r['ratio_vs_grads_only']:.2f}×)", flush=True)
        del model, lg, grads, g_sample
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "jax": jax.__version__,
            "backend": jax.default_backend(), "command": " ".join(["python"] + sys.argv)}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("\n| model | params | MLP params P | LoGra D | LoGra ex/s | full grads s/ex | dense projection s/ex "
          "(k) | full route ex/s | LoGra ÷ full route | LoGra ÷ full grads alone |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| llama-{r['size']} | {r['params'] / 1e6:.1f}M | {r['mlp_params'] / 1e6:.1f}M | {r['logra_dim']:,} | "
              f"{r['logra_ex_per_s']:.2f} | {r['full_grad_s_per_ex']:.3f} | {r['dense_proj_s_per_ex']:.3f} "
              f"(k={r['k']}) | {r['full_ex_per_s']:.4f} | {r['ratio']:.1f}× | {r['ratio_vs_grads_only']:.2f}× |")
    plot(rows, meta, Path(args.out).with_suffix(".png"))


def plot(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x, y = [r["params"] for r in rows], [r["ratio"] for r in rows]
    ax.plot(x, y, "o-", label="vs full per-example grads + dense projection (k=%d)" % rows[0]["k"])
    ax.plot(x, [r["ratio_vs_grads_only"] for r in rows], "s--", color="grey",
            label="vs full per-example grads alone (no projection)")
    ax.legend(fontsize=7)
    for r in rows:
        ax.annotate(f"{r['ratio']:.1f}×", (r["params"], r["ratio"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (Llama / SmolLM2 architecture, 128-token examples)")
    ax.set_ylabel("LoGra examples/s ÷ other route examples/s")
    ax.set_title(f"LoGra vs the EK-FAC/TRAK route, MLP layers, {meta['backend']} ({meta['date'][:10]})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.text(0.01, 0.01, meta["command"], fontsize=6, color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
