"""Fine-tuning LDS on text (issue 18): a small character GPT pretrained once, fine-tuned from the same weights
on random halves of a WikiText-2 fine-tuning set; LDS of EK-FAC, LoGra variants and the baselines.

    python experiments/lds_text_finetune.py --config configs/lds_text_finetune.yaml [--tiny] [--out DIR]

- Pretraining (once, cached under the cache dir): TinyShakespeare + the start of WikiText-2 valid.
- Fine-tuning set and queries: one region of consecutive 64-character blocks of WikiText-2 test; every
  ``query_every``-th block is a held-out query, the others form the fine-tuning set (so queries share
  articles with the fine-tuning blocks, never the blocks themselves).
- LDS ground truth: ``subsets`` random halves × ``seeds`` seeds, each model fine-tuned from the pretrained
  weights (``warm_start``: the seed only draws the batches) with the fixed schedule ``finetune``, all by the
  vmapped harness ``jaxval.evaluation.retrain``. Noise ceiling: per query, Spearman over subsets between the
  seed-averaged losses of two halves of the seeds, mean over queries.
- Scores: computed on the pretrained model fine-tuned on ALL fine-tuning blocks (the model whose training
  data is attributed), with the library's baselines (``jaxval.evaluation.baselines``).
- Config ``ceiling_only: true``: pretrain + LDS retraining and the noise ceiling only (for tuning the set-up).
"""

import datetime
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from collections import Counter  # noqa: E402
from flax import nnx  # noqa: E402

from jaxval import evaluation as ev  # noqa: E402
from jaxval.cli import config as jcfg  # noqa: E402
from jaxval.data.text import CharTokenizer, load_text, make_blocks  # noqa: E402
from jaxval.evaluation import baselines as bl  # noqa: E402
from jaxval.models.gpt import GPT, GPTConfig, loss_fn, param_count  # noqa: E402

UNK = "\x00"


def eval_fn(m, d):
    return {"loss": loss_fn(m, d)}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_data(cfg):
    """Tokenizer, pretraining blocks, fine-tuning blocks, query blocks."""
    dc = cfg["data"]
    bl_ = int(dc["block_len"])
    ts = load_text("tinyshakespeare")[: dc["pretrain_shakespeare_chars"]]
    wv = load_text("wikitext-2-valid")[: dc["pretrain_wikitext_chars"]]
    wt = load_text("wikitext-2-test")
    counts = Counter(ts + wv + wt)
    vocab = sorted(c for c, k in counts.items() if k >= dc.get("min_char_count", 50) and c != UNK) + [UNK]
    tok = CharTokenizer(vocab, unk=UNK)
    pre = np.concatenate([make_blocks(tok.encode(t), bl_)["tokens"] for t in (ts, wv)])
    pre = {"tokens": pre, "mask": np.ones(pre.shape, np.float32)}
    region = make_blocks(tok.encode(wt), bl_)["tokens"][dc["region_start"]:]
    n_ft, every = int(dc["n_finetune"]), int(dc["query_every"])
    is_q = (np.arange(len(region)) % every) == every - 1
    q_idx = np.flatnonzero(is_q)[: dc["n_queries"]]
    t_idx = np.flatnonzero(~is_q)[:n_ft]
    if len(t_idx) < n_ft or len(q_idx) < dc["n_queries"]:
        raise ValueError("the WikiText-2 test text is too short for n_finetune / n_queries at this query_every")
    ft = {"tokens": region[t_idx], "mask": np.ones((n_ft, bl_), np.float32)}
    qs = {"tokens": region[q_idx], "mask": np.ones((len(q_idx), bl_), np.float32)}
    return tok, pre, ft, qs


