"""Per-call overhead of the scoring engine on a small problem, as ratios to a jitted matrix product.

The digits MLP (sklearn's bundled 8×8 digits, ``jaxval.models.mlp.MLP`` 64-128-10), LoGra rank 32,
an EK-FAC preconditioner, Q = 64 query gradients, N = 1,024 training gradients (a jax array).  Each
repetition calls, side by side and with fresh query values each call (same shape):

- ``dot``:      a jitted ``q @ z.T`` of the same shapes (float32, precision highest), copied to the host,
- ``influence (dot)``, ``influence (cosine)``, ``top_k (k=10, dot)``: the engine with the preconditioner,
- ``pc.apply``: the preconditioner on the ``[Q, D]`` queries alone,
- ``pc.apply + dot``: the jitted ``pc.apply(q) @ z.T`` (the work a dot-mode call really does),

and reports each one's median time and its ratio to ``dot``'s.  A ratio near 1 means the call costs
what its arithmetic costs; the overhead being fixed was 54-291x (kernels rebuilt and recompiled on every
call, cosine recomputing every training self-influence).

Run::

    python benchmarks/call_overhead.py                         # ~1 minute on 2 CPU cores
    python benchmarks/call_overhead.py --repeats 50 --out /tmp/x.json

Writes ``benchmarks/results/call_overhead.json`` (``--out``).  To measure another checkout (e.g. the
code before a change), run this file with ``PYTHONPATH`` pointing at that checkout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "call_overhead.json"))
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jaxval as jv
    from jaxval.data.digits import load_digits
    from jaxval.models.mlp import MLP, loss_fn

    d = load_digits()
    n, nq = args.rows, args.queries
    train = {"x": jnp.asarray(d["x_train"][:n]), "y": jnp.asarray(d["y_train"][:n])}
    test = {"x": jnp.asarray(d["x_test"][:nq]), "y": jnp.asarray(d["y_test"][:nq])}
    model = MLP((64, 128, 10), rngs=nnx.Rngs(0))
    logra = jv.LoGra(model, loss_fn, rank=args.rank, seed=0)
    z = logra.grads(model, train)                       # [N, D] jax array
    gq = np.asarray(logra.grads(model, test))           # [Q, D]
    pc = jv.fit_preconditioner(logra, model, train, kind="ekfac", damping=1e-3, batch_size=256, progress=False)
    dim = int(z.shape[1])
    rng = np.random.default_rng(0)
    fresh = [(gq * (1 + 0.01 * rng.standard_normal(gq.shape))).astype(np.float32) for _ in range(args.repeats + 3)]

    dot = jax.jit(lambda q, z: jnp.dot(q, z.T, precision="highest"))
    apply_dot = jax.jit(lambda q, z: jnp.dot(pc.apply(q), z.T, precision="highest"))
    calls = {
        "dot": lambda q: np.asarray(dot(q, z)),
        "influence (dot)": lambda q: jv.influence(q, z, precond=pc, mode="dot", unchecked=True),
        "influence (cosine)": lambda q: jv.influence(q, z, precond=pc, mode="cosine", unchecked=True),
        "top_k (k=10, dot)": lambda q: jv.top_k(q, z, 10, precond=pc, mode="dot", unchecked=True)[0],
        "pc.apply": lambda q: np.asarray(pc.apply(q)),
        "pc.apply + dot": lambda q: np.asarray(apply_dot(q, z)),
    }
    first = {}
    for name, call in calls.items():                   # first calls (compilation), timed apart
        t0 = time.perf_counter()
        call(fresh[0])
        first[name] = time.perf_counter() - t0
    for name, call in calls.items():
        call(fresh[1])
    times = {name: [] for name in calls}
    for r in range(args.repeats):                      # side by side: every call once per repetition
        q = fresh[r + 2]
        for name, call in calls.items():
            t0 = time.perf_counter()
            call(q)
            times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(t)) for name, t in times.items()}
    rows = [{"call": name, "median_ms": med[name] * 1e3, "ratio_to_dot": med[name] / med["dot"],
             "first_call_ms": first[name] * 1e3} for name in calls]

    result = {
        "label": args.label,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "jax": jax.__version__,
                    "cpus": os.cpu_count(), "devices": [str(x) for x in jax.devices()]},
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "problem": {"model": "MLP 64-128-10 (digits)", "rank": args.rank, "kind": "ekfac", "Q": nq, "N": n, "D": dim,
                    "repeats": args.repeats},
        "rows": rows,
    }
    print(f"{args.label}: digits MLP, rank {args.rank}, EK-FAC, Q = {nq}, N = {n}, D = {dim}; median of "
          f"{args.repeats} calls with fresh queries")
    print(f"| call | median (ms) | ratio to dot | first call (ms) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['call']} | {r['median_ms']:.2f} | {r['ratio_to_dot']:.1f}x | {r['first_call_ms']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
