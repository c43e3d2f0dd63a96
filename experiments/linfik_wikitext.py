"""Experiment 1 (ALinFiK on WikiText): LinFiK of a pool of 128-token blocks under a small GPT w.r.t. a task set,
the paper's two propositions on the run's checkpoints, a distilled student (MiniLM + MLP head) trained on 20% of
the pool, and data selection at a fixed budget (ALinFiK vs LinFiK vs random vs perplexity vs embedding similarity).

    python experiments/linfik_wikitext.py --config configs/linfik_wikitext.yaml [--tiny]

Writes ``results.json``, ``README.md`` (tables), ``stability.png``, ``scatter.png`` to the config's ``out``.
Expensive stages (embeddings) are cached in ``out/cache`` and reused when the config is unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cached, load_config  # noqa: E402

from jaxval import LoGra  # noqa: E402
from jaxval.valuation import alinfik as al
from jaxval.cli.linfik import lm_setup
from jaxval.evaluation import pearson, plot_stability, spearman
from jaxval.valuation.linfik import gradient_stability, layer_normalize, pool_gradients, task_gradient
from jaxval.models.gpt import GPT, GPTConfig, loss_fn



_STEPS: dict = {}
_FWD: dict = {}


class Trainer:
    """AdamW on the mean per-example loss, with checkpoints along one run (optimiser state kept)."""

    def __init__(self, model, lr, seed, data, batch_size):
        self.model = model
        self.tx = optax.adamw(lr)
        self.graphdef, params = nnx.split(model, nnx.Param)
        self.params, self.opt = params, self.tx.init(params)
        self.data, self.bs = data, batch_size
        self.rng = np.random.default_rng(seed)
        self.n = len(next(iter(data.values())))
        self.order, self.pos = self.rng.permutation(self.n), 0
        key = (self.graphdef, float(lr))
        if key not in _STEPS:                      # one compiled step per architecture and lr
            gd, tx = self.graphdef, self.tx

            @jax.jit
            def step(p, o, b):
                loss, g = jax.value_and_grad(lambda q: jnp.mean(loss_fn(nnx.merge(gd, q), b)))(p)
                u, o = tx.update(g, o, p)
                return optax.apply_updates(p, u), o, loss

            _STEPS[key] = step
        self._step = _STEPS[key]

    def run(self, steps):
        for _ in range(steps):
            if self.pos + self.bs > self.n:
                self.order, self.pos = self.rng.permutation(self.n), 0
            idx = self.order[self.pos:self.pos + self.bs]
            self.pos += self.bs
            self.params, self.opt, _ = self._step(self.params, self.opt, {k: v[idx] for k, v in self.data.items()})
        return nnx.merge(self.graphdef, self.params)


def token_loss(model, data, bs=32):
    """Mean per-token loss of every example [N] (jit forward, padded batches)."""
    gd, st = nnx.split(model)
    if gd not in _FWD:
        _FWD[gd] = jax.jit(lambda s, b: loss_fn(nnx.merge(gd, s), b) / jnp.sum(b["mask"][:, 1:], axis=1))
    f = _FWD[gd]
    n = len(data["tokens"])
    out = []
    for i in range(0, n, bs):
        idx = np.arange(i, min(i + bs, n))
        pad = np.r_[idx, np.full(bs - len(idx), i)] if len(idx) < bs and n > bs else idx
        out.append(np.asarray(f(st, {k: v[pad] for k, v in data.items()}))[:len(idx)])
    return np.concatenate(out)



def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/linfik_wikitext.yaml")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = load_config(args.config, args.tiny)
    out = args.out or cfg["out"]
    os.makedirs(os.path.join(out, "cache"), exist_ok=True)
    t_all = time.time()
    timing = {}
    seed = int(cfg["seed"])

    def lap(name, t0):
        timing[name] = round(time.time() - t0, 1)
        print(f"[{name}] {timing[name]} s", flush=True)

    # ---------------------------------------------------------------- data
    t0 = time.time()
    s = lm_setup(cfg["data"] | {"seed": seed})
    pool, src, texts = s["pool"], s["pool_source"], s["pool_texts"]
    n = len(src)
    lap("data", t0)

    # ---------------------------------------------------------------- model and checkpoints along one run
    t0 = time.time()
    m = cfg["model"]
    gcfg = GPTConfig(vocab_size=s["tok"].vocab_size, block_size=cfg["data"]["block_len"], d_model=m["d_model"],
                     n_layer=m["n_layer"], n_head=m["n_head"])
    model = GPT(gcfg, rngs=nnx.Rngs(seed))
    tr = Trainer(model, m["lr"], seed, pool, m["batch_size"])
    ckpt_steps = sorted(cfg["checkpoints"])
    ckpts, done = {}, 0
    for st in ckpt_steps:
        ckpts[st] = tr.run(st - done)
        done = st
    early = ckpts[cfg["early_step"]]
    late = ckpts[ckpt_steps[-1]]
    task_eval_loss = {st: float(token_loss(c, s["task_eval"]).mean()) for st, c in ckpts.items()}
    lap("train_checkpoints", t0)

    # ---------------------------------------------------------------- LinFiK at the early checkpoint (+ late)
    t0 = time.time()
    lc = cfg["logra"]
    logra = LoGra(early, loss_fn, rank=lc["rank"], seed=lc["seed"])
    bs = int(lc["batch_size"])
    eta = float(cfg["linfik_lr"])

    def scores(model_):
        g = pool_gradients(logra, model_, pool, bs)
        gt = np.asarray(task_gradient(logra, model_, s["task"], bs))
        gtn = np.asarray(task_gradient(logra, model_, s["task"], bs, normalize="layer"))
        return eta * g @ gt, eta * np.asarray(layer_normalize(logra, g)) @ gtn

    v, v_norm = scores(early)
    lap("linfik_early", t0)
    t0 = time.time()
    v_late, v_late_norm = scores(late)
    lap("linfik_late", t0)

    # ---------------------------------------------------------------- propositions on a subset
    t0 = time.time()
    sub = np.random.default_rng(seed + 1).choice(n, int(cfg["stability_samples"]), replace=False)
    stats = gradient_stability(logra, [ckpts[k] for k in ckpt_steps], {k: a[sub] for k, a in pool.items()}, bs)
    plot_stability(stats, os.path.join(out, "stability.png"), steps=ckpt_steps,
                   title=f"GPT d={m['d_model']} L={m['n_layer']} on the pool; {len(sub)} pool blocks, LoGra rank {lc['rank']}")
    lap("stability", t0)

    # ---------------------------------------------------------------- embeddings (cached)
    t0 = time.time()
    espec = cfg["student"]["embed"]
    key = hashlib.sha256(json.dumps([cfg["data"], seed, espec]).encode()).hexdigest()[:12]
    efn = al.make_embed_fn(espec)
    E = cached(os.path.join(out, "cache", f"pool_emb_{key}.npy"), lambda: efn(texts))
    Et = cached(os.path.join(out, "cache", f"task_emb_{key}.npy"), lambda: efn(s["task_texts"]))
    lap("embeddings", t0)

    # ---------------------------------------------------------------- student on 20% of the pool
    t0 = time.time()
    sc = cfg["student"]
    rng = np.random.default_rng(seed + 2)
    lab = np.sort(rng.permutation(n)[: int(round(sc["label_fraction"] * n))])
    held = np.setdiff1d(np.arange(n), lab)
    students = {}
    target = {"linfik": v, "linfik_layer_norm": v_norm}[sc["target"]]
    kw = {k: sc[k] for k in ("hidden", "val_fraction", "lr", "weight_decay", "dropout", "batch_size", "max_epochs",
                             "patience", "rank_weight")}
    st = al.fit_student(None, target[lab], efn, embeddings=E[lab], seed=seed, **kw)
    pred = st.predict_embeddings(E)
    students["minilm"] = st
    # a feature baseline: the same head on hashed character n-grams
    hfn = al.make_embed_fn("hashed:dim=512")
    H = hfn(texts)
    st_h = al.fit_student(None, target[lab], hfn, embeddings=H[lab], seed=seed, **kw)
    pred_h = st_h.predict_embeddings(H)
    # no ranking term (ablation)
    st_nr = al.fit_student(None, target[lab], efn, embeddings=E[lab], seed=seed, **(kw | {"rank_weight": 0.0}))
    pred_nr = st_nr.predict_embeddings(E)
    st.save(os.path.join(out, "cache", "student"), overwrite=True)
    lap("student", t0)

    wiki = held[src[held] == 0]

    def corr(a, b, idx):
        return {"spearman": round(spearman(a[idx], b[idx]), 4), "pearson": round(pearson(a[idx], b[idx]), 4), "n": int(len(idx))}

    corr_tab = {
        f"student({espec}) vs LinFiK, held-out pool": corr(pred, target, held),
        f"student({espec}) vs LinFiK, held-out WikiText blocks only": corr(pred, target, wiki),
        f"student({espec}, no ranking loss) vs LinFiK, held-out": corr(pred_nr, target, held),
        "student(hashed n-grams) vs LinFiK, held-out": corr(pred_h, target, held),
        f"student({espec}) vs LinFiK at late checkpoint (step %d), held-out" % ckpt_steps[-1]: corr(pred, v_late if sc["target"] == "linfik" else v_late_norm, held),
        "LinFiK early (step %d) vs late (step %d), all pool" % (cfg["early_step"], ckpt_steps[-1]): corr(v, v_late, np.arange(n)),
        "LinFiK layer-normalised early vs late, all pool": corr(v_norm, v_late_norm, np.arange(n)),
        "LinFiK vs LinFiK layer-normalised (early), all pool": corr(v, v_norm, np.arange(n)),
    }
    prop = {
        "median cosine(g(step c), g(step %d)) per checkpoint" % ckpt_steps[-1]:
            {str(k): round(float(np.median(stats["cosine"][i])), 4) for i, k in enumerate(ckpt_steps)},
        "median cosine to previous checkpoint":
            {str(k): round(float(np.median(stats["cosine_consecutive"][i - 1])), 4) for i, k in enumerate(ckpt_steps) if i},
        "Spearman of gradient norms vs step %d" % ckpt_steps[-1]:
            {str(k): round(float(stats["norm_spearman"][i, -1]), 4) for i, k in enumerate(ckpt_steps)},
    }

    # ---------------------------------------------------------------- selection at a fixed budget
    t0 = time.time()
    sel_cfg = cfg["selection"]
    budget = int(round(sel_cfg["budget_fraction"] * n))
    ppl = token_loss(early, pool)
    emb_sim = E @ (Et.mean(0) / np.linalg.norm(Et.mean(0)))
    methods = {
        "ALinFiK (student)": pred,
        "LinFiK": v,
        "LinFiK layer-normalised": v_norm,
        "perplexity filter (lowest)": -ppl,
        "embedding similarity to task": emb_sim,
    }
    chosen = {k: al.select(sc_, budget) for k, sc_ in methods.items()}
    for r in range(int(sel_cfg["random_seeds"])):
        chosen[f"random (seed {r})"] = np.random.default_rng(100 + r).permutation(n)[:budget]
    chosen["full pool (no selection)"] = np.arange(n)
    rows = {}
    base = float(token_loss(early, s["task_eval"]).mean())
    for name, idx in chosen.items():
        sub_data = {k: a[idx] for k, a in pool.items()}
        t = Trainer(nnx.clone(early), sel_cfg["lr"], seed, sub_data, sel_cfg["batch_size"])
        m2 = t.run(int(sel_cfg["steps"]))
        rows[name] = {"task_loss": round(float(token_loss(m2, s["task_eval"]).mean()), 4),
                      "offdomain_fraction": round(float(src[idx].mean()), 3),
                      "n": int(len(idx))}
        print(name, rows[name], flush=True)
    rand = [rows[k]["task_loss"] for k in rows if k.startswith("random")]
    lap("selection", t0)

    # ---------------------------------------------------------------- plots and report
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for lbl, c in ((0, "C0"), (1, "C3")):
        ii = held[src[held] == lbl]
        ax[0].scatter(target[ii], pred[ii], s=6, c=c, label=["WikiText", "off-domain"][lbl], alpha=0.6)
    ax[0].set_xlabel("LinFiK (teacher)")
    ax[0].set_ylabel("ALinFiK student prediction")
    ax[0].legend()
    ax[0].set_title(f"held-out pool: Spearman {corr_tab[f'student({espec}) vs LinFiK, held-out pool']['spearman']:.3f}")
    ax[1].scatter(v, v_late, s=6, alpha=0.5)
    ax[1].set_xlabel(f"LinFiK at step {cfg['early_step']}")
    ax[1].set_ylabel(f"LinFiK at step {ckpt_steps[-1]}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scatter.png"), dpi=110)
    plt.close(fig)

    command = "python experiments/linfik_wikitext.py --config " + args.config + (" --tiny" if args.tiny else "")
    res = {"command": command, "config": cfg, "n_pool": n, "n_offdomain": int(src.sum()), "n_labelled": int(len(lab)),
           "n_heldout": int(len(held)), "budget": budget, "logra_dim": logra.dim,
           "task_eval_loss_per_checkpoint": task_eval_loss, "task_eval_loss_early": base,
           "correlations": corr_tab, "propositions": prop, "selection": rows,
           "random_mean_task_loss": float(np.mean(rand)),
           "student_meta": {k: v_ for k, v_ in st.meta.items() if k != "history"},
           "timing_s": timing | {"total": round(time.time() - t_all, 1)},
           "platform": {"jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version(),
                        "cpus": os.cpu_count()}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(report(res))
    print(report(res))


def report(r) -> str:
    c = r["config"]
    L = [f"# ALinFiK on WikiText-2 (small GPT)", "", f"Command: `{r['command']}`", "",
         f"Pool: {r['n_pool']} blocks of {c['data']['block_len']} tokens ({r['n_pool'] - r['n_offdomain']} from "
         f"{c['data']['pool_corpus']}, {r['n_offdomain']} off-domain from {c['data'].get('offdomain_corpus')}); task: "
         f"{c['data']['n_task']} blocks of {c['data']['task_corpus']} (task gradient), {c['data']['n_task_eval']} other "
         f"blocks for the task loss. Word-level vocab {c['data']['vocab_size']} from the pool corpus. GPT d_model "
         f"{c['model']['d_model']}, {c['model']['n_layer']} layers, trained on the pool with AdamW; LinFiK at step "
         f"{c['early_step']} (LoGra rank {c['logra']['rank']}, D = {r['logra_dim']}, all linear/embedding layers). "
         f"Student: {c['student']['embed']} embeddings + MLP {c['student']['hidden']}, trained on "
         f"{r['n_labelled']} labelled blocks ({c['student']['label_fraction']:.0%}), target `{c['student']['target']}`; "
         f"evaluated on the {r['n_heldout']} held-out blocks.", "",
         "## Student vs LinFiK", "", "| comparison | Spearman | Pearson | n |", "|---|---|---|---|"]
    for k, v in r["correlations"].items():
        L.append(f"| {k} | {v['spearman']:.3f} | {v['pearson']:.3f} | {v['n']} |")
    L += ["", "## Propositions (stability.png)", ""]
    for k, v in r["propositions"].items():
        L.append(f"- {k}: " + ", ".join(f"{s}: {x}" for s, x in v.items()))
    L += ["", f"## Selection: continue training from step {c['early_step']} on {r['budget']} selected blocks "
          f"({c['selection']['budget_fraction']:.0%}), {c['selection']['steps']} steps", "",
          f"Task loss (mean per-token cross-entropy on the held-out task blocks) before: {r['task_eval_loss_early']:.4f}.", "",
          "| method | task loss after | off-domain fraction of selection |", "|---|---|---|"]
    for k, v in sorted(r["selection"].items(), key=lambda kv: kv[1]["task_loss"]):
        L.append(f"| {k} | {v['task_loss']:.4f} | {v['offdomain_fraction']:.3f} |")
    L += ["", f"Random (mean of seeds): {r['random_mean_task_loss']:.4f}.", "",
          "Timing (s): " + ", ".join(f"{k} {v}" for k, v in r["timing_s"].items()) + f"; platform {r['platform']}", ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