def pretrained(cfg, make, pre, tok):
    """The pretrained model, trained once and cached (orbax via jaxval.cli.config.save_model)."""
    key = hashlib.sha256(json.dumps({"gpt": cfg["gpt"], "pretrain": cfg["pretrain"], "data": cfg["data"],
                                     "vocab": tok.vocab}, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.abspath(os.path.join(cfg["cache"], f"{cfg['name']}-pretrained-{key}"))
    model = make(nnx.Rngs(0))
    if not cfg.get("pretrain"):  # pretrain: null (smoke tests): the random initialisation stands in
        return model, 0.0
    if os.path.exists(os.path.join(path, "meta.json")):
        jcfg.load_model(model, path)
        log(f"pretrained model read from {path}")
        return model, 0.0
    pc = ev.RetrainConfig(**cfg["pretrain"])
    log(f"pretraining on {len(pre['tokens'])} blocks, {pc.steps} steps of {pc.batch_size} ...")
    with ev.Cost() as c:
        model = ev.fit(make, loss_fn, pre, pc, seed=0)
    os.makedirs(cfg["cache"], exist_ok=True)
    jcfg.save_model(model, path, meta={"seconds": c.seconds}, overwrite=True)
    log(f"pretrained in {c.seconds:.1f} s -> {path}")
    return model, c.seconds


_loss_jit = nnx.jit(loss_fn)


def mean_loss(model, data, bs=64):
    """Mean loss per predicted character; batches padded to ``bs`` rows (one compiled shape)."""
    tok = np.asarray(data["tokens"])
    out = []
    for i in range(0, len(tok), bs):
        b = tok[i:i + bs]
        pad = np.concatenate([b, np.repeat(b[-1:], bs - len(b), 0)])
        out.append(np.asarray(_loss_jit(model, {"tokens": jnp.asarray(pad),
                                                "mask": jnp.ones(pad.shape, jnp.float32)}))[:len(b)])
    return float(np.concatenate(out).mean()) / (tok.shape[1] - 1)


def scores_of(spec, model, train, queries, precond_kw, bs):
    """Scores [Q, N] of one method spec (the library's baselines; "identity": un-projected gradients with
    the identity preconditioner through LoGra, streamed)."""
    if spec["type"] == "identity":
        return bl.logra_scores(model, loss_fn, train, queries, rank=None, init="identity", kind="identity",
                               batch_size=bs, store_train=False)
    return bl.compute_scores(spec, model, loss_fn, train, queries, precond_kw=precond_kw, batch_size=bs)


def main():
    cfg = common.parse(__doc__.splitlines()[0], "configs/lds_text_finetune.yaml")
    t_all = time.perf_counter()
    name, out, cache = cfg["name"], cfg["out"], cfg["cache"]
    tok, pre, ft, qs = build_data(cfg)
    bl_ = int(cfg["data"]["block_len"])
    gcfg = GPTConfig(vocab_size=tok.vocab_size, block_size=bl_, **cfg["gpt"])

    def make(rngs):
        return GPT(gcfg, rngs=rngs)

    base, pre_s = pretrained(cfg, make, pre, tok)
    fcfg = ev.RetrainConfig(**cfg["finetune"])
    with ev.Cost() as c:
        model = ev.fit(make, loss_fn, ft, fcfg, seed=0, warm_start=base)  # the model whose data is attributed
    ft_s = c.seconds
    info = {"params": param_count(model), "vocab": tok.vocab_size, "pretrain_blocks": len(pre["tokens"]),
            "pretrain_seconds": round(pre_s, 1), "finetune_one_seconds": round(ft_s, 1),
            "query_loss_pretrained": mean_loss(base, qs), "query_loss_finetuned": mean_loss(model, qs),
            "ft_loss_pretrained": mean_loss(base, ft), "ft_loss_finetuned": mean_loss(model, ft)}
    log(f"GPT {cfg['gpt']}: {info['params']} params, vocab {tok.vocab_size}; query loss {info['query_loss_pretrained']:.3f}"
        f" -> {info['query_loss_finetuned']:.3f} nats/char after fine-tuning on all {len(ft['tokens'])} blocks "
        f"(fine-tuning set {info['ft_loss_pretrained']:.3f} -> {info['ft_loss_finetuned']:.3f}); one fine-tune {ft_s:.1f} s")

    n, q = ev.masks_n(ft), ev.masks_n(qs)
    lc = cfg["lds"]
    ns, nseed = int(lc["subsets"]), int(lc["seeds"])
    masks = ev.lds_masks(n, ns, lc.get("alpha", 0.5), seed=lc.get("seed", 0))
    seeds = ev.subset_seeds(ns, nseed, base=1)
    log(f"LDS retraining: {ns} subsets x {nseed} seeds = {ns * nseed} fine-tunes ...")
    with ev.Cost() as c:
        meas = ev.retrain(make, loss_fn, ft, np.repeat(masks, nseed, 0), seeds.reshape(-1), fcfg, qs, eval_fn,
                          warm_start=base, cache_dir=cache, tag=f"{name}-lds")
    lds_s = c.seconds
    meas_loss = meas["loss"].reshape(ns, nseed, q)
    h = nseed // 2
    ceil_q = ev.spearman(meas_loss[:, :h].mean(1), meas_loss[:, h:].mean(1), axis=0)
    ceiling = float(np.nanmean(ceil_q))
    # how much the subset moves a query's loss, against how much the seed moves it
    between = float(np.mean(meas_loss.mean(1).std(0)))
    within = float(np.mean(meas_loss.std(1)))
    log(f"noise ceiling {ceiling:.3f} (std of query loss over subsets {between:.3f}, over seeds {within:.3f} nats); "
        f"retraining {lds_s:.1f} s")

    res = {"name": name, "command": cfg["_command"], "machine": common.machine(),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "n_finetune": n, "n_queries": q,
           "noise_ceiling": ceiling, "noise_ceiling_se": float(np.nanstd(ceil_q) / np.sqrt(np.isfinite(ceil_q).sum())),
           "loss_std_over_subsets": between, "loss_std_over_seeds": within, "lds_retrain_seconds": round(lds_s, 1),
           "model_info": info, "config": {k: v for k, v in cfg.items() if not k.startswith("_")}, "methods": {}}

    def write():
        res["total_seconds"] = round(time.perf_counter() - t_all, 1)
        # the raw material of the LDS numbers: masks [M, N], measured query losses [M, S, Q], scores [Q, N]
        np.savez_compressed(os.path.join(out, f"{name}_arrays.npz"), masks=masks,
                            measured=meas_loss.astype(np.float32),
                            **{f"scores/{m}": s.astype(np.float32) for m, s in scores.items()})
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(markdown(res))

    scores = {}
    if not cfg.get("ceiling_only"):
        bs = int(cfg.get("score_batch_size", 32))
        for spec in cfg["methods"]:
            mname = common.method_name(spec)
            with ev.Cost() as c:
                s = scores_of(spec, model, ft, qs, cfg.get("precond"), bs)
            if not np.all(np.isfinite(s)):
                print(f"warning: {mname} produced non-finite scores", file=sys.stderr)
            scores[mname] = s
            r = ev.lds(s, masks, meas_loss)
            k = int(np.isfinite(r.per_query).sum())
            res["methods"][mname] = {"lds": r.mean, "se": r.std / np.sqrt(max(k, 1)), "std": r.std,
                                     "seconds": round(c.seconds, 2), "peak_mb": round(c.peak_mb, 1)}
            log(f"{mname}: LDS {r.mean:.3f} ± {r.std / np.sqrt(max(k, 1)):.3f} (s.e.), {c.seconds:.1f} s")
        if "identity" in scores and "grad_dot" in scores:  # the same quantity by two code paths
            a, b = scores["identity"], scores["grad_dot"]
            res["identity_vs_grad_dot_max_rel_diff"] = float(np.abs(a - b).max() / np.abs(b).max())

    write()  # the LDS results, before the (long) removal test
    if cfg.get("removal") and not cfg.get("ceiling_only"):
        rc = cfg["removal"]
        sub = {k: v[: rc["points"]] for k, v in qs.items()}
        chosen = {m: scores[m][: rc["points"]] for m in rc["methods"] if m in scores}
        log(f"removal test: {rc['points']} queries x {len(rc['ks'])} k x {len(rc['seeds'])} seeds x "
            f"{len(chosen) + 1} methods ...")
        with ev.Cost() as c:
            curves = ev.removal_effect(make, loss_fn, ft, sub, chosen, rc["ks"], rc["seeds"], fcfg, eval_fn,
                                       cache_dir=cache, warm_start=base)
        res["removal_retrain_seconds"] = round(c.seconds, 1)
        res["removal"] = {"ks": list(rc["ks"]), "points": int(rc["points"]), "seeds": len(rc["seeds"]),
                          "curves": {m: [float(v) for v in ys] for m, ys in curves.items()}}
        write()
    print(markdown(res))
    return res


def markdown(res) -> str:
    c, i = res["config"], res["model_info"]
    lc = c["lds"]
    lines = ["## Fine-tuning LDS on text: small char GPT, pretrained once, fine-tuned on WikiText-2 halves", "",
             f"- command: `{res['command']}`", f"- machine: {res['machine']}", f"- date: {res['date']}",
             f"- GPT {c['gpt']} ({i['params']} params, char vocab {i['vocab']}), pretrained on {i['pretrain_blocks']} "
             f"blocks of {c['data']['block_len']} chars (TinyShakespeare + WikiText-2 valid; {c['pretrain']}); "
             f"fine-tuning schedule {c['finetune']} from the pretrained weights",
             f"- {res['n_finetune']} fine-tuning blocks, {res['n_queries']} held-out query blocks (WikiText-2 test); "
             f"query loss {i['query_loss_pretrained']:.3f} → {i['query_loss_finetuned']:.3f} nats/char after "
             f"fine-tuning on all blocks (fine-tuning set {i['ft_loss_pretrained']:.3f} → {i['ft_loss_finetuned']:.3f})",
             f"- LDS: {lc['subsets']} random subsets of α={lc.get('alpha', 0.5)} × {lc['seeds']} seeds "
             f"({lc['subsets'] * lc['seeds']} fine-tunes, {res['lds_retrain_seconds']} s); Spearman per query between "
             "−Σ_{i∈S} score and the seed-averaged query loss; mean ± s.e. over queries",
             f"- **noise ceiling** (Spearman between the seed-averaged losses of two halves of the seeds): "
             f"{res['noise_ceiling']:.3f} ± {res['noise_ceiling_se']:.3f}; std of a query's loss over subsets "
             f"{res['loss_std_over_subsets']:.3f} vs over seeds {res['loss_std_over_seeds']:.3f} nats",
             f"- total wall time {res['total_seconds']} s"]
    if "identity_vs_grad_dot_max_rel_diff" in res:
        lines.append(f"- `identity` (un-projected gradients, identity preconditioner, through `logra_scores`) and "
                     f"`grad_dot` (`grad_scores`) are the same quantity; both end in the same streamed LoGra "
                     f"contraction, max relative difference {res['identity_vs_grad_dot_max_rel_diff']:.1e}")
    if res["methods"]:
        lines += ["", "| method | LDS | s.e. | scoring wall time (s) | peak extra memory (MB) |", "|---|---|---|---|---|"]
        for m, v in res["methods"].items():
            lines.append(f"| {m} | {v['lds']:.3f} | {v['se']:.3f} | {v['seconds']} | {v['peak_mb']} |")
    if "removal" in res:
        r = res["removal"]
        lines += ["", f"Removal test ({r['points']} queries × {r['seeds']} seeds, {res['removal_retrain_seconds']} s): "
                      "mean increase of each query's own loss (nats per block) after fine-tuning without its top-k "
                      "proponents, relative to fine-tuning on all blocks with the same seed; random = k random blocks",
                  "", "| method | " + " | ".join(f"k={k}" for k in r["ks"]) + " |", "|---|" + "---|" * len(r["ks"])]
        for m, ys in r["curves"].items():
            lines.append(f"| {m} | " + " | ".join(f"{y:+.4f}" for y in ys) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
