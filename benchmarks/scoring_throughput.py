"""Scoring throughput of jaxval.influence from an on-disk gradient store vs this machine's GEMM rate.

What it measures, in one run (the machine is shared and noisy: compare the ratios, not the absolutes):

1. The float32 GEMM rate of this machine: ``jnp.dot(queries [Q, D], train [N, D].T)`` jitted, all in
   memory (the same shapes as the whole scoring problem), and the same GEMM done block by block.
2. ``influence(queries, store, mode=...)`` reading a store on disk (a ``jaxval.store.GradientStore``
   when that module exists, else a raw ``np.memmap`` file: the JSON says which), in multiply-adds/s
   (``Q·D·N / seconds``): the default (reads in the calling thread overlapped with the GEMMs by
   jax's async dispatch, through the store's own ``iter_blocks`` read-ahead when it has one),
   ``prefetch=0`` (plain ``store.read``), ``prefetch=2`` (a background reader thread), ``cosine``
   (adds the train self-influence), ``top_k``, an in-memory numpy array, and a read-only pass.  All cases run once per round, ``--repeats`` interleaved
   rounds; a case's ratio to the GEMM is the median over rounds of the within-round ratio.
3. Peak memory of ``top_k`` for two training sizes (default N/4 and 4N; rows beyond N re-read the
   store cyclically), each in a fresh subprocess after a warm-up pass over the store (the same for
   both sizes): the peak of the process's
   resident *anonymous* memory (RSS minus file-backed pages, sampled every 2 ms) above the level
   before the call, the peak bytes of live jax buffers, and ``tracemalloc``'s peak of Python/numpy
   allocations; with glibc's default malloc arenas and with ``MALLOC_ARENA_MAX=2`` (tensorstore's
   reader threads allocate, the main thread frees: with many arenas RSS creeps up until the arenas
   are warm, which is allocator retention, not live data).  None should grow with N (the ``[Q, N]``
   score matrix, shown for comparison, is never formed).

Usage::

    python benchmarks/scoring_throughput.py                 # ~1 minute on 2 CPU cores
    python benchmarks/scoring_throughput.py --rows 262144 --dim 4096 --queries 512   # larger

Writes ``benchmarks/results/scoring_throughput.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------------
# store on disk


class MemmapStore:
    """Fallback store: a raw float32 file opened as np.memmap (used when jaxval.store is missing)."""

    def __init__(self, path, n, dim, mode="r"):
        self.file = Path(path) / "grads.f32"
        self.mm = np.memmap(self.file, dtype=np.float32, mode=mode, shape=(n, dim))
        self.dim = dim
        self.path = str(path)

    def __len__(self):
        return self.mm.shape[0]

    def read(self, start, stop):
        return np.array(self.mm[start:stop], dtype=np.float32)  # a real read, like a store's

    def write(self, start, rows):
        self.mm[start:start + len(rows)] = rows


class RowView:
    """n rows of a store, wrapping around it when n > len(store) (a bigger N without more disk)."""

    def __init__(self, store, n):
        self.store, self.n, self.dim = store, n, store.dim

    def __len__(self):
        return self.n

    def read(self, start, stop):
        m = len(self.store)
        parts, s = [], start
        while s < stop:
            a = s % m
            b = min(m, a + (stop - s))
            parts.append(self.store.read(a, b))
            s += b - a
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def make_store(path: Path, n: int, dim: int, dtype: str, seed: int):
    """Create and fill a store with seeded random rows; returns (store, kind)."""
    try:
        from jaxval import GradientStore
    except ImportError:
        GradientStore = None
    rng = np.random.default_rng(seed)
    if GradientStore is not None:
        store = GradientStore.create(path, dim=dim, num_rows=n, dtype=dtype, config={"bench": "scoring"})
        step = store.chunk_rows * max(1, 4096 // store.chunk_rows)
        for s in range(0, n, step):
            rows = rng.standard_normal((min(step, n - s), dim), dtype=np.float32)
            store.write(s, rows, mark_done=True)
        return store, f"jaxval.store.GradientStore (zarr3, {dtype}, chunk_rows={store.chunk_rows})"
    path.mkdir(parents=True, exist_ok=True)
    store = MemmapStore(path, n, dim, mode="w+")
    for s in range(0, n, 4096):
        store.write(s, rng.standard_normal((min(4096, n - s), dim), dtype=np.float32))
    store.mm.flush()
    return MemmapStore(path, n, dim, mode="r"), "np.memmap float32 file (jaxval.store not available)"


def open_store(path: Path, n: int, dim: int):
    try:
        from jaxval import GradientStore

        return GradientStore.open(path)
    except ImportError:
        return MemmapStore(path, n, dim, mode="r")


# --------------------------------------------------------------------------------------------------
# timing helpers


def anon_rss() -> int:
    import psutil

    m = psutil.Process().memory_info()
    return int(m.rss - getattr(m, "shared", 0))


def live_jax_bytes() -> int:
    import jax

    total = 0
    for a in jax.live_arrays():
        try:
            total += a.nbytes
        except Exception:  # deleted meanwhile
            pass
    return total


class PeakSampler:
    """Peaks of anonymous RSS and of live jax buffer bytes, sampled every 2 ms in a thread."""

    def __init__(self, interval=0.002):
        self.interval, self._stop = interval, threading.Event()

    def __enter__(self):
        self.base, self.jax_base = anon_rss(), live_jax_bytes()
        self.peak, self.jax_peak = self.base, self.jax_base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        self.peak = max(self.peak, anon_rss())
        self.jax_peak = max(self.jax_peak, live_jax_bytes())

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()


# --------------------------------------------------------------------------------------------------
# top-k memory, in a subprocess


def topk_memory_child(args) -> None:
    import jaxval as inf

    store = open_store(Path(args.workdir) / "store", args.rows, args.dim)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    br = args.block_rows
    # warm-up, the same for every measured size: one pass over the whole store (compiles the same
    # kernels, same block shape; brings glibc's arenas to their working size)
    inf.top_k(q, RowView(store, args.rows), args.k, block_rows=br, progress=False)
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    with PeakSampler() as ps:
        inf.top_k(q, RowView(store, args.child_rows), args.k, block_rows=br, progress=False)
    seconds = time.perf_counter() - t0
    _, tm_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print("RESULT" + json.dumps({
        "rows": args.child_rows,
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX", "default"),
        "seconds": seconds,
        "peak_anon_rss_delta_bytes": ps.peak - ps.base,
        "peak_live_jax_bytes": ps.jax_peak,
        "tracemalloc_peak_bytes": tm_peak,
        "score_matrix_bytes": args.queries * args.child_rows * 4,
        "block_bytes": br * args.dim * 4,
    }))


def topk_memory(args, rows: int, arena_max: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child-topk", "--child-rows", str(rows)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k in ("queries", "dim", "rows", "block_rows", "k", "workdir")
    ]
    env = dict(os.environ)
    env.pop("MALLOC_ARENA_MAX", None)
    if arena_max:
        env["MALLOC_ARENA_MAX"] = arena_max
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=256, help="Q")
    ap.add_argument("--dim", type=int, default=2048, help="D")
    ap.add_argument("--rows", type=int, default=32768, help="N (training rows in the store)")
    ap.add_argument("--dtype", default="float32", help="store dtype (GradientStore only)")
    ap.add_argument("--block-rows", type=int, default=None, help="default: the library default")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--topk-rows", default=None, help="two N for the top-k memory runs (default N/4,4N)")
    ap.add_argument("--workdir", default=None, help="where the store is written (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scoring_throughput.json"))
    ap.add_argument("--child-topk", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-rows", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_topk:
        return topk_memory_child(args)

    import jax


    import jaxval as inf

    Q, D, N, B = args.queries, args.dim, args.rows, args.block_rows
    madds = Q * D * N
    own_tmp = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="jaxval_bench_")
    results: dict = {
        "config": {"queries": Q, "dim": D, "rows": N, "block_rows": B, "k": args.k, "repeats": args.repeats,
                   "store_dtype": args.dtype},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]},
    }
    try:
        t0 = time.perf_counter()
        store, kind = make_store(Path(args.workdir) / "store", N, D, args.dtype, seed=0)
        results["store"] = {"kind": kind, "bytes": N * D * 4 if "memmap" in kind else store.nbytes_on_disk(),
                            "write_seconds": time.perf_counter() - t0}
        rng = np.random.default_rng(1)
        q = rng.standard_normal((Q, D), dtype=np.float32)

        import jax.numpy as jnp

        from jaxval._src.scoring.sources import resolve_block_rows

        B = B or resolve_block_rows(None, N, D, None, 1, getattr(store, "chunk_rows", None))
        results["config"]["block_rows"] = args.block_rows = B
        qa = jax.device_put(q)
        za = jax.device_put(store.read(0, N))
        gemm = jax.jit(lambda a, b: jnp.dot(a, b.T, precision="highest"))
        zb = za[:B]

        def read_all():
            for s in range(0, N, B):
                store.read(s, min(s + B, N))

        arr = np.asarray(za)
        cases = {
            "GEMM [Q,D]x[D,N], in memory": lambda: gemm(qa, za).block_until_ready(),
            "GEMM [Q,D]x[D,block], x blocks": lambda: [gemm(qa, zb).block_until_ready() for _ in range(0, N, B)],
            "store read only (no scoring)": read_all,
            "influence dot, store (default)":
                lambda: inf.influence(q, store, mode="dot", block_rows=B, progress=False),
            "influence dot, store, prefetch=0":
                lambda: inf.influence(q, store, mode="dot", block_rows=B, prefetch=0, progress=False),
            "influence dot, store, prefetch=2 (thread)":
                lambda: inf.influence(q, store, mode="dot", block_rows=B, prefetch=2, progress=False),
            "influence cosine, store (+self-infl.)":
                lambda: inf.influence(q, store, mode="cosine", block_rows=B, progress=False),
            "top_k dot k=%d, store" % args.k:
                lambda: inf.top_k(q, store, args.k, mode="dot", block_rows=B, progress=False),
            "influence dot, numpy in memory":
                lambda: inf.influence(q, arr, mode="dot", block_rows=B, progress=False),
        }
        # interleaved rounds: every case once per round, so a load change on the shared machine hits
        # all cases alike; ratios are taken within a round, then the median over rounds
        for fn in cases.values():
            fn()  # warm-up: compile, page cache
        times = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        del arr, za, zb
        gemm_t = np.array(times["GEMM [Q,D]x[D,N], in memory"])
        rows = []
        for name, ts in times.items():
            ts = np.array(ts)
            rows.append({
                "case": name, "seconds": float(np.median(ts)), "seconds_all": ts.tolist(),
                "madds_per_s": float(madds / np.median(ts)) if not name.startswith("store read") else None,
                "ratio_to_gemm": float(np.median(gemm_t / ts)),
            })
        results["scoring"] = rows
        results["gemm_madds_per_s"] = float(madds / np.median(gemm_t))
        results["read_only_bytes_per_s"] = float(N * D * 4 / np.median(times["store read only (no scoring)"]))
        results["target_ratio"] = 0.5
        results["ratio_influence_store"] = next(r for r in rows if r["case"] == "influence dot, store (default)")["ratio_to_gemm"]

        ns = ([int(x) for x in args.topk_rows.split(",")] if args.topk_rows else [max(4 * B, N // 4), 4 * N])
        results["topk_memory"] = [topk_memory(args, n, am) for am in (None, "2") for n in ns]
    finally:
        if own_tmp and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)

    # ---- report
    print(f"\nstore: {results['store']['kind']}\nQ={Q} D={D} N={N} block_rows={B}, backend "
          f"{results['machine']['backend']}, {os.cpu_count()} cpus; {args.repeats} interleaved rounds, medians")
    print(f"GEMM rate {results['gemm_madds_per_s'] / 1e9:.1f} G madd/s; store read-only "
          f"{results['read_only_bytes_per_s'] / 2**30:.2f} GiB/s\n")
    print(f"{'case':42s} {'seconds':>8s} {'G madd/s':>9s} {'ratio to GEMM':>14s}")
    for r in results["scoring"]:
        rate = "" if r["madds_per_s"] is None else f"{r['madds_per_s'] / 1e9:9.1f}"
        print(f"{r['case']:42s} {r['seconds']:8.3f} {rate:>9s} {r['ratio_to_gemm']:14.2f}")
    print("\ntop_k memory (fresh process per row; rows > N re-read the store cyclically):")
    print(f"{'rows':>7s} {'MALLOC_ARENA_MAX':>16s} {'seconds':>8s} {'peak anon RSS Δ MiB':>20s} "
          f"{'peak live jax MiB':>18s} {'tracemalloc MiB':>16s} {'[Q,N] MiB':>10s} {'block MiB':>10s}")
    for m in results["topk_memory"]:
        print(f"{m['rows']:7d} {m['malloc_arena_max']:>16s} {m['seconds']:8.2f} "
              f"{m['peak_anon_rss_delta_bytes'] / 2**20:20.1f} {m['peak_live_jax_bytes'] / 2**20:18.1f} "
              f"{m['tracemalloc_peak_bytes'] / 2**20:16.1f} {m['score_matrix_bytes'] / 2**20:10.1f} "
              f"{m['block_bytes'] / 2**20:10.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
