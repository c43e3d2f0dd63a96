"""Experiment 3 (cost): samples/s of LinFiK (LoGra gradients of the LLM for each pool sample) vs the ALinFiK
student (MiniLM with its top blocks fine-tuned + MLP head; frozen-feature students as baselines; the Howdy! student,
ridge on the LM's embedding-table rows), and the speed-up as the LLM grows (GPT sizes, SmolLM2-135M).

    python experiments/linfik_cost.py --config configs/linfik_cost.yaml [--tiny] [--out DIR]

LinFiK cost per pool sample = one LoGra projected gradient (fast path, jit, batch ``batch_size``) plus the dot
with the task gradient; the task gradient is computed once and amortised over the pool (not counted). Student
cost per sample = the encoder forward (all blocks) + head. Every sample is ``seq_len`` tokens. Timings: best of ``repeats`` after one
compile/warm-up call, on whatever backend JAX runs (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import encoder, load_config  # noqa: E402
import linfik_howdy as lh  # noqa: E402  (the Howdy! models: SmolLM2 or the tiny Llama)

from jaxval import LoGra  # noqa: E402
from jaxval.valuation import alinfik as al  # noqa: E402
from jaxval.models.gpt import GPT, GPTConfig, loss_fn as gpt_loss, param_count  # noqa: E402


def _time(fn, repeats):
    jax.block_until_ready(fn())
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def linfik_rate(model, loss_fn, vocab, cfg, layers=None):
    b, t = int(cfg["batch_size"]), int(cfg["seq_len"])
    r = np.random.default_rng(0)
    batch = {"tokens": r.integers(0, vocab, (b, t)).astype(np.int32), "mask": np.ones((b, t), np.float32)}
    logra = LoGra(model, loss_fn, rank=int(cfg["rank"]), seed=0, layers=layers)
    gt = jax.numpy.ones((logra.dim,), jax.numpy.float32)
    sec = _time(lambda: logra.grads(model, batch) @ gt, int(cfg["repeats"]))
    return b / sec, logra.dim


def _tokenize(tok, ts, seq_len: int):
    """``(tokens [n, seq_len] int32, mask [n, seq_len] float32)`` right-padded, in one batch call of the tokenizer."""
    ids = [x[:seq_len] for x in tok.encode_batch(ts)]        # (SmolLM2's: the Rust tokenizer's batch call)
    mask = np.arange(seq_len) < np.array([len(x) for x in ids])[:, None]
    toks = np.zeros((len(ts), seq_len), np.int32)
    toks[mask] = np.concatenate(ids)                          # row-major: each row's ids in order
    return toks, mask.astype(np.float32)


def token_student_rate(model, tok, texts, seq_len: int, expected: bool = False, batch_size: int = 16) -> float:
    """samples/s of the token-level student (the Howdy! ALinFiK student, ``alinfik.fit_token_student``): tokenize,
    then per token a table gather, a dot product and two sorted-table lookups, summed per sample; the LM never
    runs. With ``expected`` (run 7's student) the LM's forward first: its expected next-token rows
    (``alinfik.expected_rows``, batches of ``batch_size``; no backward, no projection). Fitted on random parts of
    8 texts (the cost does not depend on the values)."""
    table = np.asarray(model.embed.embedding[...], np.float32)

    step = al.expected_rows_fn(lambda b: model(b["tokens"][:, :-1]), table) if expected else None

    def rows(toks):                      # (compiled once, in the warm-up below)
        return step({"tokens": toks}, batch_size) if expected else None

    toks, mask = _tokenize(tok, texts[:8], seq_len)
    parts = np.random.default_rng(0).normal(size=(8, seq_len - 1))
    st = al.fit_token_student(toks, mask, parts, table, expected=rows(toks))

    def score(ts):
        t, m = _tokenize(tok, ts, seq_len)
        return st.score(t, m, table, rows(t))

    score(texts[: min(64, len(texts))])      # warm-up: compiled at the batch shape, table verified once
    t0 = time.perf_counter()
    score(texts)
    return len(texts) / (time.perf_counter() - t0)


def lm_table_rate(model, tok, texts, seq_len: int, first: int, ridge: float = 1.0) -> float:
    """samples/s of the LM-table student (run 5's Howdy! ALinFiK student): tokenize with the LM's tokenizer, look
    up the LM's embedding-table rows of the first ``first`` tokens and their mean (``alinfik.token_table_embed``),
    a ridge head. The LM never runs."""
    table = np.asarray(model.embed.embedding[...], np.float32)

    def featurise(ts):
        return al.token_table_embed(*_tokenize(tok, ts, seq_len), table, first=first)

    e = featurise(texts[:8])
    st = al.fit_student(None, np.arange(32, dtype=np.float32), None, embeddings=np.tile(e, (4, 1)) +
                        np.random.default_rng(0).normal(size=(32, e.shape[1])).astype(np.float32), ridge=ridge)
    st.predict_embeddings(featurise(texts[: min(64, len(texts))]))       # warm-up
    t0 = time.perf_counter()
    st.predict_embeddings(featurise(texts))
    return len(texts) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/linfik_cost.yaml")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="apply the config's `tiny:` overrides (seconds)")
    args = ap.parse_args()
    cfg = load_config(args.config, args.tiny)  # free-form: the keys this script reads
    out = args.out or cfg["out"]
    os.makedirs(out, exist_ok=True)
    from jaxval.data import load_text

    words = load_text("wikitext-2-test").split()
    n = int(cfg["student_samples"])
    texts = [" ".join(words[i * cfg["seq_len"]:(i + 1) * cfg["seq_len"]]) for i in range(n)]
    rows = []
    # ---- students: the fine-tuned one (MiniLM, top blocks + head) and the frozen-feature baselines
    stud = {}
    for spec in cfg.get("finetuned_students", []):
        ft = al.fit_encoder_student(texts[:32], np.arange(32, dtype=np.float32), encoder(spec["encoder"]),
                                    n_finetune=int(spec["n_finetune"]), hidden=cfg["student_hidden"], max_epochs=1,
                                    patience=1)
        ft.score(texts[: min(64, n)])   # warm-up / compile at the batch shapes
        t0 = time.perf_counter()
        ft.score(texts)
        sec = time.perf_counter() - t0
        name = f"fine-tuned {spec['encoder']} top {spec['n_finetune']}"
        stud[name] = n / sec
        rows.append({"scorer": f"ALinFiK student ({name} + MLP {cfg['student_hidden']})", "params": None,
                     "samples_per_s": round(n / sec, 2)})
        print(rows[-1], flush=True)
    for spec in cfg["student_embeds"]:
        efn = al.make_embed_fn(spec)
        e = efn(texts[:8])
        head_st = al.fit_student(None, np.arange(32, dtype=np.float32), efn, embeddings=np.tile(e, (4, 1)),
                                 max_epochs=1, patience=1, hidden=cfg["student_hidden"])
        efn(texts[: min(64, n)])     # warm-up / compile at the batch shape
        t0 = time.perf_counter()
        head_st.score(texts)
        sec = time.perf_counter() - t0
        stud[spec] = n / sec
        rows.append({"scorer": f"ALinFiK student, frozen ({spec} + MLP {cfg['student_hidden']})", "params": None,
                     "samples_per_s": round(n / sec, 2)})
        print(rows[-1], flush=True)
    lt = cfg.get("lm_table_student")
    if lt:                   # the Howdy! student: its cost is a tokenizer + a table lookup of the LM it serves
        lm, lm_tok = lh.load_model(lt["model"], 0)
        rate = lm_table_rate(lm, lm_tok, texts, int(cfg["seq_len"]), int(lt["first"]))
        rows.append({"scorer": f"ALinFiK student (ridge on the {lt['model']['name']} embedding-table rows of the "
                               f"first {lt['first']} tokens + their mean)", "params": None,
                     "samples_per_s": round(rate, 2)})
        print(rows[-1], flush=True)
        if cfg.get("token_student", True):
            rate = token_student_rate(lm, lm_tok, texts, int(cfg["seq_len"]))
            rows.append({"scorer": f"ALinFiK student (token-level: kernel ridge on per-position parts, "
                                   f"{lt['model']['name']} tokens and embedding table)", "params": None,
                         "samples_per_s": round(rate, 2)})
            print(rows[-1], flush=True)
        if cfg.get("expected_token_student", False):
            rate = token_student_rate(lm, lm_tok, texts, int(cfg["seq_len"]), expected=True)
            rows.append({"scorer": f"ALinFiK student (token-level + the LM's expected next-token rows: one "
                                   f"{lt['model']['name']} forward pass, no gradient)", "params": None,
                         "samples_per_s": round(rate, 2)})
            print(rows[-1], flush=True)
    # ---- LinFiK under LLMs of growing size
    for name in cfg.get("gpt_sizes") or list(cfg["gpts"]):
        g = cfg["gpts"][name]
        gc = GPTConfig(vocab_size=g["vocab"], block_size=cfg["seq_len"], d_model=g["d_model"], n_layer=g["n_layer"],
                       n_head=g["n_head"])
        model = GPT(gc, rngs=nnx.Rngs(0))
        rate, dim = linfik_rate(model, gpt_loss, g["vocab"], cfg)
        rows.append({"scorer": f"LinFiK, GPT {name} (d{g['d_model']} L{g['n_layer']} V{g['vocab']})",
                     "params": param_count(model), "logra_dim": dim, "samples_per_s": round(rate, 2)})
        print(rows[-1], flush=True)
    if cfg.get("smollm2", True):
        try:
            from jaxval.models import llama

            model, tok = llama.load_smollm2()
            rate, dim = linfik_rate(model, llama.loss_fn, model.cfg.vocab_size, cfg | {"batch_size": cfg["smollm2_batch"]},
                                    layers=cfg.get("smollm2_layers"))
            rows.append({"scorer": f"LinFiK, SmolLM2-135M (LoGra on {cfg.get('smollm2_layers') or 'all'} layers)",
                         "params": param_count(model), "logra_dim": dim, "samples_per_s": round(rate, 3)})
            print(rows[-1], flush=True)
        except Exception as e:   # noqa: BLE001 - report, keep the GPT rows
            rows.append({"scorer": "LinFiK, SmolLM2-135M", "error": f"{type(e).__name__}: {e}"})
    ref_name = next(iter(stud))
    ref = stud[ref_name]
    for r_ in rows:
        if r_["scorer"].startswith("LinFiK") and "samples_per_s" in r_:
            r_["student_speedup"] = round(ref / r_["samples_per_s"], 2)
    res = {"command": f"python experiments/linfik_cost.py --config {args.config}" + (" --tiny" if args.tiny else ""),
           "config": cfg, "rows": rows,
           "platform": {"jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
                        "python": platform.python_version(), "cpus": os.cpu_count()}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    L = ["# Cost: ALinFiK student vs LinFiK (LLM gradients)", "", f"Command: `{res['command']}`", "",
         f"{cfg['seq_len']}-token samples; LinFiK = LoGra rank {cfg['rank']} projected gradient + dot with the task "
         f"gradient, batch {cfg['batch_size']} (SmolLM2: {cfg['smollm2_batch']}); student batch 64. "
         f"Speed-up = student ({ref_name}) samples/s ÷ LinFiK samples/s (the fine-tuned student costs one full "
         f"encoder forward per text, as the frozen one: the lower blocks are cached only while training). "
         f"Platform: {res['platform']}.", "",
         "| scorer | params | LoGra dim | samples/s | student speed-up |", "|---|---|---|---|---|"]
    for r_ in rows:
        L.append(f"| {r_['scorer']} | {r_.get('params') or ''} | {r_.get('logra_dim', '')} | "
                 f"{r_.get('samples_per_s', r_.get('error', ''))} | {r_.get('student_speedup', '')} |")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
