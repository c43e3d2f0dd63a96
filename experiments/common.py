"""Shared driver of the accuracy experiments (LDS, leave-one-out, brittleness, cost per method)."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from jaxval import evaluation as ev
from jaxval.cli import config
from jaxval.evaluation import baselines as bl


def load_config(path: str, tiny: bool = False) -> dict:
    """The YAML config at ``path`` (free-form: each script reads its own keys), with its ``tiny:`` overrides
    merged in when ``tiny``; read by the library's loader (clear errors for a missing or malformed file)."""
    return config.load_config(path, None, profile="tiny" if tiny else None, profiles=("tiny",))


def parse(description: str, default_config: str):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default=default_config)
    ap.add_argument("--tiny", action="store_true", help="apply the config's `tiny:` overrides (seconds)")
    ap.add_argument("--out", default=None, help="results folder (default: the config's out)")
    ap.add_argument("--cache", default=None, help="retraining cache folder (default: the config's cache)")
    args = ap.parse_args()
    cfg = load_config(args.config, args.tiny)
    if args.out:
        cfg["out"] = args.out
    if args.cache:
        cfg["cache"] = args.cache
    os.makedirs(cfg["out"], exist_ok=True)
    cfg["_command"] = "python " + " ".join(sys.argv)
    return cfg


class HashWordTokenizer:
    """Tiny-mode tokenizer for a tiny BERT: ``[CLS]`` = 1, ``[SEP]`` = 2, whitespace words hashed into the
    vocabulary, truncated to ``max_length``, right-padded; called on a list of texts like the MiniLM tokenizer."""

    def __init__(self, vocab_size: int, max_length: int):
        self.v, self.max_length = vocab_size, max_length

    def __call__(self, texts):
        rows = []
        for t in texts:
            ids = [3 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little") % (self.v - 3)
                   for w in t.split()]
            rows.append([1] + ids[: self.max_length - 2] + [2])
        width = max(map(len, rows))
        ids = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return {"input_ids": ids, "attention_mask": mask}


def tiny_encoder(seed: int = 0):
    """``(random tiny BertEncoder, HashWordTokenizer)``: the encoder of the experiments' ``--tiny`` smoke runs."""
    from flax import nnx

    from jaxval.models import bert

    cfg = bert.tiny_config(vocab_size=256, d_model=32, n_layer=2, n_head=4, d_ff=64, max_position=64)
    return bert.BertEncoder(cfg, rngs=nnx.Rngs(seed)), HashWordTokenizer(256, 64)


def encoder(spec: str, seed: int = 0):
    """What an experiment config's ``encoder: SPEC`` names, for ``jaxval.alinfik``'s encoder argument:
    ``"tiny"`` -> :func:`tiny_encoder` (an ``(encoder, tokenizer)`` pair), any other spec as it is
    (``"minilm[:max_length=N]"``, resolved by the library)."""
    return tiny_encoder(seed) if spec == "tiny" else spec


def cached(path: str, fn):
    """``np.load(path)`` if it exists, else ``fn()`` saved there."""
    if os.path.exists(path):
        return np.load(path)
    x = fn()
    np.save(path, x)
    return x


def method_name(spec) -> str:
    if "name" in spec:
        return spec["name"]
    t = spec["type"]
    if t == "logra":
        return f"LoGra {spec.get('init', 'gaussian')} r{spec.get('rank', 64)} {spec.get('kind', 'identity')}"
    if t == "ekfac":
        return f"EK-FAC full ({spec.get('kind', 'ekfac')})" if spec.get("kind", "ekfac") != "ekfac" else "EK-FAC full"
    if t == "grad":
        return f"grad {spec.get('mode', 'dot')} (TracIn-1)"
    if t == "trak":
        return f"TRAK-1 k{spec.get('k', 512)}"
    if t == "repsim":
        return "rep-sim (last hidden)"
    return t


def machine() -> str:
    return f"{platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · " \
           f"jax {jax.__version__} on {jax.devices()[0].platform}"


