"""Side-by-side benchmark: jaxval vs LogIX (or dattri's LoGra, ``--peer dattri``) on the same models, weights,
data and machine, one run.

    python benchmarks/peers/run.py [--peer logix|dattri] [--workloads token fmnist smollm2] [--rounds 5]

(The JSON keeps the key "logix" for whichever peer ran; "peer" names it.)

Each framework runs in its own long-lived worker process (jaxval under JAXVAL_PY, LogIX under PEERS_PY with
the CPU torch); the driver sends the same command to one, then the other, alternating which goes first
(A B, B A, ...), so that a noisy shared machine hits both alike. Reported: medians and per-pair ratios of
logging (examples/s incl. writing the log to disk), the training step of each framework, the jaxval
LoGra step alone, peak RSS, bytes on disk per example, scoring time for Q x N.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import common  # noqa: E402


class Worker:
    def __init__(self, name, python, script, env=None):
        self.name = name
        e = dict(os.environ)
        e.update(env or {})
        self.log = open(f"/tmp/peers_{name}.log", "w")
        self.p = subprocess.Popen([python, str(HERE / script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.log, text=True, env=e, cwd=str(ROOT))

    def __call__(self, op, **kw):
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} worker died; see /tmp/peers_{self.name}.log")
            if line.startswith(common.RESULT):
                res = json.loads(line[len(common.RESULT):])
                if "error" in res:
                    raise RuntimeError(f"{self.name} {op}: {res['error']} (see /tmp/peers_{self.name}.log)")
                return res

    def close(self):
        try:
            self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.p.stdin.flush()
            self.p.wait(timeout=30)
        except Exception:
            self.p.kill()


PEER_NAMES = {"logix": "LogIX", "dattri": "dattri LoGra", "trak": "TRAK"}


def med(x):
    return st.median(x) if x else float("nan")


def pairs(a, b):
    """Per-pair ratios b/a (a = jaxval time, b = peer time -> >1 means jaxval faster)."""
    return [y / x for x, y in zip(a, b)]


def bench(workload, args):
    tmp = Path(args.tmp) / workload
    tmp.mkdir(parents=True, exist_ok=True)
    weights = str(tmp / "weights.npz")
    jx = Worker("jaxval", args.jaxval_py, "worker_jaxval.py")
    lx = Worker(args.peer, args.peers_py, f"worker_{args.peer}.py", {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
                                                                     "PEERS_TORCH_THREADS": str(args.torch_threads),
                                                                     "PEERS_AUTOCAST": args.peer_autocast or ""})
    w = common.WORKLOADS[workload]
    kw = dict(rank=args.rank, n_log=args.n_log or w["n_log"], n_score=args.n_score or w["n_score"],
              q=args.q or w["q"])
    R = {"workload": workload, "peer": args.peer, "jaxval_compute_dtype": args.compute_dtype or "float32",
         "peer_autocast": args.peer_autocast or "none", "config": {**w, **kw, "torch_threads": args.torch_threads}, "rounds": args.rounds}
    try:
        R["setup"] = {"jaxval": jx("setup", workload=workload, weights=weights, compute_dtype=args.compute_dtype, **kw)}
        R["setup"]["logix"] = lx("setup", workload=workload, weights=weights, root=str(tmp / args.peer), **kw)
        l0, l1 = R["setup"]["jaxval"]["loss0"], R["setup"]["logix"]["loss0"]
        R["loss_parity_rel"] = abs(l0 - l1) / abs(l0)
        print(f"[{workload}] setup done; summed loss jaxval {l0:.4f} torch {l1:.4f}", flush=True)
        T = {k: [] for k in ("jx_train", "lx_train", "jx_grads", "jx_log", "lx_log")}
        last = {}
        nb = args.steps
        log_rounds = args.rounds if args.log_rounds is None else args.log_rounds
        for r in range(log_rounds):
            order = [("jaxval", jx), ("logix", lx)][:: 1 if r % 2 == 0 else -1]
            for name, wk in order:
                pre = "jx" if name == "jaxval" else "lx"
                T[f"{pre}_train"].append(med(wk("train", n=nb)["times"]))
                if name == "jaxval":
                    T["jx_grads"].append(med(wk("grads", n=nb)["times"]))
                res = wk("log", path=str(tmp / "jaxval_store"))
                T[f"{pre}_log"].append(res["seconds"])
                last[name] = res
            print(f"[{workload}] round {r + 1}/{log_rounds}: log s jaxval {T['jx_log'][-1]:.3f} "
                  f"logix {T['lx_log'][-1]:.3f}", flush=True)
        n = last["jaxval"]["n"] if last else 0
        R["logging"] = {} if not last else {
            "n_examples": n, "times_s": T,
            "jaxval_examples_per_s": n / med(T["jx_log"]), "logix_examples_per_s": n / med(T["lx_log"]),
            "ratio_per_pair": pairs(T["jx_log"], T["lx_log"]), "ratio_median": med(pairs(T["jx_log"], T["lx_log"])),
            "jaxval_train_step_s": med(T["jx_train"]), "logix_train_step_s": med(T["lx_train"]),
            "torch_over_jax_train_ratio_per_pair": pairs(T["lx_train"], T["jx_train"]),
            "jaxval_logra_step_s": med(T["jx_grads"]),
            "jaxval_logra_over_train": med(T["jx_grads"]) / med(T["jx_train"]),
            "batch": w["batch"],
            "jaxval_bytes_per_example": last["jaxval"]["bytes_per_example"],
            "logix_bytes_per_example": last["logix"]["bytes_per_example"],
            "jaxval_peak_rss_mb": last["jaxval"]["peak_rss_mb"], "logix_peak_rss_mb": last["logix"]["peak_rss_mb"],
        }
        # scoring: log N once per side (timed: a larger logging sample), then alternate scoring
        sp = {"jaxval": jx("score_prep", path=str(tmp / "jaxval_score_store"))}
        sp["logix"] = lx("score_prep")
        R["score_prep"] = sp
        S = {"jaxval": [], "logix": []}
        # one untimed call each first: jaxval compiles its scoring kernel for the shapes; LogIX warms its loader
        R["scoring_first_call_s"] = {"jaxval": jx("score")["seconds"], "logix": lx("score")["seconds"]}
        for r in range(args.rounds):
            for name, wk in [("jaxval", jx), ("logix", lx)][:: 1 if r % 2 == 0 else -1]:
                res = wk("score")
                S[name].append(res["seconds"])
                R.setdefault("score_shape", res["shape"])
                last[name] = res
        R["scoring"] = {"Q": kw["q"], "N": sp["jaxval"]["n"], "times_s": S,
                        "jaxval_s": med(S["jaxval"]), "logix_s": med(S["logix"]),
                        "ratio_per_pair": pairs(S["jaxval"], S["logix"]),
                        "ratio_median": med(pairs(S["jaxval"], S["logix"])),
                        "jaxval_peak_rss_mb": last["jaxval"]["peak_rss_mb"],
                        "logix_peak_rss_mb": last["logix"]["peak_rss_mb"]}
    finally:
        jx.close()
        lx.close()
    return R


def table(R):
    L, S = R["logging"], R["scoring"]
    peer = PEER_NAMES[R.get("peer", "logix")]
    rows = [] if not L else [
        ("logging examples/s (N=%d, incl. disk)" % L["n_examples"], f"{L['jaxval_examples_per_s']:.1f}",
         f"{L['logix_examples_per_s']:.1f}", f"{L['ratio_median']:.2f}× ({', '.join(f'{x:.2f}' for x in L['ratio_per_pair'])})"),
        ("training step s/batch (own framework)", f"{L['jaxval_train_step_s']*1e3:.0f} ms",
         f"{L['logix_train_step_s']*1e3:.0f} ms", f"torch/jax {med(L['torch_over_jax_train_ratio_per_pair']):.2f}"),
        ("jaxval LoGra step alone", f"{L['jaxval_logra_step_s']*1e3:.0f} ms", "",
         f"{L['jaxval_logra_over_train']:.2f}× of jax train step"),
        ("bytes on disk / example", f"{L['jaxval_bytes_per_example']:.0f}", f"{L['logix_bytes_per_example']:.0f}",
         f"{L['jaxval_bytes_per_example'] / L['logix_bytes_per_example']:.2f}"),
        ("peak RSS after logging (MB)", f"{L['jaxval_peak_rss_mb']:.0f}", f"{L['logix_peak_rss_mb']:.0f}",
         f"{L['jaxval_peak_rss_mb'] / L['logix_peak_rss_mb']:.2f}")]
    rows += [
        ("logging examples/s (N=%d, one pass)" % S["N"], f"{R['score_prep']['jaxval']['examples_per_s']:.1f}",
         f"{R['score_prep']['logix']['examples_per_s']:.1f}",
         f"{R['score_prep']['jaxval']['examples_per_s'] / R['score_prep']['logix']['examples_per_s']:.2f}×"),
        ("scoring Q=%d × N=%d (dot)" % (S["Q"], S["N"]), f"{S['jaxval_s']*1e3:.0f} ms", f"{S['logix_s']*1e3:.0f} ms",
         f"{S['ratio_median']:.1f}× ({', '.join(f'{x:.1f}' for x in S['ratio_per_pair'])})"),
        ("peak RSS after scoring (MB)", f"{S['jaxval_peak_rss_mb']:.0f}", f"{S['logix_peak_rss_mb']:.0f}",
         f"{S['jaxval_peak_rss_mb'] / S['logix_peak_rss_mb']:.2f}"),
    ]
    dt = f"; jaxval compute {R.get('jaxval_compute_dtype', 'float32')}, peer autocast {R.get('peer_autocast', 'none')}"
    out = [f"### {R['workload']} vs {peer} (D jaxval {R['setup']['jaxval']['dim']}, {peer} "
           f"{R['setup']['logix']['dim']}; {R['setup']['jaxval']['params']:,} params; batch {L.get('batch', '-')}{dt})", "",
           f"| metric | jaxval | {peer} | ratio (median; per pair) |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", nargs="+", default=["token", "fmnist"])
    ap.add_argument("--peer", choices=sorted(PEER_NAMES), default="logix",
                    help="the other side: LogIX (worker_logix.py) or dattri's LoGraAttributor (worker_dattri.py)")
    ap.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16"],
                    help="jaxval LoGra compute_dtype (bfloat16: bf16 products, float32 accumulation)")
    ap.add_argument("--peer-autocast", default=None, choices=["bfloat16"],
                    help="run the LogIX side under torch.autocast('cpu', bfloat16)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--log-rounds", type=int, default=None,
                    help="logging rounds (default --rounds; 0: scoring only, for a peer whose logging is very slow)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=64)
    # sizes: default each workload's n_log / n_score / q in common.WORKLOADS
    ap.add_argument("--n-log", type=int, default=None, help="examples logged per round")
    ap.add_argument("--n-score", type=int, default=None, help="examples logged for scoring (N)")
    ap.add_argument("--q", type=int, default=None, help="query examples (Q)")
    ap.add_argument("--jaxval-py", default=str(ROOT / ".venv/bin/python"))
    ap.add_argument("--peers-py", default=str(ROOT / ".venv-peers/bin/python"))
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                    help="torch intra-op threads for the peers (1 is faster on an oversubscribed machine)")
    ap.add_argument("--tmp", default="/tmp/jaxval_peers")
    ap.add_argument("--tag", default="", help="suffix of the JSON name: peers_<workload><tag>.json")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "command": " ".join(sys.argv)}
    md = []
    for wl in args.workloads:
        t0 = time.time()
        R = bench(wl, args)
        R["meta"] = {**meta, "loadavg_end": os.getloadavg(), "wall_s": time.time() - t0}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / f"peers_{wl}{'' if args.peer == 'logix' else '_' + args.peer}{args.tag}.json", "w") as f:
            json.dump(R, f, indent=1)
        md.append(table(R) + f"\n\n{R['meta']['date']}, load start {tuple(round(x, 2) for x in R['meta']['loadavg_start'])}, "
                  f"end {tuple(round(x, 2) for x in R['meta']['loadavg_end'])}, wall {R['meta']['wall_s']:.0f} s, "
                  f"torch threads {args.torch_threads}")
        print(md[-1], flush=True)
    print(f"\n{meta['date']}, {meta['machine']}, {meta['cpus']} CPUs, load {meta['loadavg_start']}")


if __name__ == "__main__":
    main()
