"""Per-process throughput of logging, fitting and scoring across P cooperating processes (jax.distributed).

Launches this script as P = 1, 2, ... processes on 127.0.0.1 with :func:`jaxval.distributed.launch`
(``--devices`` CPU devices per process). Each worker logs N examples of a random MLP into a fresh
GradientStore (its own chunk blocks), fits a K-FAC preconditioner over the global mesh and scores Q
queries against its share of the rows; every stage is timed after a warm-up of the same stage (so
compilation is excluded), between barriers. Reported: rows/s per process and aggregate, per stage.

    python benchmarks/distributed_throughput.py [--procs 1 2] [--n 4096] [--devices 1]
        [--out benchmarks/results/distributed_throughput.json]

On a 2-core CPU machine, 2 processes share the same 2 cores: the aggregate cannot double; what the table
shows is the per-process cost of the collectives and the coordination (it should stay near 1/P of the
1-process rate, not far below).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time


def worker(args):
    from jaxval import distributed as dist

    topo = dist.initialize(timeout=120)
    import jax
    import numpy as np
    from flax import nnx

    import jaxval as jv
    from jaxval.models import mlp

    sizes = tuple(int(s) for s in args.sizes.split(","))
    model = mlp.MLP(sizes, rngs=nnx.Rngs(0))
    logra = jv.LoGra(model, mlp.loss_fn, rank=args.rank, seed=0)
    rng = np.random.default_rng(0)
    n = args.n
    data = {"x": rng.normal(size=(n, sizes[0])).astype(np.float32),
            "y": rng.integers(0, sizes[-1], n).astype(np.int32)}
    q = np.asarray(logra.grads(model, {"x": data["x"][:args.q], "y": data["y"][:args.q]}))
    root = args.workdir
    res = {}

    def timed(name, fn, rows):
        fn(f"{root}/warm_{name}")                        # compile + warm up
        dist.barrier(f"bench-{name}-start")
        t = time.perf_counter()
        fn(f"{root}/{name}")
        dist.barrier(f"bench-{name}-end")
        dt = time.perf_counter() - t
        res[name] = {"seconds": dt, "rows": rows, "rows_per_s_per_process": rows / dt / topo.process_count,
                     "rows_per_s_aggregate": rows / dt}

    kw = dict(batch_size=args.batch, dtype="bfloat16", chunk_rows=args.batch * 4)
    timed("log", lambda p: jv.log_gradients(logra, model, data, p, progress=False, **kw), n)
    timed("fit_kfac", lambda p: jv.fit_preconditioner(logra, model, data, kind="kfac", damping=1e-3,
                                                      batch_size=args.batch * topo.device_count, progress=False), n)
    from jaxval import GradientStore

    store = GradientStore.open(f"{root}/log")
    timed("score", lambda p: jv.influence(q, store, None, mode="dot", logra=logra, model=model), n)   # rows split across processes
    if topo.process_index == 0:
        with open(f"{root}/result.json", "w") as f:
            json.dump({"processes": topo.process_count, "devices": topo.device_count, "stages": res}, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--devices", type=int, default=1, help="CPU devices per process")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--q", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--sizes", default="256,512,512,10")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "distributed_throughput.json"))
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from jaxval.distributed import launch

    rows = []
    for p in args.procs:
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--workdir", d, "--n", str(args.n),
                   "--q", str(args.q), "--batch", str(args.batch), "--rank", str(args.rank), "--sizes", args.sizes]
            env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
            codes = launch(p, cmd, timeout=args.timeout, local_devices=args.devices, env=env)
            if any(codes):
                raise SystemExit(f"{p} processes failed: exit codes {list(codes)}")
            with open(os.path.join(d, "result.json")) as f:
                rows.append(json.load(f))
    print(f"\n{'procs':>5} {'devices':>7} | " + " | ".join(f"{s:>27}" for s in ("log", "fit_kfac", "score")))
    print(f"{'':>5} {'':>7} | " + " | ".join(f"{'rows/s/proc':>13} {'aggregate':>13}" for _ in range(3)))
    for r in rows:
        st = r["stages"]
        print(f"{r['processes']:>5} {r['devices']:>7} | " + " | ".join(
            f"{st[s]['rows_per_s_per_process']:>13.0f} {st[s]['rows_per_s_aggregate']:>13.0f}"
            for s in ("log", "fit_kfac", "score")))
    out = {"benchmark": "distributed_throughput", "host": platform.node(), "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "config": {k: v for k, v in vars(args).items()
                                                     if k not in ("worker", "workdir", "out")},
           "results": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
