"""Logging throughput (store on vs LoGra.grads alone) and peak memory of logging vs dataset size.

1. Throughput. The same model and the same batches, timed two ways, interleaved A B A B ... after a
   warm-up (compile) of each, medians over --reps:

     grads   LoGra.grads on every batch (dispatched back to back, all results blocked on): compute only
     step    the pipeline's own compiled step (same HLO as LoGra.grads plus the cast to the store dtype,
             model split once), same loop: compute only, the tightest baseline
     log     jaxval.log_gradients into a fresh GradientStore (bf16): compute, device->host, cast, async
             tensorstore writes, commit, done marks, store creation and manifest included

   The ratio log/grads is the fraction of compute throughput kept with the store on (target >= 0.8: the
   writes are hidden behind compute); log/step isolates the cost of the I/O. Models: the NOTES "token model" (token_mlp, 2.6M parameters,
   16 x 128 tokens per batch) and the small GPT (64 tokens).

2. Memory. For each of two dataset sizes a fresh subprocess logs N examples (an MLP 784-512-512-10 fed by
   a generator, so the data themselves take no memory) and reports its peak RSS
   (resource.getrusage(RUSAGE_SELF).ru_maxrss) and the RSS just before logging. Keeping the gradients in
   memory would cost N x D x 4 bytes, shown beside.

Prints tables and writes JSON.

    python benchmarks/logging_throughput.py [--reps 5] [--out benchmarks/results/logging_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ----------------------------------------------------------------------------------------------- memory

def memory_child(n: int, out_dir: str, rank: int, batch: int) -> dict:
    """Runs in a fresh process: log n examples of an MLP, report RSS."""
    warnings.simplefilter("ignore")
    import numpy as np
    from flax import nnx

    import jaxval as jv
    from jaxval.models import mlp
    from jaxval import log_gradients

    sizes = (784, 512, 512, 10)
    model = mlp.MLP(sizes, rngs=nnx.Rngs(0))
    logra = jv.LoGra(model, mlp.loss_fn, rank=rank)

    def batches():
        for s in range(0, n, batch):
            rng = np.random.default_rng(s)
            b = min(batch, n - s)
            yield None, {"x": rng.normal(size=(b, sizes[0])).astype(np.float32),
                         "y": rng.integers(0, sizes[-1], b).astype(np.int32)}

    # warm up (compile) on a few rows, so that the RSS before logging includes the compiled step
    log_gradients(logra, model, batches_of(batch, sizes), os.path.join(out_dir, "warm"), num_rows=batch,
                  batch_size=batch, progress=False)
    rss_before = _rss_mb()
    samples, stop = [], threading.Event()

    def sample():  # RSS every 5 ms while logging runs
        while not stop.is_set():
            samples.append(_rss_mb())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    store = log_gradients(logra, model, batches(), os.path.join(out_dir, "store"), num_rows=n, batch_size=batch,
                          dtype="bfloat16", progress=False)
    secs = time.perf_counter() - t0
    stop.set()
    th.join()
    assert store.is_complete()
    return {"n": n, "dim": logra.dim, "seconds": secs, "ex_per_s": n / secs, "rss_before_mb": rss_before,
            "peak_rss_mb": _maxrss_mb(), "rss_after_mb": _rss_mb(),
            "peak_rss_during_logging_mb": max(samples), "rss_samples": len(samples), "store_bytes": store.nbytes_on_disk(),
            "chunk_rows": store.chunk_rows, "grads_in_memory_fp32_mb": n * logra.dim * 4 / 2**20}


def batches_of(batch, sizes):
    import numpy as np

    rng = np.random.default_rng(12345)
    yield None, {"x": rng.normal(size=(batch, sizes[0])).astype(np.float32),
                 "y": rng.integers(0, sizes[-1], batch).astype(np.int32)}


def run_memory(sizes_n, rank, batch) -> list[dict]:
    out = []
    for n in sizes_n:
        d = tempfile.mkdtemp(prefix="jaxval-mem-")
        try:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(n), "--tmp", d,
                   "--mem-rank", str(rank), "--mem-batch", str(batch)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"memory child failed:\n{res.stderr[-3000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
        finally:
            shutil.rmtree(d, ignore_errors=True)
        out.append(row)
        print(f"  N={n:>7,d}: peak RSS {row['peak_rss_mb']:.0f} MiB (process, getrusage); while logging: "
              f"before {row['rss_before_mb']:.0f}, peak {row['peak_rss_during_logging_mb']:.0f}, after "
              f"{row['rss_after_mb']:.0f} MiB; store {row['store_bytes'] / 2**20:.0f} MiB; "
              f"[N, D] fp32 in memory would be {row['grads_in_memory_fp32_mb']:.0f} MiB; "
              f"{row['ex_per_s']:.0f} ex/s", flush=True)
    return out


# ----------------------------------------------------------------------------------------------- throughput

def run_throughput(args) -> list[dict]:
    warnings.simplefilter("ignore")
    import jax
    import numpy as np
    from flax import nnx

    import jaxval as jv
    from jaxval.models import gpt, token_mlp
    from jaxval import log_gradients
    from jaxval._src.store import normalize_dtype

    workloads = []
    m = token_mlp.TokenMLP(rngs=nnx.Rngs(0))
    workloads.append(("token_mlp (2.6M)", m, token_mlp.loss_fn, 1000, 128, args.token_batch, args.rank))
    cfg = gpt.sizes()["small"]
    g = gpt.GPT(cfg, rngs=nnx.Rngs(0))
    for r in (args.gpt_rank, 64) if args.gpt_rank != 64 else (64,):
        workloads.append((f"gpt-small (0.2M) r{r}", g, gpt.loss_fn, cfg.vocab_size, cfg.block_size, args.gpt_batch,
                          r))
    rows = []
    for name, model, loss_fn, vocab, t, b, rank in workloads:
        logra = jv.LoGra(model, loss_fn, rank=rank)
        rng = np.random.default_rng(0)
        n = b * args.batches
        data = {"tokens": rng.integers(0, vocab, (n, t)).astype(np.int32), "mask": np.ones((n, t), np.float32)}
        batches = [{k: v[s:s + b] for k, v in data.items()} for s in range(0, n, b)]
        tmp = tempfile.mkdtemp(prefix="jaxval-bench-")

        def grads_alone():
            outs = [logra.grads(model, bt) for bt in batches]
            jax.block_until_ready(outs)

        graphdef, state = nnx.split(model)
        step = logra.compiled_step(graphdef, dtype=normalize_dtype(args.dtype))

        def step_alone():
            outs = [step(state, bt, logra.projections) for bt in batches]
            jax.block_until_ready(outs)

        counter = [0]

        def logging():
            counter[0] += 1
            path = os.path.join(tmp, f"s{counter[0]}")
            store = log_gradients(logra, model, data, path, batch_size=b, dtype=args.dtype, progress=False)
            assert store.is_complete()
            nbytes = store.nbytes_on_disk()
            shutil.rmtree(path)
            return nbytes

        grads_alone()                 # compile + warm up all three
        step_alone()
        nbytes = logging()
        times = {"grads": [], "step": [], "log": []}
        for _ in range(args.reps):
            for key, fn in (("grads", grads_alone), ("step", step_alone), ("log", logging)):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        shutil.rmtree(tmp, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"model": name, "params": gpt.param_count(model), "batch": b, "tokens": t, "batches": args.batches,
               "examples": n, "rank": rank, "dim": logra.dim, "dtype": args.dtype,
               "store_bytes": nbytes, "write_mb_per_s": nbytes / med["log"] / 2**20,
               "grads_s": med["grads"], "step_s": med["step"], "log_s": med["log"],
               "grads_s_all": times["grads"], "step_s_all": times["step"], "log_s_all": times["log"],
               "grads_ex_per_s": n / med["grads"], "step_ex_per_s": n / med["step"], "log_ex_per_s": n / med["log"],
               "ratio": med["grads"] / med["log"], "ratio_vs_step": med["step"] / med["log"]}
        rows.append(row)
        print(f"  {name:21s} D={logra.dim:>7,d}: LoGra.grads {row['grads_ex_per_s']:7.1f} ex/s, step "
              f"{row['step_ex_per_s']:7.1f} ex/s, logging {row['log_ex_per_s']:7.1f} ex/s "
              f"({row['write_mb_per_s']:.1f} MiB/s to disk) -> log/grads {row['ratio']:.3f}, "
              f"log/step {row['ratio_vs_step']:.3f}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", type=int, default=16, help="batches per timed run")
    p.add_argument("--token-batch", type=int, default=16)
    p.add_argument("--gpt-batch", type=int, default=32)
    p.add_argument("--gpt-rank", type=int, default=16, help="the small GPT is also run at rank 64 (I/O-heavy)")
    p.add_argument("--mem-sizes", default="10000,80000")
    p.add_argument("--mem-rank", type=int, default=32)
    p.add_argument("--mem-batch", type=int, default=256)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out", default="benchmarks/results/logging_throughput.json")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child, args.tmp, args.mem_rank, args.mem_batch)))
        return None

    result = {}
    if not args.skip_throughput:
        print("throughput (medians of interleaved runs):", flush=True)
        result["throughput"] = run_throughput(args)
    if not args.skip_memory:
        print("peak memory of logging (fresh process per size):", flush=True)
        sizes_n = [int(x) for x in args.mem_sizes.split(",")]
        mem = run_memory(sizes_n, args.mem_rank, args.mem_batch)
        result["memory"] = {"rows": mem, "peak_growth_mb": mem[-1]["peak_rss_mb"] - mem[0]["peak_rss_mb"],
                            "peak_during_logging_growth_mb": mem[-1]["peak_rss_during_logging_mb"]
                            - mem[0]["peak_rss_during_logging_mb"],
                            "n_ratio": sizes_n[-1] / sizes_n[0]}

    import jax

    result["meta"] = {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(),
                      "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
                      "jax": jax.__version__, "load_avg_at_end": os.getloadavg(),
                      "command": " ".join(["python"] + [os.path.relpath(sys.argv[0])] + sys.argv[1:])}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    if "throughput" in result:
        print("\n| model | batch × tokens | D | LoGra.grads ex/s | step alone ex/s | logging ex/s (store on) | "
              "log / grads | log / step | write MiB/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in result["throughput"]:
            print(f"| {r['model']} | {r['batch']}×{r['tokens']} | {r['dim']:,} | {r['grads_ex_per_s']:.1f} | "
                  f"{r['step_ex_per_s']:.1f} | {r['log_ex_per_s']:.1f} | {r['ratio']:.3f} | {r['ratio_vs_step']:.3f} | "
                  f"{r['write_mb_per_s']:.1f} |")
    if "memory" in result:
        print("\n| N | D | store MiB | [N,D] fp32 MiB | RSS before logging | peak RSS while logging | "
              "peak RSS (getrusage) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in result["memory"]["rows"]:
            print(f"| {r['n']:,} | {r['dim']:,} | {r['store_bytes'] / 2**20:.0f} | {r['grads_in_memory_fp32_mb']:.0f} | "
                  f"{r['rss_before_mb']:.0f} | {r['peak_rss_during_logging_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
        mm = result["memory"]
        print(f"N x{mm['n_ratio']:.0f}: peak RSS (getrusage) {mm['peak_growth_mb']:+.0f} MiB, peak RSS while "
              f"logging {mm['peak_during_logging_growth_mb']:+.0f} MiB")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
