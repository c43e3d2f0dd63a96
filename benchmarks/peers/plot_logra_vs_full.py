"""Plot LoGra vs explicit full per-example gradients (speed-up) against parameter count.

    .venv/bin/python benchmarks/peers/plot_logra_vs_full.py  # reads benchmarks/results/grads_throughput.json
                                                             # writes benchmarks/results/logra_vs_full_mlp_gpt.png
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
R = json.load(open(ROOT / "benchmarks/results/grads_throughput.json"))
fig, ax = plt.subplots(figsize=(6, 4))
for fam, marker in (("mlp", "o"), ("gpt", "s")):
    rows = sorted((r for r in R["rows"] if r["model"].startswith(fam)), key=lambda r: r["params"])
    x, y = [r["params"] for r in rows], [r["speedup_vs_explicit"] for r in rows]
    tok = rows[0]["tokens_per_example"] if rows else 1
    ax.plot(x, y, marker=marker, label=f"{fam.upper()} ({'1 token' if tok == 1 else '64-256 tokens'}/example)")
    for r in rows:
        ax.annotate(f"{r['model']} {r['speedup_vs_explicit']:.1f}×", (r["params"], r["speedup_vs_explicit"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
ax.set_xscale("log")
ax.set_yscale("log")
ax.axhline(1, color="grey", lw=0.5)
ax.set_xlabel("parameters")
ax.set_ylabel("LoGra ex/s ÷ explicit (vmap(grad) + projection) ex/s")
m = R["meta"]
ax.set_title(f"LoGra rank 64 vs full per-example gradients, CPU ({m['date']})", fontsize=9)
ax.legend(fontsize=8)
fig.text(0.01, 0.01, m["command"], fontsize=6, color="grey")
fig.tight_layout()
out = ROOT / "benchmarks/results/logra_vs_full_mlp_gpt.png"
fig.savefig(out, dpi=120)
print(out)
