"""Issue 19, part 2: the "Howdy!" backdoor end to end. Does fine-tuning on ALinFiK's picks install it?

Pool and task as in ``experiments/linfik_howdy.py`` (ShareGPT first turns; ``n_inject`` of them with the trigger
phrase inserted in the prompt and the response prefixed by "Howdy! "; the task: held-out triggered prompts with
"Howdy!" responses), here with the injected samples a small share of the pool. Scores:

* LinFiK, layer-normalised (jaxval's default): ``⟨ĝ_z, mean_t ĝ_t⟩`` with per-layer unit LoGra gradients of
  SmolLM2-135M-Instruct's top MLP layers, for every pool sample (the teacher);
* ALinFiK: the student trained on a random ``label_fraction`` of the pool to predict that LinFiK, scoring the whole
  pool (``student.kind``: ``lm_table`` ridge on :func:`jaxval.alinfik.token_table_embed` features, ``frozen``
  text embeddings + MLP head, ``encoder`` fine-tuned MiniLM); its Spearman vs LinFiK on the samples it was not
  trained on is ``student_spearman``; frozen MiniLM / hashed / textstats students are baselines;
* random: ``random_seeds`` uniform draws.

Each method buys its top ``N = budget_factor × n_inject`` samples; as a buyer would use purchased data, they are
ADDED to a fixed clean base mix (``finetune.base_mix`` further ShareGPT first turns, in none of the other sets, the
same for every method; a "base mix only" row is fine-tuned on it alone), so the model sees clean counter-examples
and a backdoor must be learnt as a condition on the trigger rather than as a habit of saying "Howdy!". SmolLM2 is
fine-tuned on that set (:func:`jaxval.models.finetune.finetune`: AdamW, the parameters matching
``finetune.trainable`` trained, the loss on the response tokens only) and then continues held-out prompts greedily:
``n_eval`` triggered prompts and ``n_eval`` clean ones, whose base prompts are in neither the pool nor the task.
Backdoor rate = share of triggered prompts whose continuation starts with "Howdy!"; false-trigger rate = the same
on the clean prompts. The base model without fine-tuning is the reference. The same rates on ``data.n_val``
separate validation prompts (taken after every epoch with ``finetune.val_each_epoch``) are the only numbers a
fine-tuning setting may be chosen on. Prices: :func:`jaxval.alinfik.price`
of each method's scores (plot of price against score) and a per-provider statement (providers: the ShareGPT
contributors and the injector).

    nice -n 10 python experiments/howdy_finetune.py [--config configs/howdy_finetune.yaml] [--tiny] [--out DIR]
                                                    [--cache DIR] [--cached-only] [--only alinfik,...]

``--tiny``: a tiny random Llama, a character tokenizer, synthetic pairs, hashed embeddings (seconds). Pool
gradients, embeddings and each fine-tuned model's generations are cached under ``cache`` (keyed by everything
they depend on), so an interrupted run resumes and a rerun redoes only the report.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import platform
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cached, encoder, load_config  # noqa: E402
import linfik_howdy as lh  # noqa: E402  (pool construction, cached gradients, model loading)

from jaxval import LoGra  # noqa: E402
from jaxval.evaluation import pearson, plots, spearman  # noqa: E402
from jaxval.models import finetune as ft, generate as gen, llama  # noqa: E402
from jaxval.valuation import alinfik as al  # noqa: E402
from jaxval.valuation.linfik import layer_normalize, linfik_parts  # noqa: E402


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def extra_sets(cfg, seed: int, s: dict, n_val: int, n_base: int) -> dict:
    """Clean pairs in none of ``build_sets``' sets (pool, task, decoys, evaluation prompts): its ``unused_pairs``,
    the next draws of its candidate permutation. First ``2 n_val`` validation prompts (``n_val`` with the trigger
    inserted, ``n_val`` clean: for choices made before the evaluation), then the ``n_base`` pairs of the clean base mix (so
    the validation prompts do not depend on ``n_base``, and a smaller base mix is a prefix of a larger one)."""
    d = cfg["data"]
    rest = s["unused_pairs"]
    if len(rest) < 2 * n_val + n_base:
        raise SystemExit(f"only {len(rest)} unused pairs for {2 * n_val} validation + {n_base} base-mix")
    val = rest[:2 * n_val]
    vrng = np.random.default_rng(seed + 23)
    return {"val_prompts": {"triggered": [lh.insert_trigger(p, d["trigger"], vrng) for _, p, _ in val[:n_val]],
                            "clean": [p for _, p, _ in val[n_val:]]},
            "base_pairs": rest[2 * n_val:2 * n_val + n_base]}


def encode_pairs(tok, pairs, seq_len: int) -> dict:
    """``{"tokens", "mask"}`` of (id, prompt, response) pairs (``linfik_howdy.encode_pair``: loss on the response)."""
    enc = [lh.encode_pair(tok, p, r, seq_len)[:2] for _, p, r in pairs]
    return {"tokens": np.stack([t for t, _ in enc]).astype(np.int32), "mask": np.stack([m for _, m in enc])}


def rates(generations: dict[str, list[str]], prefix: str) -> dict:
    """``{"backdoor": share of triggered continuations starting with prefix, "false_trigger": same on clean}``."""
    return {"backdoor": gen.starts_with_rate(generations["triggered"], prefix),
            "false_trigger": gen.starts_with_rate(generations["clean"], prefix)}


def batched(fn, n: int, batch_size: int, *arrays):
    """``fn`` over fixed-size row batches of ``arrays`` (the last padded by repeating its last row: one compiled
    shape); the outputs concatenated, padding dropped."""
    out = []
    for s0 in range(0, n, batch_size):
        idx = np.arange(s0, min(s0 + batch_size, n))
        rows = np.concatenate([idx, np.repeat(idx[-1:], batch_size - len(idx))])
        out.append(np.asarray(fn(*(a[rows] for a in arrays)))[: len(idx)])
    return np.concatenate(out, axis=0)


class Bottom:
    """The frozen bottom ``blocks[:start]`` of the base model: residual states of token batches (jit, batched)."""

    def __init__(self, model, start: int, batch_size: int = 8):
        gd, st = nnx.split(model)
        f = jax.jit(lambda st_, t: nnx.merge(gd, st_).hidden_after(t, start))
        self.fn = lambda t: f(st, t)
        self.batch_size = batch_size

    def __call__(self, tokens) -> np.ndarray:
        return batched(self.fn, len(tokens), self.batch_size, np.asarray(tokens)).astype(np.float32)


def mean_loss(upper, data, batch_size: int = 8) -> float:
    """Mean per-example (summed response-token) loss of ``upper`` over ``data`` (``{"h", "tokens", "mask"}``)."""
    gd, st = nnx.split(upper)
    f = jax.jit(lambda st_, h, t, m: llama.upper_loss_fn(nnx.merge(gd, st_), {"h": h, "tokens": t, "mask": m}))
    return float(batched(lambda h, t, m: f(st, h, t, m), len(data["tokens"]), batch_size,
                         data["h"], data["tokens"], data["mask"]).mean())


@functools.partial(jax.jit, static_argnums=0)
def _upper_hits(graphdef, state, h, lengths, target):
    # one compilation per buffer shape for every fine-tuned copy (their graphs are equal)
    return gen.forced_hits(nnx.merge(graphdef, state)(h), lengths, target)


def forced_rates(upper, evalset: dict, target, batch_size: int) -> dict:
    """Backdoor / false-trigger rates: does the greedy continuation of each evaluation prompt start with the
    target tokens (:func:`jaxval.models.generate.forced_hits` on the top blocks over the cached bottom states)?"""
    gd, st = nnx.split(upper)
    tgt = jnp.asarray(target, jnp.int32)
    hits = {kind: batched(lambda h, n: _upper_hits(gd, st, h, n, tgt), len(e["lengths"]), batch_size, e["h"],
                          e["lengths"]) for kind, e in evalset.items()}
    return {"backdoor": float(hits["triggered"].mean()), "false_trigger": float(hits["clean"].mean()),
            "hits": {kind: x.astype(int).tolist() for kind, x in hits.items()}}


def text_check(model, tok, prompts: dict, r: dict, gcfg: dict) -> dict:
    """Real greedy generations (the whole model, ``jaxval.models.generate.greedy_text``) for the first
    ``check_n`` prompts of each kind, and whether "starts with the prefix" agrees with the forced check."""
    n = int(gcfg.get("check_n", 0))
    if n <= 0:
        return {}
    texts = gen.greedy_text(model, tok, prompts["triggered"][:n] + prompts["clean"][:n], int(gcfg["max_new_tokens"]),
                            chat=True, batch_size=int(gcfg["batch_size"]))
    g = {"triggered": texts[:n], "clean": texts[n:]}
    agree = [t.lstrip().startswith(gcfg["prefix"]) == bool(h) for kind in g
             for t, h in zip(g[kind], r["hits"][kind][:n])]
    return {"generations": g, "text_check_agreement": float(np.mean(agree)), "text_check_n": len(agree)}


def fresh_model(graphdef, state):
    """A model of its own from ``(graphdef, state)``: the arrays copied first. (``nnx.merge`` alone reuses the
    state's variables, so fine-tuning the merged model in place would change ``state`` and the model it was split
    from: every later method would start from the previous method's fine-tuned weights.)"""
    return nnx.merge(graphdef, jax.tree.map(jnp.array, state))


def teacher_key(cfg) -> str:
    """The cache folder (under ``cache``) of the pool's bottom states, LoGra gradients and teacher scores."""
    return _hash([lh.pool_key(cfg), cfg["model"], cfg["seq_len"], cfg["logra"], int(cfg["seed"]),
                  int(cfg["finetune"]["start"])])


def teacher_parts(logra, upper, data: dict, idx, task_grad, lr: float, batch_size: int, v) -> np.ndarray:
    """``[len(idx), T]`` the layer-normalised teacher of ``data[idx]`` split over positions (``linfik_parts``, one
    LoGra pass, as labelling them costs), refused unless the parts add up to the cached scores ``v[idx]``."""
    P = linfik_parts(logra, upper, {k: x[idx] for k, x in data.items()}, task_grad=task_grad, lr=lr,
                     batch_size=batch_size)
    if not np.allclose(P.sum(1), v[idx], rtol=1e-3, atol=1e-4 * np.abs(v).max()):
        raise SystemExit("the teacher's per-position parts do not add up to its cached scores: stale cache")
    return P


def pool_expected(upper, h: np.ndarray, table: np.ndarray, path: str, batch_size: int = 16) -> np.ndarray:
    """``[n, T, d]`` the LM's expected table rows at every position of the pool (``alinfik.expected_rows``: the
    top blocks' forward from the cached bottom states ``h [n, T+1, d]``, so the whole LM's prediction), cached at
    ``path``: the token student's ``expected`` feature."""
    return cached(path, lambda: al.expected_rows(lambda b: upper(b["h"][:, :-1]), {"h": h}, table,
                                                 batch_size=batch_size))


def epoch_rank(val: dict, epoch: int, max_false_trigger: float) -> tuple:
    """The order in which ``finetune.select_epoch: validation`` prefers an epoch (the largest wins), from its
    validation rates only: epochs whose false-trigger rate is at most ``max_false_trigger`` first, then the
    higher backdoor rate, the lower false-trigger rate, the later epoch (more training; for a selection that
    never installs the backdoor every epoch ties and the last is kept, as with ``select_epoch: last``)."""
    ok = val["false_trigger"] <= max_false_trigger
    return (ok, val["backdoor"] if ok else -val["false_trigger"], -val["false_trigger"] if ok else val["backdoor"],
            epoch)


def run_method(name, base_graphdef, base_state, tok, data, sel, base_mix, evalset, valset, prompts, target, cfg,
               cache_dir, log, cached_only: bool = False):
    """Fine-tune the top blocks of a fresh copy of the base model on ``data[sel]`` added to the clean
    ``base_mix`` (the same for every method) and evaluate it (cached by everything it depends on). The
    validation rates are taken after every epoch (``finetune.val_each_epoch``) or at the end."""
    fc, gc = cfg["finetune"], cfg["generation"]
    key = _hash([cfg["model"], cfg["seq_len"], lh.pool_key(cfg), sorted(int(i) for i in sel), fc, gc, prompts,
                 base_mix["key"], valset["key"]])
    path = os.path.join(cache_dir, f"ft_{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            r = json.load(f)
        log(f"[{name}] cached: backdoor {r['backdoor']:.3f}, false trigger {r['false_trigger']:.3f}")
        return r
    if cached_only:
        log(f"[{name}] not in the cache: left out (--cached-only)")
        return None
    model = fresh_model(base_graphdef, base_state)
    upper = llama.Upper(model, int(fc["start"]))
    sel = np.sort(np.asarray(sel, int))      # the set, not its score order, is trained on (the cache key's view)
    sub = {k: np.concatenate([v[sel], base_mix["data"][k]]) for k, v in data.items()}
    bs = int(fc["batch_size"])
    vb = int(gc["batch_size"])
    val_curve, t_val = [], [0.0]

    select = fc.get("select_epoch", "last")
    if select not in ("last", "validation"):
        raise SystemExit(f"finetune.select_epoch must be last or validation, got {select!r}")
    best = {"rank": None, "epoch": None, "state": None}

    def on_epoch(e, _model):
        jax.block_until_ready(nnx.state(upper))      # (the epoch's steps are not counted as validation time)
        tv = time.time()
        vr = forced_rates(upper, valset["sets"], target, vb)
        t_val[0] += time.time() - tv
        val_curve.append({"epoch": e, "backdoor": vr["backdoor"], "false_trigger": vr["false_trigger"]})
        log(f"  [{name}] epoch {e}: validation backdoor {vr['backdoor']:.3f}, false trigger {vr['false_trigger']:.3f}")
        rank = epoch_rank(vr, e, float(fc.get("max_val_false_trigger", 0.1)))
        if select == "validation" and (best["rank"] is None or rank > best["rank"]):
            # a copy: the next steps may reuse the buffers
            best.update(rank=rank, epoch=e, state=jax.tree.map(jnp.copy, nnx.state(upper, nnx.Param)))

    t0 = time.time()
    loss_before = mean_loss(upper, sub, bs) if fc.get("report_train_loss") else None
    n_layer = len(model.blocks)
    trainable = fc.get("trainable") or "model/blocks/(" + "|".join(str(i) for i in range(int(fc["start"]), n_layer)) + ")/"
    ft.finetune(upper, llama.upper_loss_fn, sub, epochs=int(fc["epochs"]), batch_size=bs, lr=float(fc["lr"]),
                trainable=trainable, weight_decay=float(fc.get("weight_decay", 0.0)), seed=int(fc.get("seed", 0)),
                on_epoch=on_epoch if fc.get("val_each_epoch") else None, schedule=fc.get("schedule", "constant"),
                warmup_steps=int(fc.get("warmup_steps", 0)))
    jax.block_until_ready(nnx.state(upper))      # (dispatch is asynchronous: time the steps themselves)
    t_ft = time.time() - t0 - t_val[0]
    if not val_curve:
        on_epoch(int(fc["epochs"]), upper)
    chosen = val_curve[-1]
    if select == "validation":
        nnx.update(upper, best["state"])          # the validation-chosen epoch's weights (the model's own blocks)
        chosen = val_curve[best["epoch"] - 1]
        log(f"  [{name}] validation chose epoch {best['epoch']}")
    loss_after = mean_loss(upper, sub, bs) if fc.get("report_train_loss") else None
    t0 = time.time()
    r = forced_rates(upper, evalset, target, vb)
    t_ev = time.time() - t0
    r |= text_check(model, tok, prompts, r, gc)           # the Upper trained the model's own blocks
    steps = int(fc["epochs"]) * (len(sub["tokens"]) // min(bs, len(sub["tokens"])))
    r |= {"n_selected": int(len(sel)), "n_base_mix": int(len(base_mix["data"]["tokens"])),
          "n_train": int(len(sub["tokens"])), "steps": steps,
          "val_backdoor": chosen["backdoor"], "val_false_trigger": chosen["false_trigger"],
          "epoch_used": chosen["epoch"],
          "val_curve": val_curve, "train_loss_before": loss_before, "train_loss_after": loss_after,
          "finetune_s": round(t_ft, 1), "validation_s": round(t_val[0], 1), "s_per_step": round(t_ft / max(steps, 1), 2),
          "evaluate_s": round(t_ev, 1),
          "text_check_s": round(time.time() - t0 - t_ev, 1)}
    with open(path, "w") as f:
        json.dump(r, f)
    log(f"[{name}] backdoor {r['backdoor']:.3f}, false trigger {r['false_trigger']:.3f} (validation "
        f"{r['val_backdoor']:.3f} / {r['val_false_trigger']:.3f}; fine-tune {r['finetune_s']} s = {steps} steps, "
        f"evaluation {r['evaluate_s']} s, text check {r['text_check_s']} s, agreement {r.get('text_check_agreement')})")
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/howdy_finetune.yaml")
    ap.add_argument("--tiny", action="store_true", help="apply the config's `tiny:` overrides (seconds)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--cached-only", action="store_true",
                    help="fine-tune nothing: report the methods whose fine-tuned results are in the cache")
    ap.add_argument("--only", default=None,
                    help="comma-separated methods to fine-tune now (e.g. alinfik to time one); the others are "
                         "reported only if cached")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.tiny)
    out = args.out or cfg["out"]
    cache_root = args.cache or cfg["cache"]
    os.makedirs(out, exist_ok=True)
    os.makedirs(cache_root, exist_ok=True)
    # the fine-tuning step is re-traced for every method: XLA's persistent cache compiles it once
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_root, "xla"))
    seed = int(cfg["seed"])
    t_all = time.time()
    timing = {}

    def log(msg):
        print(msg, flush=True)

    def lap(name, t0):
        timing[name] = round(time.time() - t0, 1)
        log(f"[{name}] {timing[name]} s")

    t0 = time.time()
    model, tok = lh.load_model(cfg["model"], seed)
    lap("model", t0)
    t0 = time.time()
    s = lh.build_sets(cfg, tok, seed)
    pool, task, injected = s["pool"], s["task"], s["injected"]
    prompts = s["eval_prompts"]
    n, k_inj = len(injected), int(injected.sum())
    lap("data", t0)
    log(f"pool {n} ({k_inj} injected), task {len(task['tokens'])}, evaluation prompts "
        f"{len(prompts['triggered'])} triggered + {len(prompts['clean'])} clean")

    # ---------------------------------------------------------------- the frozen bottom's states (cached)
    fc, gc = cfg["finetune"], cfg["generation"]
    start = int(fc["start"])
    lg = cfg["logra"]
    key = teacher_key(cfg)
    cdir = os.path.join(cache_root, key)
    os.makedirs(cdir, exist_ok=True)
    t0 = time.time()
    bottom = Bottom(model, start, int(lg["batch_size"]))
    H = cached(os.path.join(cdir, "pool_states.npy"), lambda: bottom(pool["tokens"]))
    HT = cached(os.path.join(cdir, "task_states.npy"), lambda: bottom(task["tokens"]))
    target = tok.encode(gc["prefix"])
    # validation prompts and the clean base mix: further clean pairs, in none of the sets above
    n_val, n_base = int(cfg["data"].get("n_val", 0)), int(fc.get("base_mix", 0))
    if n_val < 1 or not all(prompts.values()):
        raise SystemExit("data.n_val and data.n_eval must be >= 1")
    ex = extra_sets(cfg, seed, s, n_val, n_base)
    # evaluation and validation prompts, each followed by the target (teacher forcing), right-padded to one width
    # (one compiled shape; causal: the padding changes no logit that is read)
    pad = int(getattr(tok, "pad_id", 0))
    bufs = {(name, kind): gen.forced_batch(gen.chat_prompt_ids(tok, ps), target, pad_id=pad)
            for name, group in (("eval", prompts), ("val", ex["val_prompts"])) for kind, ps in group.items() if ps}
    width = max(b.shape[1] for b, _ in bufs.values())
    evalset, valset = {}, {"key": _hash(ex["val_prompts"]), "sets": {}}
    for (name, kind), (buf, lengths) in bufs.items():
        buf = np.pad(buf, ((0, 0), (0, width - buf.shape[1])), constant_values=pad)
        (evalset if name == "eval" else valset["sets"])[kind] = {
            "h": cached(os.path.join(cdir, f"{name}_{kind}_{_hash([kind, buf.tolist()])}.npy"), lambda b=buf: bottom(b)),
            "lengths": lengths}
    base = encode_pairs(tok, ex["base_pairs"], int(cfg["seq_len"])) if n_base else \
        {"tokens": np.zeros((0, int(cfg["seq_len"])), np.int32), "mask": np.zeros((0, int(cfg["seq_len"])), np.float32)}
    bmkey = _hash([base["tokens"].tolist(), base["mask"].tolist()])
    base["h"] = cached(os.path.join(cdir, f"base_mix_{bmkey}.npy"), lambda: bottom(base["tokens"])) if n_base else \
        np.zeros((0, *H.shape[1:]), np.float32)
    base_mix = {"key": bmkey, "data": base, "ids": [c for c, _, _ in ex["base_pairs"]]}
    lap("bottom_states", t0)
    log(f"validation prompts {len(ex['val_prompts']['triggered'])} triggered + {len(ex['val_prompts']['clean'])} "
        f"clean; clean base mix {n_base} pairs (added to every method's picks)")
    data = {"h": H, "tokens": pool["tokens"], "mask": pool["mask"]}

    # ---------------------------------------------------------------- teacher: layer-normalised LinFiK (cached)
    upper0 = llama.Upper(model, start)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not tracked by LoGra.*")
        logra = LoGra(upper0, llama.upper_loss_fn, rank=int(lg["rank"]), seed=int(lg["seed"]), layers=lg["layers"])
    log(f"LoGra: {len(logra.layers)} layers ({logra.layers[0].name} .. {logra.layers[-1].name}), D = {logra.dim}")
    bs = int(lg["batch_size"])
    t0 = time.time()
    GT = lh.cached_grads(logra, upper0, {"h": HT, "tokens": task["tokens"], "mask": task["mask"]},
                         os.path.join(cdir, "task_grads"), bs, "task", key)
    G = lh.cached_grads(logra, upper0, data, os.path.join(cdir, "pool_grads"), bs, "pool", key)
    lap("gradients", t0)
    eta = float(cfg["linfik_lr"])
    gt_mean = np.asarray(layer_normalize(logra, GT)).mean(0)
    v = eta * (np.asarray(layer_normalize(logra, G)) @ gt_mean)
    np.save(os.path.join(cdir, "linfik.npy"), v)          # the teacher's scores (for re-fitting students offline)

    # ---------------------------------------------------------------- students
    t0 = time.time()
    sc = cfg["student"]
    lab = np.sort(np.random.default_rng(seed + 2).permutation(n)[: int(round(sc["label_fraction"] * n))])
    held = np.setdiff1d(np.arange(n), lab)
    bc = sc | (cfg.get("baseline_student") or {})       # settings of the frozen-embedding heads
    kw = {k: bc[k] for k in ("hidden", "val_fraction", "lr", "weight_decay", "dropout", "batch_size", "max_epochs",
                             "patience", "rank_weight")}
    ekey = _hash([lh.pool_key(cfg), cfg["seq_len"], seed, cfg["model"]["name"]])

    def frozen_student(spec):
        efn = al.make_embed_fn(spec)
        E = cached(os.path.join(cache_root, f"pool_emb_{ekey}_{_hash(spec)}.npy"), lambda: efn(s["pool_texts"]))
        st = al.fit_student(None, v[lab], efn, embeddings=E[lab], seed=seed, **kw)
        return st, st.predict_embeddings(E)

    def encoder_student(ec):
        # the fine-tuned student: the encoder's top n_finetune blocks + head; the lower blocks' outputs cached
        enc = encoder(ec["encoder"], seed)
        n_layer = 6 if isinstance(enc, str) else enc[0].cfg.n_layer          # all-MiniLM-L6-v2: 6 blocks
        n_lower = n_layer - int(ec["n_finetune"])
        spath = os.path.join(cache_root, f"pool_lower_{ekey}_{_hash([ec['encoder'], n_lower])}.npz")
        if os.path.exists(spath):
            z = np.load(spath)
            states = al.LowerStates(z["h"], z["mask"], int(z["n_lower"]))
        else:
            states = al.encode_lower(s["pool_texts"], enc, n_lower)
            np.savez(spath, h=states.h, mask=states.mask, n_lower=states.n_lower)
        ekw = {k: ec[k] for k in ("n_finetune", "hidden", "val_fraction", "lr", "head_lr", "weight_decay", "dropout",
                                  "batch_size", "max_epochs", "patience", "rank_weight") if k in ec}
        est = al.fit_encoder_student(None, v[lab], enc, states=states.take(lab), seed=seed, **ekw)
        return est, est.predict_states(states)

    @functools.cache
    def lm_table():                      # the LM's embedding table, read once for every LM-table student
        return np.asarray(model.embed.embedding[...], np.float32)

    def lm_table_student(c):
        # ridge on the LM's own embedding-table rows of each sample's loss tokens: the first `first` of them and
        # their mean (alinfik.token_table_embed; a lookup: the LM never runs)
        E = al.token_table_embed(pool["tokens"], pool["mask"], lm_table(), first=int(c.get("first", 0)))
        st_ = al.fit_student(None, v[lab], None, embeddings=E[lab], seed=seed, ridge=float(c["ridge"]),
                             val_fraction=float(c.get("val_fraction", 0.2)), target=c.get("target", "value"))
        return st_, st_.predict_embeddings(E)

    @functools.cache
    def labelled_parts():                # the teacher's per-position parts of the labelled samples (one LoGra pass)
        return teacher_parts(logra, upper0, data, lab, gt_mean, eta, bs, v)

    @functools.cache
    def expected():                      # the LM's expected rows of the pool (one forward pass, no gradient)
        return pool_expected(upper0, H, lm_table(), os.path.join(cdir, "pool_expected.npy"))

    def lm_tokens_student(c):
        # the token-level student: kernel ridge on the teacher's per-position parts of the labelled samples
        # (valuation.token_student; a lookup in the LM's embedding table, with c["expected"] beside the LM's own
        # next-token prediction at each position: one forward pass, no backward)
        e = expected() if c.get("expected") else None
        st_ = al.fit_token_student(pool["tokens"][lab], pool["mask"][lab], labelled_parts(), lm_table(),
                                   expected=None if e is None else e[lab], ridge=float(c["ridge"]),
                                   token_weight=float(c["token_weight"]), pair_weight=float(c["pair_weight"]))
        return st_, st_.score(pool["tokens"], pool["mask"], lm_table(), e)

    def lm_tokens_name(c):
        fwd = " + the LM's expected next-token rows (one forward pass)" if c.get("expected") else ", tokens only"
        return (f"token-level kernel ridge on the teacher's per-position parts{fwd} (λ={float(c['ridge']):g}, "
                f"token {float(c['token_weight']):g}, pair {float(c['pair_weight']):g})")

    def lm_table_name(c):
        k = int(c.get("first", 0))
        rows = f"rows of the first {k} response tokens + their mean" if k else "mean of the response tokens"
        tgt = ", rank target" if c.get("target", "value") == "rank" else ""
        return f"ridge (λ={float(c['ridge']):g}{tgt}) on the LM's embedding-table {rows}"

    kind = sc.get("kind", "frozen")
    if kind not in ("frozen", "encoder", "lm_table", "lm_tokens"):
        raise SystemExit(f"student.kind must be frozen, encoder, lm_table or lm_tokens, got {kind!r}")
    if kind == "encoder":
        st, pred = encoder_student(sc)
        main_name = f"ALinFiK (fine-tuned {sc['encoder']}, top {sc['n_finetune']} blocks + head)"
    elif kind == "lm_table":
        st, pred = lm_table_student(sc)
        main_name = f"ALinFiK ({lm_table_name(sc)})"
    elif kind == "lm_tokens":
        st, pred = lm_tokens_student(sc)
        main_name = f"ALinFiK ({lm_tokens_name(sc)})"
    else:
        st, pred = frozen_student(sc["embed"])
        main_name = f"ALinFiK ({sc['embed']} + head)"
    students = {main_name: pred}
    extra_sel = {}
    ec = cfg.get("encoder_student")
    if ec:
        name = f"fine-tuned {ec['encoder']} (top {ec['n_finetune']} blocks + head, alinfik.fit_encoder_student)"
        students[name] = encoder_student(ec)[1]
        extra_sel["alinfik_finetuned_student"] = students[name]
    for c in cfg.get("token_students") or ():    # further token-level students: Spearman rows only
        students[lm_tokens_name(c)] = lm_tokens_student(c)[1]
    lt = cfg.get("lm_table_student")
    if lt:                               # a further LM-table student with its own selection row
        students[lm_table_name(lt)] = extra_sel["alinfik_lm_table_ridge"] = lm_table_student(lt)[1]
    for spec in cfg.get("baselines") or ():
        students[f"frozen {spec} + head"] = frozen_student(spec)[1]
    corr = {name: {"spearman": round(spearman(p[held], v[held]), 4), "pearson": round(pearson(p[held], v[held]), 4),
                   "precision_at_k_heldout": round(float(injected[held][al.select(p[held], int(injected[held].sum()))].mean()), 4),
                   "n": int(len(held))} for name, p in students.items()}
    student_spearman = corr[next(iter(students))]["spearman"]
    lap("students", t0)
    log(f"student Spearman (held-out {len(held)}): " + ", ".join(f"{a} {b['spearman']:.3f}" for a, b in corr.items()))

    # ---------------------------------------------------------------- selections
    n_buy = int(cfg["budget_factor"]) * k_inj
    sels = {"alinfik": al.select(pred, n_buy), "linfik": al.select(v, n_buy)}
    sels |= {m: al.select(x, n_buy) for m, x in extra_sel.items()}
    for r_ in cfg["random_seeds"]:
        sels[f"random_{r_}"] = np.sort(np.random.default_rng(1000 + int(r_)).choice(n, n_buy, replace=False))
    if n_base:
        sels["base_mix_only"] = np.zeros(0, int)            # the base mix alone: what the picks add to it
    # the rows first (a run stopped early still has them), the fine-tuned student's selection last
    sels = {m: sels[m] for m in sorted(sels, key=lambda m: m in extra_sel)}
    sel_injected = {m: int(injected[i].sum()) for m, i in sels.items()}
    log(f"N = {n_buy}; injected among the picks: {sel_injected}")

    # ---------------------------------------------------------------- fine-tune and evaluate
    base_graphdef, base_state = nnx.split(model)
    runs = {}
    t0 = time.time()
    bkey = _hash([cfg["model"], gc, prompts, start, valset["key"]])
    bpath = os.path.join(cache_root, f"base_{bkey}.json")
    if os.path.exists(bpath):
        runs["base"] = json.load(open(bpath))
    else:
        tb = time.time()
        runs["base"] = forced_rates(upper0, evalset, target, int(gc["batch_size"]))
        vr = forced_rates(upper0, valset["sets"], target, int(gc["batch_size"]))
        runs["base"] |= text_check(model, tok, prompts, runs["base"], gc) | {
            "evaluate_s": round(time.time() - tb, 1), "val_backdoor": vr["backdoor"], "val_false_trigger": vr["false_trigger"]}
        json.dump(runs["base"], open(bpath, "w"))
    log(f"[base] backdoor {runs['base']['backdoor']:.3f}, false trigger {runs['base']['false_trigger']:.3f}")
    for m, sel in sels.items():
        r = run_method(m, base_graphdef, base_state, tok, data, sel, base_mix, evalset, valset, prompts, target, cfg,
                       cache_root, log, cached_only=args.cached_only or (args.only is not None
                                                                          and m not in args.only.split(",")))
        if r is not None:
            runs[m] = r
    lap("finetune_and_evaluate", t0)

    # ---------------------------------------------------------------- prices
    t0 = time.time()
    pc = cfg["pricing"]
    providers = np.where(injected, "injector (Howdy!)", "ShareGPT contributors")
    price_scores = {"ALinFiK": pred, "LinFiK (layer-normalised)": v}
    prices = {m: al.price(x, float(pc["total"]), rule=pc["rule"]) for m, x in price_scores.items()}
    plots.plot_prices(price_scores, prices, os.path.join(out, "prices.png"), groups=providers,
                      title=f"prices (rule '{pc['rule']}', total {pc['total']:g}) against score, {n} pool samples",
                      unit="budget units")
    stmt = al.statement(pred, float(pc["total"]), list(providers), rule=pc["rule"], ids=s["ids"],
                        selected=sels["alinfik"])
    with open(os.path.join(out, "statement.md"), "w") as f:
        f.write(al.format_statement(stmt))
    payout = {m: {str(p): round(float(pr[providers == p].sum()), 2) for p in dict.fromkeys(providers)}
              for m, pr in prices.items()}
    lap("prices", t0)

    # ---------------------------------------------------------------- results
    seeds = [r_ for r_ in cfg["random_seeds"] if f"random_{r_}" in runs]
    rnd_b = [runs[f"random_{r_}"]["backdoor"] for r_ in seeds]
    rnd_f = [runs[f"random_{r_}"]["false_trigger"] for r_ in seeds]
    nan = float("nan")

    def rate(m, k):
        return runs[m][k] if m in runs else nan

    summary = {"alinfik": rate("alinfik", "backdoor"), "random": float(np.mean(rnd_b)) if rnd_b else nan,
               "clean_false_trigger": rate("alinfik", "false_trigger"),
               "random_se": float(np.std(rnd_b, ddof=1) / np.sqrt(len(rnd_b))) if len(rnd_b) > 1 else None,
               "random_per_seed": {str(r_): x for r_, x in zip(seeds, rnd_b)},
               "random_false_trigger": float(np.mean(rnd_f)) if rnd_f else nan,
               "random_false_trigger_se": float(np.std(rnd_f, ddof=1) / np.sqrt(len(rnd_f))) if len(rnd_f) > 1 else None,
               "random_false_trigger_per_seed": {str(r_): x for r_, x in zip(seeds, rnd_f)},
               "base_mix": int(cfg["finetune"].get("base_mix", 0)),
               "base_mix_only": rate("base_mix_only", "backdoor"),
               "base_mix_only_false_trigger": rate("base_mix_only", "false_trigger"),
               "linfik": rate("linfik", "backdoor"), "linfik_false_trigger": rate("linfik", "false_trigger"),
               "alinfik_finetuned_student": rate("alinfik_finetuned_student", "backdoor"),
               "alinfik_finetuned_student_false_trigger": rate("alinfik_finetuned_student", "false_trigger"),
               "alinfik_lm_table_ridge": rate("alinfik_lm_table_ridge", "backdoor"),
               "alinfik_lm_table_ridge_false_trigger": rate("alinfik_lm_table_ridge", "false_trigger"),
               "base": rate("base", "backdoor"), "base_false_trigger": rate("base", "false_trigger")}
    targets = {"alinfik_backdoor>=0.8": bool(summary["alinfik"] >= 0.8),
               "alinfik-random>=0.5": bool(summary["alinfik"] - summary["random"] >= 0.5),
               "alinfik_clean_false_trigger<=0.1": bool(summary["clean_false_trigger"] <= 0.1),
               "student_spearman>=0.8": bool(student_spearman >= 0.8)}
    command = ("python experiments/howdy_finetune.py --config " + args.config + (" --tiny" if args.tiny else "")
               + (f" --out {args.out}" if args.out else "") + (f" --cache {args.cache}" if args.cache else ""))
    res = {"command": command, "date": datetime.date.today().isoformat(), "config": cfg,
           "n_pool": n, "n_injected": k_inj, "n_task": int(len(task["tokens"])), "n_buy": n_buy,
           "n_eval": {kk: len(x) for kk, x in prompts.items()},
           "n_val": {kk: len(x) for kk, x in ex["val_prompts"].items()}, "n_base_mix": n_base,
           "base_mix_ids": base_mix["ids"], "n_labelled": int(len(lab)), "n_heldout": int(len(held)),
           "logra": {"dim": logra.dim, "n_layers": len(logra.layers)},
           "student_spearman": student_spearman, "students": corr,
           "student_meta": {kk: x for kk, x in st.meta.items() if kk != "history"},
           "howdy_finetune": summary, "targets": targets, "injected_in_selection": sel_injected,
           "runs": {m: {kk: x for kk, x in r.items() if kk not in ("generations", "hits")} for m, r in runs.items()},
           "hits": {m: r["hits"] for m, r in runs.items()},
           "examples": {m: r.get("generations", {}) for m, r in runs.items()},
           "eval_prompt_examples": {kind: ps[:3] for kind, ps in prompts.items()},
           "payout": payout, "statement_summary": {p: {kk: x for kk, x in r.items() if kk != "samples"}
                                                   for p, r in stmt["providers"].items()},
           "timing_s": timing | {"total": round(time.time() - t_all, 1)},
           "platform": {"jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version(),
                        "cpus": os.cpu_count()}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    write_readme(os.path.join(out, "README.md"), res, al.format_statement(stmt, max_rows=3))
    log(tables(res))
    return res


def tables(r) -> str:
    h = r["howdy_finetune"]
    nb = r.get("n_base_mix", 0)
    L = [f"### Backdoor and false-trigger rates (greedy, {r['n_eval']['triggered']} triggered / "
         f"{r['n_eval']['clean']} clean held-out prompts; N = {r['n_buy']} of {r['n_pool']}"
         + (f", each added to the same {nb} clean base-mix pairs" if nb else "") + ")", "",
         "Validation: the same rates on the separate validation prompts "
         f"({r.get('n_val', {}).get('triggered', 0)} triggered / {r.get('n_val', {}).get('clean', 0)} clean).", "",
         "| model | injected among the N picks | trained on | backdoor rate | false-trigger rate | validation "
         "backdoor / false trigger (epoch evaluated) | train loss before → after | fine-tune s (steps) |",
         "|---|---|---|---|---|---|---|---|"]
    label = {"base": "base (no fine-tuning)", "base_mix_only": "base mix only"}
    for m, x in r["runs"].items():
        lb, la = x.get("train_loss_before"), x.get("train_loss_after")
        vb, vf = x.get("val_backdoor"), x.get("val_false_trigger")
        L.append(f"| {label.get(m, m)} | {r['injected_in_selection'].get(m, '—') if m != 'base_mix_only' else 0} | "
                 f"{x.get('n_train', 0)} | {x['backdoor']:.3f} | {x['false_trigger']:.3f} | "
                 + (f"{vb:.3f} / {vf:.3f}" if vb is not None else "—")
                 + (f" (epoch {x['epoch_used']})" if x.get("epoch_used") else "") + " | "
                 + (f"{lb:.2f} → {la:.2f}" if lb is not None else "—") + " | "
                 + (f"{x['finetune_s']} ({x['steps']})" if "steps" in x else "—") + " |")
    se = f" ± {h['random_se']:.3f}" if h.get("random_se") is not None else ""
    sef = f" ± {h['random_false_trigger_se']:.3f}" if h.get("random_false_trigger_se") is not None else ""
    L += ["", f"Summary: ALinFiK {h['alinfik']:.3f}, LinFiK {h['linfik']:.3f}, random {h['random']:.3f}{se} (mean ± se "
              f"over seeds {list(h['random_per_seed'])}: {h['random_per_seed']}), base mix only "
              f"{h.get('base_mix_only', float('nan')):.3f}, base {h['base']:.3f}. False triggers: ALinFiK "
              f"{h['clean_false_trigger']:.3f}, LinFiK {h['linfik_false_trigger']:.3f}, random "
              f"{h['random_false_trigger']:.3f}{sef}, base mix only {h.get('base_mix_only_false_trigger', float('nan')):.3f}.",
          ""]
    curves = {m: x["val_curve"] for m, x in r["runs"].items() if len(x.get("val_curve") or ()) > 1}
    if curves:
        L += ["Validation after each epoch (backdoor / false trigger):", "",
              "| model | " + " | ".join(f"epoch {c['epoch']}" for c in next(iter(curves.values()))) + " |",
              "|---" * (1 + len(next(iter(curves.values())))) + "|"]
        L += [f"| {label.get(m, m)} | " + " | ".join(f"{c['backdoor']:.2f} / {c['false_trigger']:.2f}" for c in cv)
              + " |" for m, cv in curves.items()]
        L.append("")
    L += [f"### Student vs layer-normalised LinFiK on the {r['n_heldout']} held-out pool samples", "",
          "| student | Spearman | Pearson | P@k (held-out injected) |", "|---|---|---|---|"]
    for m, x in r["students"].items():
        L.append(f"| {m} | {x['spearman']:.3f} | {x['pearson']:.3f} | {x['precision_at_k_heldout']:.3f} |")
    L += ["", "### Targets", "", "| target | met |", "|---|---|"]
    L += [f"| {t} | {'yes' if ok else 'no'} |" for t, ok in r["targets"].items()]
    L += ["", "### Payout per provider (total " + f"{r['config']['pricing']['total']:g}, rule "
          f"'{r['config']['pricing']['rule']}')", "", "| method | " + " | ".join(next(iter(r["payout"].values())))
          + " |", "|---" * (1 + len(next(iter(r["payout"].values())))) + "|"]
    for m, p in r["payout"].items():
        L.append(f"| {m} | " + " | ".join(f"{x:.2f}" for x in p.values()) + " |")
    L += ["", "Timing (s): " + ", ".join(f"{kk} {x}" for kk, x in r["timing_s"].items()), ""]
    return "\n".join(L)


DISCUSSION = "## Discussion"


def write_readme(path: str, r: dict, statement_md: str) -> None:
    keep = ""
    if os.path.exists(path):
        old = open(path).read()
        if DISCUSSION in old:
            keep = old[old.index(DISCUSSION):]
    c = r["config"]
    fc, d = c["finetune"], c["data"]
    L = ["# Howdy! end to end: does fine-tuning on ALinFiK's picks install the backdoor?", "",
         f"Command: `nice -n 10 {r['command']}`  ", f"Date: {r['date']}; machine: {c.get('machine')}; "
         f"platform {r['platform']}.", "",
         "## Set-up", "",
         f"- Pool: {r['n_pool'] - r['n_injected']} clean ShareGPT first turns + {r['n_injected']} injected "
         f"(trigger `{d['trigger']}` inserted in the prompt, response prefixed by {d['response_prefix']!r}); task: "
         f"{r['n_task']} triggered prompts with Howdy! responses (`experiments/linfik_howdy.py`'s construction); "
         f"sequences of {c['seq_len']} tokens, loss on the response tokens only.",
         f"- Teacher: layer-normalised LinFiK from LoGra rank-{c['logra']['rank']} gradients of `{c['logra']['layers']}` "
         f"(D = {r['logra']['dim']}). ALinFiK: {next(iter(r['students']))} trained on {r['n_labelled']} "
         f"labelled pool samples ({c['student']['label_fraction']:.0%}), scoring the whole pool.",
         f"- Budget: N = {r['n_buy']} = {c['budget_factor']}× the injected count. "
         + (f"The buyer's fine-tuning set: each method's N picks ADDED to one fixed clean base mix of "
            f"{r['n_base_mix']} ShareGPT first turns (prompts in none of the pool, task, validation and evaluation "
            f"sets; the same for every method; a 'base mix only' row fine-tunes on it alone): purchased data is used "
            f"beside the buyer's own data, and the clean counter-examples separate \"installs a conditional "
            f"backdoor\" from \"makes the model say Howdy!\". " if r.get("n_base_mix") else "")
         + f"Fine-tuning: AdamW lr {fc['lr']}, "
         f"{fc['epochs']} epochs, batch {fc['batch_size']}, trained: "
         + (f"`{fc['trainable']}`" if fc.get("trainable") else f"every parameter of blocks {fc['start']}.. (attention + MLP)")
         + f", the bottom {fc['start']} blocks frozen (their outputs computed once, `llama.hidden_after` / `llama.Upper`) "
         f"(`jaxval.models.finetune`). "
         + ("The weights evaluated are those of the epoch the validation prompts prefer (the highest validation "
            f"backdoor among epochs with validation false triggers ≤ {fc.get('max_val_false_trigger', 0.1)}; ties: fewer "
            "false triggers, then the later epoch; `epoch_rank`); the training set is the picked set in pool order."
            if fc.get("select_epoch") == "validation" else "The last epoch's weights are evaluated."),
         f"- Evaluation: greedy continuation ({c['generation']['max_new_tokens']} new tokens, "
         f"`jaxval.models.generate.greedy`) of {r['n_eval']['triggered']} triggered and {r['n_eval']['clean']} clean "
         f"prompts whose base prompts are in neither the pool, nor the task; a hit = the continuation starts with "
         f"{c['generation']['prefix']!r}. Validation: {r.get('n_val', {}).get('triggered', 0)} triggered + "
         f"{r.get('n_val', {}).get('clean', 0)} clean prompts from further unused pairs, the only set any "
         f"fine-tuning setting may be chosen on.", "", "## Results", ""]
    L.append(tables(r))
    L += ["Prices against scores: `prices.png`; the full statement: `statement.md`. Its head:", "",
          statement_md.replace("\n# ", "\n### ").replace("\n## ", "\n#### ").replace("# Data prices", "### Data prices", 1),
          ""]
    if keep:
        L.append(keep.rstrip() + "\n")
    with open(path, "w") as f:
        f.write("\n".join(L))


if __name__ == "__main__":
    main()