def run(cfg, *, model, make_model, loss_fn, train, queries, retrain_cfg, eval_fn, precond_kw=None,
        features_fn=None, warm_start=None, extra: dict | None = None, title: str = ""):
    """Scores of every method (timed), then LDS / LOO / brittleness from retrained models; writes
    ``<out>/<name>.json``, ``.md`` and the brittleness PNG. Returns the results dict."""
    t_all = time.perf_counter()
    name, out, cache = cfg["name"], cfg["out"], cfg.get("cache")
    n, q = ev.masks_n(train), ev.masks_n(queries)
    bs = int(cfg.get("score_batch_size", 64))
    scores, cost = {}, {}
    for spec in cfg["methods"]:
        mname = method_name(spec)
        with ev.Cost() as c:
            s = bl.compute_scores(spec, model, loss_fn, train, queries, precond_kw=precond_kw,
                                  features_fn=features_fn, batch_size=bs)
        if not np.all(np.isfinite(s)):
            print(f"warning: {mname} produced non-finite scores", file=sys.stderr)
        scores[mname] = s
        cost[mname] = {"seconds": round(c.seconds, 2), "peak_mb": round(c.peak_mb, 1)}
        print(f"[{name}] {mname}: {c.seconds:.1f}s, +{c.peak_mb:.0f} MB", flush=True)

    res = {"name": name, "command": cfg["_command"], "machine": machine(),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "n_train": n, "n_queries": q,
           "config": {k: v for k, v in cfg.items() if not k.startswith("_")}, "cost": cost, **(extra or {})}

    # ---------------------------------------------------------------- LDS
    lc = cfg["lds"]
    masks = ev.lds_masks(n, lc["subsets"], lc.get("alpha", 0.5), seed=lc.get("seed", 0))
    seeds = ev.subset_seeds(lc["subsets"], lc["seeds"], base=1)
    with ev.Cost() as c:
        meas = ev.retrain(make_model, loss_fn, train, np.repeat(masks, lc["seeds"], 0), seeds.reshape(-1),
                          retrain_cfg, queries, eval_fn, warm_start=warm_start, cache_dir=cache, tag=f"{name}-lds")
    meas_loss = meas["loss"].reshape(lc["subsets"], lc["seeds"], q)
    res["lds_retrain_seconds"] = round(c.seconds, 1)
    res["lds"] = {}
    for mname, s in scores.items():
        r = ev.lds(s, masks, meas_loss)
        res["lds"][mname] = {"mean": r.mean, "std": r.std}
    if lc["seeds"] > 1:  # the noise ceiling: how well one half of the seeds predicts the other half
        h = lc["seeds"] // 2
        a, b = meas_loss[:, :h].mean(1), meas_loss[:, h:].mean(1)
        res["seed_split_spearman"] = float(np.nanmean(ev.spearman(a, b, axis=0)))

    # ---------------------------------------------------------------- LOO
    if cfg.get("loo"):
        lo = cfg["loo"]
        idx = np.random.default_rng(lo.get("seed", 0)).choice(n, lo["num"], replace=False)
        nq = lo.get("queries", q)
        qsub = {k: v[:nq] for k, v in queries.items()}
        loo_cfg = ev.RetrainConfig(**{**retrain_cfg.__dict__, **lo.get("retrain", {})})
        with ev.Cost() as c:
            deltas = ev.leave_one_out(make_model, loss_fn, train, idx, lo.get("seeds", [0]), loo_cfg, qsub,
                                      warm_start=warm_start, cache_dir=cache, tag=f"{name}-loo")
        res["loo_retrain_seconds"] = round(c.seconds, 1)
        res["loo"] = {}
        for mname, s in scores.items():
            r = ev.loo_correlation(s[:nq, idx], deltas)
            res["loo"][mname] = {k: r[k] for k in ("pearson_mean", "pearson_min", "spearman_mean")}

    # ---------------------------------------------------------------- brittleness
    pts = np.zeros(0, int)
    if cfg.get("brittleness"):
        bc = cfg["brittleness"]
        correct = np.asarray(eval_fn(model, {k: jax.numpy.asarray(v) for k, v in queries.items()})["correct"])
        pts = np.flatnonzero(correct)[: bc["points"]]
        if len(pts) == 0:
            print("brittleness skipped: no query is classified correctly", file=sys.stderr)
    if len(pts):
        sub = {k: v[pts] for k, v in queries.items()}
        chosen = {m: scores[m][pts] for m in bc["methods"] if m in scores}
        b_cfg = ev.RetrainConfig(**{**retrain_cfg.__dict__, **bc.get("retrain", {})})
        with ev.Cost() as c:
            curves = ev.brittleness(make_model, loss_fn, train, sub, chosen, bc["ks"], bc["seeds"], b_cfg, eval_fn,
                                    cache_dir=cache)
        res["brittleness_retrain_seconds"] = round(c.seconds, 1)
        res["brittleness"] = {"ks": list(bc["ks"]), "points": int(len(pts)),
                              "curves": {m: [float(v) for v in ys] for m, ys in curves.items()}}
        png = os.path.join(out, f"{name}_brittleness.png")
        ev.plot_brittleness(curves, bc["ks"], png, title=title or name)
        res["brittleness"]["plot"] = os.path.basename(png)

    # ------------------------------------------------- removal test (brittleness for language models)
    if cfg.get("removal"):
        rc = cfg["removal"]
        sub = {k: v[: rc["points"]] for k, v in queries.items()}
        chosen = {m: scores[m][: rc["points"]] for m in rc["methods"] if m in scores}
        r_cfg = ev.RetrainConfig(**{**retrain_cfg.__dict__, **rc.get("retrain", {})})
        with ev.Cost() as c:
            curves = ev.removal_effect(make_model, loss_fn, train, sub, chosen, rc["ks"], rc["seeds"], r_cfg, eval_fn,
                                       cache_dir=cache)
        res["removal_retrain_seconds"] = round(c.seconds, 1)
        res["removal"] = {"ks": list(rc["ks"]), "points": int(jax.tree.leaves(sub)[0].shape[0]),
                          "seeds": len(rc["seeds"]),
                          "curves": {m: [float(v) for v in ys] for m, ys in curves.items()}}
        png = os.path.join(out, f"{name}_removal.png")
        ev.plot_brittleness(curves, rc["ks"], png, title=title or name,
                            ylabel="mean increase of the query loss (nats)")
        res["removal"]["plot"] = os.path.basename(png)

    res["total_seconds"] = round(time.perf_counter() - t_all, 1)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(markdown(res, title))
    print(markdown(res, title))
    return res


