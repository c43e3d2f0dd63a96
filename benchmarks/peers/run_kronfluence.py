"""Side by side: jaxval's un-projected EK-FAC vs Kronfluence's EK-FAC, same model, weights, data, machine.

    python benchmarks/peers/run_kronfluence.py [--n 2048] [--q 64] [--rounds 3]

Workers as in run.py (jaxval under JAXVAL_PY, Kronfluence under PEERS_PY with the CPU torch), calls
alternating A B, B A. Per round each side fits EK-FAC on the N training examples (two passes: K-FAC factors +
eigendecomposition, then the eigenvalues re-fitted in that basis) and scores Q test queries x the same N
training examples. One untimed fit + score per side first on one training batch (jaxval compiles there for
the same shapes); those first-call times are reported too. Damping matched: both 0.1 x the mean re-fitted eigenvalue of each layer (Kronfluence's
``damping_factor=None`` heuristic; jaxval's ``relative_damping=0.1``); empirical Fisher (true labels) on both.
Agreement of the two [Q, N] score matrices: Spearman per query, Pearson, top-10 overlap; also at an absolute
damping of 1e-8 (Kronfluence's default) on both sides, untimed.
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

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from run import Worker, med, pairs  # noqa: E402


def agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> dict:
    """a, b [Q, N]; a = jaxval, b = Kronfluence."""
    from scipy.stats import spearmanr

    sp = np.array([spearmanr(x, y).statistic for x, y in zip(a, b)])
    pq = np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)])
    top = np.array([len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k])) / k for x, y in zip(a, b)])
    return {"spearman_per_query_mean": float(sp.mean()), "spearman_per_query_min": float(sp.min()),
            "pearson_all": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
            "pearson_per_query_mean": float(pq.mean()),
            f"top{k}_overlap_mean": float(top.mean()),
            "rel_l2_diff": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
            "scale_jaxval_over_kronfluence": float((a * b).sum() / (b * b).sum()),
            "sign_agreement": float(np.mean(np.sign(a) == np.sign(b)))}


def bench(args):
    workload = "fmnist"
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    weights = str(tmp / "weights.npz")
    jx = Worker("jaxval_ekfac", args.jaxval_py, "worker_jaxval.py")
    kf = Worker("kronfluence", args.peers_py, "worker_kronfluence.py",
                {"PEERS_TORCH_THREADS": str(args.torch_threads)})
    R = {"workload": workload, "config": {**common.WORKLOADS[workload], "n": args.n, "q": args.q,
                                          "torch_threads": args.torch_threads, "fisher": "empirical",
                                          "relative_damping": args.relative_damping},
         "rounds": args.rounds}
    try:
        R["setup"] = {"jaxval": jx("setup", workload=workload, weights=weights, n_log=256, n_score=256, q=args.q)}
        R["setup"]["jaxval"].update(jx("ekfac_prep", n=args.n, q=args.q))
        R["setup"]["kronfluence"] = kf("setup", workload=workload, weights=weights, n=args.n, q=args.q,
                                       root=str(tmp / "kronfluence"))
        l0, l1 = R["setup"]["jaxval"]["loss0"], R["setup"]["kronfluence"]["loss0"]
        R["loss_parity_rel"] = abs(l0 - l1) / abs(l0)
        print(f"setup done; summed loss of the first batch jaxval {l0:.4f} torch {l1:.4f}; "
              f"D = {R['setup']['jaxval']['dim']:,}", flush=True)

        def run_jx(out, warm=False):
            f = jx("ekfac_fit", relative_damping=args.relative_damping, warm=warm)
            s = jx("ekfac_score", out=out, warm=warm)
            return f, s

        def run_kf(out, warm=False):
            f = kf("fit", warm=warm)
            s = kf("score", out=out, warm=warm)
            return f, s

        out = {"jaxval": str(tmp / "scores_jaxval.npy"), "kronfluence": str(tmp / "scores_kronfluence.npy")}
        cold = {}
        for name, fn in (("jaxval", run_jx), ("kronfluence", run_kf)):
            f, s = fn(out[name], warm=True)
            cold[name] = {"fit_s": f["seconds"], "score_s": s["seconds"]}
        R["first_call_one_batch"] = cold
        print(f"first calls, on one batch of {common.WORKLOADS[workload]['batch']} training examples "
              f"(jaxval compiles): {json.dumps(cold)}", flush=True)
        T = {f"{n}_{k}": [] for n in ("jaxval", "kronfluence") for k in ("fit", "score")}
        last = {}
        for r in range(args.rounds):
            order = [("jaxval", run_jx), ("kronfluence", run_kf)][:: 1 if r % 2 == 0 else -1]
            for name, fn in order:
                f, s = fn(out[name])
                T[f"{name}_fit"].append(f["seconds"])
                T[f"{name}_score"].append(s["seconds"])
                last[name] = {"fit": f, "score": s}
            print(f"round {r + 1}/{args.rounds}: fit s jaxval {T['jaxval_fit'][-1]:.2f} kronfluence "
                  f"{T['kronfluence_fit'][-1]:.2f}; score s jaxval {T['jaxval_score'][-1]:.2f} kronfluence "
                  f"{T['kronfluence_score'][-1]:.2f}", flush=True)
        R["times_s"] = T
        R["fit"] = {"jaxval_s": med(T["jaxval_fit"]), "kronfluence_s": med(T["kronfluence_fit"]),
                    "ratio_per_pair": pairs(T["jaxval_fit"], T["kronfluence_fit"]),
                    "ratio_median": med(pairs(T["jaxval_fit"], T["kronfluence_fit"])),
                    "jaxval_peak_rss_mb": last["jaxval"]["fit"]["peak_rss_mb"],
                    "kronfluence_peak_rss_mb": last["kronfluence"]["fit"]["peak_rss_mb"],
                    "kronfluence_factor_bytes_on_disk": last["kronfluence"]["fit"]["factor_bytes"]}
        R["scoring"] = {"Q": args.q, "N": args.n, "jaxval_s": med(T["jaxval_score"]),
                        "kronfluence_s": med(T["kronfluence_score"]),
                        "ratio_per_pair": pairs(T["jaxval_score"], T["kronfluence_score"]),
                        "ratio_median": med(pairs(T["jaxval_score"], T["kronfluence_score"])),
                        "jaxval_peak_rss_mb": last["jaxval"]["score"]["peak_rss_mb"],
                        "kronfluence_peak_rss_mb": last["kronfluence"]["score"]["peak_rss_mb"]}
        jx_lam = last["jaxval"]["score"]["damping"]
        kf_ev = last["kronfluence"]["fit"]["mean_eigenvalue"]
        R["damping"] = {
            "jaxval": {"rule": f"relative_damping={args.relative_damping}: λ = {args.relative_damping} × mean "
                               "re-fitted eigenvalue, per layer", "lambda": jx_lam,
                       "mean_eigenvalue": last["jaxval"]["fit"]["mean_eigenvalue"]},
            "kronfluence": {"rule": "ScoreArguments(damping_factor=None): λ = 0.1 (HEURISTIC_DAMPING_SCALE) × "
                                    "mean Lambda, per layer",
                            "lambda": {m: 0.1 * v for m, v in kf_ev.items()}, "mean_eigenvalue": kf_ev}}
        a, b = np.load(out["jaxval"]), np.load(out["kronfluence"])
        R["agreement"] = agreement(a, b)
        print("agreement (matched damping):", json.dumps(R["agreement"]), flush=True)
        # Kronfluence's default absolute damping (1e-8) on both sides, untimed, same factors
        jx("ekfac_score", out=out["jaxval"], damping=1e-8)
        kf("score", out=out["kronfluence"], damping=1e-8)
        R["agreement_damping_1e-8"] = agreement(np.load(out["jaxval"]), np.load(out["kronfluence"]))
        print("agreement (absolute damping 1e-8 both):", json.dumps(R["agreement_damping_1e-8"]), flush=True)
    finally:
        jx.close()
        kf.close()
    return R


def table(R):
    F, S, A, C = R["fit"], R["scoring"], R["agreement"], R["first_call_one_batch"]
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    rows = [
        ("EK-FAC fit, N=%d (2 passes + eigh)" % S["N"], f"{F['jaxval_s']:.2f} s", f"{F['kronfluence_s']:.2f} s",
         f"{F['ratio_median']:.2f}× ({fmt(F['ratio_per_pair'])})"),
        ("scoring Q=%d × N=%d" % (S["Q"], S["N"]), f"{S['jaxval_s']:.2f} s", f"{S['kronfluence_s']:.2f} s",
         f"{S['ratio_median']:.2f}× ({fmt(S['ratio_per_pair'])})"),
        ("first call, one batch of %d: fit / scoring" % R["config"]["batch"],
         f"{C['jaxval']['fit_s']:.2f} / {C['jaxval']['score_s']:.2f} s",
         f"{C['kronfluence']['fit_s']:.2f} / {C['kronfluence']['score_s']:.2f} s", "(jaxval compiles here)"),
        ("peak RSS of the worker, end of the run (MB)", f"{S['jaxval_peak_rss_mb']:,.0f}",
         f"{S['kronfluence_peak_rss_mb']:,.0f}",
         f"jaxval/Kronfluence {S['jaxval_peak_rss_mb'] / S['kronfluence_peak_rss_mb']:.2f}"),
    ]
    out = [f"#### Kronfluence (EK-FAC) on fmnist (un-projected, D {R['setup']['jaxval']['dim']:,}; "
           f"{R['setup']['jaxval']['params']:,} params; batch {R['config']['batch']})", "",
           "| metric | jaxval | Kronfluence | time Kronfluence/jaxval (median; per pair; > 1: jaxval faster) |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lam_j = ", ".join(f"{v:.3g}" for v in R["damping"]["jaxval"]["lambda"].values())
    lam_k = ", ".join(f"{v:.3g}" for v in R["damping"]["kronfluence"]["lambda"].values())
    B = R["agreement_damping_1e-8"]
    out += ["", f"Damping per layer λ: jaxval ({R['damping']['jaxval']['rule']}) {lam_j}; Kronfluence "
            f"({R['damping']['kronfluence']['rule']}) {lam_k}.",
            f"Agreement of the [Q, N] scores: Spearman per query mean {A['spearman_per_query_mean']:.5f} "
            f"(min {A['spearman_per_query_min']:.5f}), Pearson {A['pearson_all']:.6f}, top-10 overlap "
            f"{A['top10_overlap_mean']:.3f}, relative L2 difference {A['rel_l2_diff']:.2e}, scale "
            f"{A['scale_jaxval_over_kronfluence']:.5f}. At absolute damping 1e-8 on both sides: Spearman "
            f"{B['spearman_per_query_mean']:.4f}, Pearson {B['pearson_all']:.4f}, relative L2 "
            f"{B['rel_l2_diff']:.2e}."]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048, help="training examples (fit and scored)")
    ap.add_argument("--q", type=int, default=64, help="test queries")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--relative-damping", type=float, default=0.1)
    ap.add_argument("--jaxval-py", default=str(ROOT / ".venv/bin/python"))
    ap.add_argument("--peers-py", default=str(ROOT / ".venv-peers/bin/python"))
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    ap.add_argument("--tmp", default="/tmp/jaxval_peers_kronfluence")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/peers_fmnist_kronfluence.json"))
    ap.add_argument("--table", metavar="JSON", help="only print the table of a saved result")
    args = ap.parse_args()
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "command": " ".join(sys.argv)}
    t0 = time.time()
    R = bench(args)
    R["meta"] = {**meta, "loadavg_end": os.getloadavg(), "wall_s": time.time() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(R, f, indent=1)
    print(table(R) + f"\n\n{meta['date']}, {meta['machine']}, {meta['cpus']} CPUs, load start "
          f"{tuple(round(x, 2) for x in meta['loadavg_start'])}, end "
          f"{tuple(round(x, 2) for x in R['meta']['loadavg_end'])}, wall {R['meta']['wall_s']:.0f} s, "
          f"torch threads {args.torch_threads}")


if __name__ == "__main__":
    main()
