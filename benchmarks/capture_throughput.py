"""LoGra.grads throughput: the traced-computation capture vs an older jaxval (nnx module patching), side by side.

Two worker processes, one importing this checkout's ``jaxval``, one an older tree (``--old``: a folder
holding a ``jaxval`` package, e.g. ``git archive 648f3cc jaxval | tar -x -C /tmp/jaxval_old``). Each builds
the same models and LoGras and compiles them; then the driver asks them for one timed ``grads`` call in
turn (old, new, old, new, ...) so that the load of a shared machine hits both alike. Reports the median
of ``--reps`` calls per worker and the ratio new / old (time per batch: > 1 means slower).

Workloads: ``token`` (TokenMLP 1000 x 256, 4 residual MLP blocks of 1024, 16 x 128 tokens, every layer) and
``smollm2`` (SmolLM2-135M real weights, the 90 MLP layers, 4 x 128 tokens), each in float32 and with
``compute_dtype="bfloat16"``; rank 64.

    python benchmarks/capture_throughput.py --old /tmp/jaxval_old [--reps 7] [--workloads token,smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

WORKER = r"""
import sys, time, json, warnings
sys.path.insert(0, sys.argv[1])
warnings.simplefilter("ignore")
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import jaxval as jv
from jaxval.models import token_mlp, llama
names = sys.argv[2].split(",")
fns = {}
for w in names:
    kind, dtype = w.split(":")
    cd = None if dtype == "float32" else dtype
    if kind == "token":
        model = token_mlp.TokenMLP(1000, 256, 4, 1024, rngs=nnx.Rngs(0))
        batch = jax.tree.map(jnp.asarray, token_mlp.random_batch(16, 128, 1000, seed=0))
        lg = jv.LoGra(model, token_mlp.loss_fn, rank=64, compute_dtype=cd)
    else:
        model, _ = llama.load_smollm2()
        rng = np.random.default_rng(0)
        batch = {"tokens": jnp.asarray(rng.integers(3, model.cfg.vocab_size, (4, 128)), jnp.int32),
                 "mask": jnp.ones((4, 128), jnp.float32)}
        lg = jv.LoGra(model, llama.loss_fn, rank=64, layers=r"mlp", compute_dtype=cd)
    f = (lambda lg=lg, model=model, batch=batch: lg.grads(model, batch).block_until_ready())
    t = time.perf_counter(); f(); f()
    fns[w] = f
    print(json.dumps({"ready": w, "compile_s": time.perf_counter() - t, "layers": len(lg.layers)}), flush=True)
print(json.dumps({"ready": "all"}), flush=True)
for line in sys.stdin:
    w = line.strip()
    t = time.perf_counter(); fns[w](); dt = time.perf_counter() - t
    print(json.dumps({"w": w, "s": dt}), flush=True)
"""


def start(root, workloads):
    p = subprocess.Popen([sys.executable, "-c", WORKER, root, ",".join(workloads)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    info = {}
    while True:
        msg = json.loads(p.stdout.readline())
        if msg["ready"] == "all":
            return p, info
        info[msg["ready"]] = msg


def ask(p, w) -> float:
    p.stdin.write(w + "\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())["s"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="folder holding the older jaxval package")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--workloads", default="token,smollm2")
    ap.add_argument("--out", default="benchmarks/results/capture_throughput.json")
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for kind in args.workloads.split(","):
        ws = [f"{kind}:float32", f"{kind}:bfloat16"]
        old, oinfo = start(args.old, ws)
        new, ninfo = start(here, ws)
        times = {(v, w): [] for v in ("old", "new") for w in ws}
        for _ in range(args.reps):
            for w in ws:
                times[("old", w)].append(ask(old, w))
                times[("new", w)].append(ask(new, w))
        for p in (old, new):
            p.stdin.close()
            p.wait()
        for w in ws:
            mo, mn = statistics.median(times[("old", w)]), statistics.median(times[("new", w)])
            ratios = [n / o for o, n in zip(times[("old", w)], times[("new", w)])]
            rows.append({"workload": w, "layers": ninfo[w]["layers"], "old_median_s": mo, "new_median_s": mn,
                         "ratio_of_medians": mn / mo, "median_pair_ratio": statistics.median(ratios),
                         "old_all_s": times[("old", w)], "new_all_s": times[("new", w)],
                         "old_first_s": oinfo[w]["compile_s"], "new_first_s": ninfo[w]["compile_s"]})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "load": os.getloadavg(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print("| workload | layers | old s/batch | new s/batch | new/old (medians) | median of paired ratios |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['layers']} | {r['old_median_s']:.3f} | {r['new_median_s']:.3f} | "
              f"{r['ratio_of_medians']:.3f} | {r['median_pair_ratio']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
