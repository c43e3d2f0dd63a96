"""Issue 19: which cheap student can learn the Howdy! teacher? Cross-validated designs on the labelled sample.

Reads the teacher that ``experiments/howdy_finetune.py`` computed (layer-normalised LinFiK of every pool sample,
cached under its ``cache``; run it first) and fits students on the same labelled sample (``student.label_fraction``
of the pool, the same seeded draw). Every design is scored by ``folds``-fold cross-validation inside the labelled
sample, repeated over ``fold_seeds``: the out-of-fold Spearman against the teacher (mean ± se over the repeats) and
the value bought with the budget's share of the labelled sample (the teacher's values of the student's top, over
those of the teacher's own top); the samples the students are evaluated on in ``howdy_finetune`` are not used.
The rule: the highest CV Spearman; the value bought is a diagnostic (a design that orders the middle of the pool
better but misses the top, as a rank target can, buys less). Designs = text view × features × head:

* views: the text the LM saw (``prompt \\n\\n response``), the prompt, the response;
* features: MiniLM embeddings, hashed n-grams, ``textstats``, and tokenizer-aware ones that never run the LM:
  the bag of the LM's tokens of the response (its loss tokens, frequencies), the mean of the LM's own
  embedding-table rows over those tokens, and those rows of the first k response tokens beside the mean
  (:func:`jaxval.valuation.alinfik.token_table_embed`);
* the token-level student (:func:`jaxval.alinfik.fit_token_student`): kernel ridge on the teacher's per-position
  parts (:func:`jaxval.valuation.linfik.linfik_parts`) of the training folds' samples, scored as the sum of its
  predicted parts (``token_designs``: [ridge, token_weight, pair_weight] each, a fourth entry ``true``: with the
  LM's expected next-token rows, :func:`jaxval.alinfik.expected_rows`, one forward pass of the LM);
* heads: the library's MLP head (:func:`jaxval.alinfik.fit_student`: Huber + ranking loss, early stopping) and
  closed-form ridge regression (``fit_student(ridge=)``) of the values or of the normal scores of their ranks
  (``target="rank"``).

Also the teacher's own split-half reliability: LinFiK from half of the task samples vs the other half.

    nice -n 10 python experiments/howdy_student_designs.py [--config configs/howdy_finetune.yaml] [--tiny]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_config  # noqa: E402
import howdy_finetune as hf  # noqa: E402
import linfik_howdy as lh  # noqa: E402

from jaxval import GradientStore, LoGra  # noqa: E402
from jaxval.evaluation import spearman  # noqa: E402
from jaxval.models import llama  # noqa: E402
from jaxval.valuation import alinfik as al  # noqa: E402
from jaxval.valuation.linfik import layer_normalize  # noqa: E402
from jaxval.valuation.student import column_stats, from_rank_scale, rank_knots, ridge_solve  # noqa: E402


def ridge_predict(x_tr, y_tr, x_te, lam: float, target: str = "value") -> np.ndarray:
    """Closed-form ridge fitted on every training row (the students' standardisation, solve and target: the
    values, or the normal scores of their ranks mapped back as ``fit_student(target="rank")`` does; no validation
    split, unlike ``fit_student(ridge=)``), predicted at ``x_te``."""
    mu, sd = column_stats(x_tr)
    if target == "rank":
        kv, kz = rank_knots(y_tr)
        w = ridge_solve((x_tr - mu) / sd, np.interp(y_tr, kv, kz), lam)
        return from_rank_scale(((x_te - mu) / sd) @ w, kz, kv)
    w = ridge_solve((x_tr - mu) / sd, y_tr - y_tr.mean(), lam)
    return ((x_te - mu) / sd) @ w + y_tr.mean()


def cv_scores(x, v, lab, head, folds: int, fold_seeds, top: int) -> tuple[float, float, float]:
    """Out-of-fold scores inside ``lab`` (``folds`` folds per seed), over the seeds: the Spearman's mean and
    standard error, and the mean share of the attainable value bought: the teacher's values of the out-of-fold
    ``top`` samples, summed, over the sum of the teacher's own ``top``."""
    best = np.sort(v[lab])[::-1][:top].sum()
    if not best > 0:
        raise SystemExit(f"the teacher's top {top} labelled values sum to {best}: no value to buy")
    rhos, bought = [], []
    for fs in fold_seeds:
        fold = np.random.default_rng(int(fs)).permutation(len(lab)) % folds
        oof = np.zeros(len(lab))
        for f in range(folds):
            tr, te = lab[fold != f], lab[fold == f]
            oof[fold == f] = head(x[tr], v[tr], x[te])
        rhos.append(spearman(oof, v[lab]))
        bought.append(v[lab][al.select(oof, top)].sum() / best)
    se = float(np.std(rhos, ddof=1) / np.sqrt(len(rhos))) if len(rhos) > 1 else 0.0
    return float(np.mean(rhos)), se, float(np.mean(bought))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/howdy_finetune.yaml")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--token-only", action="store_true",
                    help="rerun only the token-level designs; the other rows are kept from the out folder's "
                         "student_designs.json, refused unless it was computed with the same teacher")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.tiny)
    cache_root, out = args.cache or cfg["cache"], args.out or cfg["out"]
    dc = cfg.get("student_designs") or {}
    folds, fold_seeds = int(dc.get("folds", 5)), dc.get("fold_seeds", [3, 4, 5, 6])
    seed = int(cfg["seed"])
    cdir = os.path.join(cache_root, hf.teacher_key(cfg))
    tpath = os.path.join(cdir, "linfik.npy")
    if not os.path.exists(tpath):
        raise SystemExit(f"no teacher scores at {tpath}: run experiments/howdy_finetune.py with this config first")
    t_all = time.time()
    model, tok = lh.load_model(cfg["model"], seed)
    s = lh.build_sets(cfg, tok, seed)
    v = np.load(tpath)
    n = len(v)
    teacher_sha = hashlib.sha256(np.ascontiguousarray(v, np.float32).tobytes()).hexdigest()
    kept, prev = [], None
    if args.token_only:
        ppath = os.path.join(out, "student_designs.json")
        if not os.path.exists(ppath):
            raise SystemExit(f"--token-only keeps the other rows of {ppath}: there is none")
        with open(ppath) as f:
            prev = json.load(f)
        kept = [r for r in prev["rows"] if "token_student" not in r]
    if n != len(s["pool_texts"]):
        raise SystemExit(f"the cached teacher has {n} scores, the pool {len(s['pool_texts'])} samples")
    sc = cfg["student"]
    lab = np.sort(np.random.default_rng(seed + 2).permutation(n)[: int(round(sc["label_fraction"] * n))])
    # the budget's share of the pool (howdy_finetune buys N = budget_factor x n_inject), of the labelled sample
    budget = int(cfg.get("budget_factor", 1)) * int(cfg["data"]["n_inject"])
    top = max(1, int(round(len(lab) * budget / n)))

    views = {"full": s["pool_texts"], "prompt": [p for p, _ in s["pool_parts"]],
             "response": [r for _, r in s["pool_parts"]]}
    table = np.asarray(model.embed.embedding[...], np.float32)
    tf = lh.token_features(s["pool"]["tokens"], s["pool"]["mask"], table)
    # name -> (features, the `student.embed` spec when the library's text student can compute them, else None)
    feats: dict[str, tuple[np.ndarray, str | None]] = {
        "LM tokens of the response (bag)": (tf["bag"], None),
        "LM embedding-table mean of the response tokens": (tf["embed"], None)}
    leads = [int(k) for k in dc.get("lead_tokens", [1, 2, 3])]
    if leads:                            # one lookup of the most leading rows; fewer = a prefix of them + the mean
        d, lt = table.shape[1], al.token_table_embed(s["pool"]["tokens"], s["pool"]["mask"], table, first=max(leads))
        for k in leads:
            feats[f"LM embedding-table rows of the first {k} response tokens + their mean"] = (
                np.concatenate([lt[:, :k * d], lt[:, -d:]], 1), None)
    embeds = dc.get("embeds", ["minilm:max_length=128", "hashed:dim=512", "textstats", "minilm:max_length=128+textstats"])
    for spec in embeds:
        efn = al.make_embed_fn(spec)
        e = {k: np.asarray(efn(t), np.float32) for k, t in views.items()}
        for k in views:
            feats[f"{spec} of the {k}"] = (e[k], spec if k == "full" else None)
        feats[f"{spec} of the prompt + of the response"] = (np.concatenate([e["prompt"], e["response"]], 1), None)

    kw = {k: sc[k] for k in ("hidden", "val_fraction", "lr", "weight_decay", "dropout", "batch_size", "max_epochs",
                             "patience", "rank_weight")}

    def mlp(x_tr, y_tr, x_te):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return al.fit_student(None, y_tr, None, embeddings=x_tr, seed=seed, **kw).predict_embeddings(x_te)

    lams = [float(x) for x in dc.get("ridge_lambdas", [0.1, 1.0, 10.0])]
    targets = dc.get("ridge_targets", ["value", "rank"])      # fit_student(target=): the values or their ranks
    rows = []
    for name, (x, spec) in ({} if args.token_only else feats).items():
        heads = [(f"ridge λ={lam:g}" + (", rank target" if t == "rank" else ""),
                  lambda a, y, b, lam=lam, t=t: ridge_predict(a, y, b, lam, t)) for t in targets for lam in lams]
        if x.shape[1] <= 4096:           # (the MLP on the 49152-column token bag: minutes for nothing)
            heads.insert(0, (f"MLP {list(kw['hidden'])} (fit_student)", mlp))
        for head_name, head in heads:
            t0 = time.time()
            m, se, bought = cv_scores(x, v, lab, head, folds, fold_seeds, top)
            rows.append({"features": name, "head": head_name, "cv_spearman": round(m, 4), "cv_se": round(se, 4),
                         "cv_value_bought": round(bought, 4),
                         "dim": int(x.shape[1]), "s": round(time.time() - t0, 1),
                         "student_embed": spec if head is mlp else None})
        print(" | ".join(f"{r['head']} {r['cv_spearman']:.3f} / {r['cv_value_bought']:.3f}" for r in rows[-len(heads):]),
              "--", name, flush=True)
    # the token-level student, on the teacher's per-position parts of the labelled samples
    upper = llama.Upper(model, int(cfg["finetune"]["start"]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not tracked by LoGra.*")
        lg = cfg["logra"]
        logra = LoGra(upper, llama.upper_loss_fn, rank=int(lg["rank"]), seed=int(lg["seed"]), layers=lg["layers"])
    gz = np.asarray(layer_normalize(logra, GradientStore.open(os.path.join(cdir, "pool_grads")).read()))
    gt = np.asarray(layer_normalize(logra, GradientStore.open(os.path.join(cdir, "task_grads")).read()))
    if not np.allclose(gz @ gt.mean(0) * float(cfg["linfik_lr"]), v, rtol=1e-4, atol=1e-5):
        raise SystemExit("the cached gradients do not give the cached teacher scores: stale cache")
    pool = s["pool"]
    data = {"h": np.load(os.path.join(cdir, "pool_states.npy")), "tokens": pool["tokens"], "mask": pool["mask"]}
    parts = np.zeros((n, pool["tokens"].shape[1] - 1))
    parts[lab] = hf.teacher_parts(logra, upper, data, lab, gt.mean(0), float(cfg["linfik_lr"]), int(lg["batch_size"]), v)
    designs = dc.get("token_designs", [[10, 0, 0], [10, 3, 0], [10, 0, 10], [10, 3, 10], [30, 10, 10], [3, 1, 1],
                                        [10, 0, 0, True], [10, 3, 10, True], [30, 10, 10, True], [3, 1, 1, True],
                                        [1, 1, 1, True]])
    # [ridge, token_weight, pair_weight(, expected)]: with expected, the LM's expected rows (one forward pass)
    e_pool = hf.pool_expected(upper, data["h"], table, os.path.join(cdir, "pool_expected.npy")) \
        if any(len(x) > 3 and x[3] for x in designs) else None
    for lam, tw, pw, *ex in designs:
        use_e = bool(ex and ex[0])

        def token_head(tr, _y, te, lam=lam, tw=tw, pw=pw, use_e=use_e):   # tr / te: [k, 1] sample indices (x below)
            tr, te = tr[:, 0], te[:, 0]
            st = al.fit_token_student(pool["tokens"][tr], pool["mask"][tr], parts[tr], table,
                                      expected=e_pool[tr] if use_e else None,
                                      ridge=float(lam), token_weight=float(tw), pair_weight=float(pw))
            return st.score(pool["tokens"][te], pool["mask"][te], table, e_pool[te] if use_e else None)
        t0 = time.time()
        m, se, bought = cv_scores(np.arange(n)[:, None], v, lab, token_head, folds, fold_seeds, top)
        feat = ("LM tokens + the LM's expected next-token rows (one forward pass), per-position parts of the teacher"
                if use_e else "LM tokens, per-position parts of the teacher") + " (token-level student)"
        rows.append({"features": feat,
                     "head": f"kernel ridge λ={lam:g}, token {tw:g}, pair {pw:g}", "cv_spearman": round(m, 4),
                     "cv_se": round(se, 4), "cv_value_bought": round(bought, 4),
                     "dim": int(table.shape[1]) * (2 if use_e else 1) + 6,
                     "s": round(time.time() - t0, 1), "student_embed": None,
                     "token_student": {"ridge": lam, "token_weight": tw, "pair_weight": pw, "expected": use_e}})
        print(f"{rows[-1]['head']} {m:.3f} / {bought:.3f} -- token-level" + (" + expected" if use_e else ""), flush=True)
    if prev is not None:                 # the kept rows stand only for the same teacher
        if prev.get("teacher_sha256", teacher_sha) != teacher_sha:
            raise SystemExit("student_designs.json was computed with another teacher: rerun without --token-only")
        old = {(r["head"], r["features"]): r["cv_spearman"] for r in prev["rows"] if "token_student" in r}
        same = [(r["cv_spearman"], old[(r["head"], r["features"])]) for r in rows if (r["head"], r["features"]) in old]
        if not same or any(abs(a - b) > 1e-3 for a, b in same):
            raise SystemExit(f"the token designs do not reproduce those of student_designs.json ({same}): the teacher "
                             "changed, rerun without --token-only")
        rows = kept + rows
    best = max(rows, key=lambda r: r["cv_spearman"])
    # the library's text student (fit_student on make_embed_fn(spec) of the text the LM saw): howdy_finetune's
    # student.embed is this choice
    best_student = max((r for r in rows if r["student_embed"]), key=lambda r: r["cv_spearman"])

    # the teacher's split-half reliability: LinFiK from half of the task vs from the other half
    clean = ~s["injected"]
    halves = []
    for r_ in range(int(dc.get("split_halves", 5))):
        p = np.random.default_rng(100 + r_).permutation(len(gt))
        a, b = gz @ gt[p[: len(p) // 2]].mean(0), gz @ gt[p[len(p) // 2:]].mean(0)
        halves.append((spearman(a, b), spearman(a[clean], b[clean])))
    halves = np.asarray(halves)
    res = {"command": f"python experiments/howdy_student_designs.py --config {args.config}"
                      + (" --tiny" if args.tiny else "") + (" --token-only" if args.token_only else ""),
           "date": datetime.date.today().isoformat(), "machine": cfg.get("machine"), "n_pool": n,
           "n_labelled": int(len(lab)), "n_injected_labelled": int(s["injected"][lab].sum()), "folds": folds,
           "top": top, "budget": budget,
           "fold_seeds": list(fold_seeds), "rows": rows, "best": best, "best_student": best_student,
           "teacher_split_half": {"spearman_pool": round(float(halves[:, 0].mean()), 4),
                                  "spearman_clean": round(float(halves[:, 1].mean()), 4), "repeats": len(halves)},
           "teacher_sha256": teacher_sha,
           "kept_rows_from": None if prev is None else (prev.get("kept_rows_from") or {"date": prev["date"], "command": prev["command"]}),
           "total_s": round(time.time() - t_all, 1)}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "student_designs.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "student_designs.md"), "w") as f:
        f.write(report(res))
    print(report(res))
    return res


def report(r) -> str:
    L = ["# Howdy! students: cross-validated designs (issue 19)", "",
         f"Command: `{r['command']}`  ", f"Date: {r['date']}; machine: {r['machine']}.", "",
         f"Labelled sample: {r['n_labelled']} of the {r['n_pool']} pool samples ({r['n_injected_labelled']} injected), "
         f"the draw `howdy_finetune` trains its students on. Score: out-of-fold Spearman against the teacher "
         f"(layer-normalised LinFiK) in {r['folds']}-fold cross-validation inside the labelled sample, mean ± se over "
         f"{len(r['fold_seeds'])} fold draws, and the value bought: the teacher's values of the student's out-of-fold "
         f"top {r['top']} (the budget's share of the labelled sample: {r['budget']} of the {r['n_pool']} in the pool), "
         f"summed, over the sum of the teacher's top {r['top']}. The held-out pool samples are not used. Rule: the highest CV "
         f"Spearman (the value bought is a diagnostic: it flags a design that misses the top, but with {r['top']} "
         f"samples it is too coarse to rank the others).", "",
         *([f"The non-token rows are kept from the run of {r['kept_rows_from']['date']} "
            f"(`{r['kept_rows_from']['command']}`): the same teacher, checked by the token designs of that run "
            "reproducing to 1e-3.", ""] if r.get("kept_rows_from") else []),
         f"Teacher's split-half reliability (LinFiK from half of the task samples vs the other half, "
         f"{r['teacher_split_half']['repeats']} splits): Spearman {r['teacher_split_half']['spearman_pool']:.3f} "
         f"over the pool, {r['teacher_split_half']['spearman_clean']:.3f} over its clean samples.", "",
         f"| features | head | dim | CV Spearman ± se | CV value bought (top {r['top']}) | s |", "|---|---|---|---|---|---|"]
    for x in sorted(r["rows"], key=lambda x: -x["cv_spearman"]):
        L.append(f"| {x['features']} | {x['head']} | {x['dim']} | {x['cv_spearman']:.3f} ± {x['cv_se']:.3f} | "
                 f"{x['cv_value_bought']:.3f} | {x['s']} |")
    b = r["best"]
    c = r["best_student"]
    L += ["", f"Best: {b['features']} with {b['head']}, CV Spearman {b['cv_spearman']:.3f} ± {b['cv_se']:.3f} "
              f"(value bought {b['cv_value_bought']:.3f}).",
          f"Best text student of the library (`jaxval.alinfik.fit_student` on `make_embed_fn(spec)` of the text the "
          f"LM saw; `howdy_finetune`'s `student.embed`): `{c['student_embed']}`, CV Spearman {c['cv_spearman']:.3f} ± "
          f"{c['cv_se']:.3f}.", ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