def markdown(res, title="") -> str:
    lines = [f"## {title or res['name']}", "",
             f"- command: `{res['command']}`", f"- machine: {res['machine']}", f"- date: {res['date']}",
             f"- {res['n_train']} training examples, {res['n_queries']} queries; total wall time "
             f"{res.get('total_seconds')} s (LDS retraining {res.get('lds_retrain_seconds')} s)"]
    for k in ("model_info", "notes"):
        if k in res:
            lines.append(f"- {res[k]}")
    lc = res["config"]["lds"]
    lines.append(f"- LDS: {lc['subsets']} random subsets of α={lc.get('alpha', 0.5)}, {lc['seeds']} seed(s) each; "
                 "Spearman per query between −Σ_{i∈S} score and the measured query loss, mean ± std over queries")
    if "seed_split_spearman" in res:
        lines.append(f"- noise ceiling (Spearman between the seed-averaged losses of two halves of the seeds): "
                     f"{res['seed_split_spearman']:.3f}")
    lines += ["", "| method | LDS | " + ("LOO Pearson (mean / min) | " if "loo" in res else "")
              + "scoring wall time (s) | peak extra memory (MB) |",
              "|---|---|" + ("---|" if "loo" in res else "") + "---|---|"]
    for m, v in res["lds"].items():
        row = f"| {m} | {v['mean']:.3f} ± {v['std']:.3f} | "
        if "loo" in res:
            lo = res["loo"][m]
            row += f"{lo['pearson_mean']:.3f} / {lo['pearson_min']:.3f} | "
        row += f"{res['cost'][m]['seconds']} | {res['cost'][m]['peak_mb']} |"
        lines.append(row)
    if "brittleness" in res:
        b = res["brittleness"]
        lines += ["", f"Brittleness ({b['points']} correctly classified test points; fraction whose prediction "
                      f"flips after removing the top-k proponents and retraining) — ![]({b['plot']})", "",
                  "| method | " + " | ".join(f"k={k}" for k in b["ks"]) + " |",
                  "|---|" + "---|" * len(b["ks"])]
        for m, ys in b["curves"].items():
            lines.append(f"| {m} | " + " | ".join(f"{y:.2f}" for y in ys) + " |")
    if "removal" in res:
        r = res["removal"]
        lines += ["", f"Removal test ({r['points']} queries × {r['seeds']} seeds; mean increase of each query's own "
                      f"loss, in nats, after removing its top-k proponents and retraining, relative to training on "
                      f"all data with the same seed; random = k random blocks) — ![]({r['plot']})", "",
                  "| method | " + " | ".join(f"k={k}" for k in r["ks"]) + " |",
                  "|---|" + "---|" * len(r["ks"])]
        for m, ys in r["curves"].items():
            lines.append(f"| {m} | " + " | ".join(f"{y:+.4f}" for y in ys) + " |")
    return "\n".join(lines) + "\n"
