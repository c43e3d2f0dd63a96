"""``jaxval linfik``: LinFiK scores of an LM text pool with respect to a task set, from a YAML config.

The application around :func:`jaxval.linfik`: the WikiText-style data pipeline (:func:`lm_setup`, also used
by ``experiments/linfik_wikitext.py``), the config schema (:data:`LINFIK`, flat keys, see
``configs/linfik_cli.yaml``) and the command (:func:`run`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping

import numpy as np

from jaxval.cli.config import Field, Schema, load_config

__all__ = ["LM_DATA", "LINFIK", "lm_setup", "add_parser", "run", "file_sha256"]


def file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()

LM_DATA = Schema({
    "seed": Field((int,), 0),
    "pool_corpus": Field((str,), "wikitext-2-valid", help="corpus name or text file of the pool"),
    "task_corpus": Field((str,), "wikitext-2-test", help="corpus name or text file of the task set"),
    "offdomain_corpus": Field((str, None), None, help="e.g. tinyshakespeare: off-domain blocks mixed into the pool"),
    "offdomain_fraction": Field((float,), 0.2),
    "data_dir": Field((str, None), None, help="folder of the named corpora (default: $JAXVAL_DATA)"),
    "vocab_size": Field((int,), 4096),
    "block_len": Field((int,), 128),
    "max_pool": Field((int, None), None),
    "n_task": Field((int,), 64),
    "n_task_eval": Field((int,), 128),
})
"""The keys of :func:`lm_setup` (with their defaults)."""

LINFIK = Schema({
    **LM_DATA.fields,
    "d_model": Field((int,), 128), "n_layer": Field((int,), 2), "n_head": Field((int,), 4),
    "warmup_steps": Field((int,), 200, help="training steps before the (early) checkpoint that is scored"),
    "train_batch": Field((int,), 16), "train_lr": Field((float,), 3e-3),
    "rank": Field((int, list, None), 16), "layers": Field((str, list, None), None),
    "batch_size": Field((int,), 32), "linfik_lr": Field((float,), 1.0),
    "normalize": Field((str, None), "layer", choices=(None, "none", "layer"),
                       help="layer (default: per-layer unit-normalised gradients) | none (plain kernel)"),
})
"""The config of ``jaxval linfik`` (``configs/linfik_cli.yaml``)."""


def lm_setup(cfg: Mapping) -> dict:
    """The WikiText-style LM valuation setup from the :data:`LM_DATA` keys of ``cfg`` (defaults filled in,
    unknown keys refused).

    Tokenizer: word level, vocab from the pool corpus only (the task corpus is unseen). Pool blocks of
    ``block_len`` tokens are shuffled with ``seed``; ``offdomain_fraction`` of the pool (after mixing) comes
    from ``offdomain_corpus`` when given, marked ``pool_source == 1``. Task blocks: ``n_task`` define the task,
    the next ``n_task_eval`` evaluate it. Returns ``{"tok", "pool", "pool_texts", "pool_source", "task",
    "task_eval", "task_texts"}`` (``pool``/``task``/``task_eval``: ``{"tokens", "mask"} [n, block_len]``).
    """
    from jaxval.data import load_text
    from jaxval.data.text import WordTokenizer, make_blocks

    cfg = LM_DATA.validate(dict(cfg), "lm_setup")
    rng = np.random.default_rng(cfg["seed"])
    blen, ddir = cfg["block_len"], cfg["data_dir"]
    pool_text = load_text(cfg["pool_corpus"], data_dir=ddir)
    tok = WordTokenizer.from_text(pool_text, vocab_size=cfg["vocab_size"], eos="<eos>")
    pool = make_blocks(tok.encode(pool_text), blen)
    src = np.zeros(len(pool["tokens"]), np.int32)
    if cfg["offdomain_corpus"]:
        frac = cfg["offdomain_fraction"]
        if not 0 <= frac < 1:
            raise ValueError(f"offdomain_fraction must be in [0, 1), got {frac}")
        ob = make_blocks(tok.encode(load_text(cfg["offdomain_corpus"], data_dir=ddir)), blen)
        k = min(int(round(frac * len(src) / (1 - frac))), len(ob["tokens"]))
        pick = np.sort(rng.choice(len(ob["tokens"]), k, replace=False))
        pool = {key: np.concatenate([pool[key], ob[key][pick]]) for key in pool}
        src = np.r_[src, np.ones(k, np.int32)]
    perm = rng.permutation(len(src))
    if cfg["max_pool"]:
        perm = perm[: cfg["max_pool"]]
    pool = {k: v[perm] for k, v in pool.items()}
    src = src[perm]
    task_all = make_blocks(tok.encode(load_text(cfg["task_corpus"], data_dir=ddir)), blen)
    tperm = rng.permutation(len(task_all["tokens"]))
    nt, ne = cfg["n_task"], cfg["n_task_eval"]
    task = {k: v[tperm[:nt]] for k, v in task_all.items()}
    task_eval = {k: v[tperm[nt:nt + ne]] for k, v in task_all.items()}
    texts = [tok.decode(t) for t in pool["tokens"]]
    return {"tok": tok, "pool": pool, "pool_texts": texts, "pool_source": src, "task": task,
            "task_eval": task_eval, "task_texts": [tok.decode(t) for t in task["tokens"]]}


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``jaxval linfik`` on the argparse sub-parser collection ``sub``."""
    p = sub.add_parser("linfik", help="LinFiK scores of an LM text pool w.r.t. a task set (from a YAML config)",
                       description="Train the config's small GPT on its pool for warmup_steps (the early "
                                   "checkpoint), then score every pool block with LinFiK w.r.t. the task blocks.")
    p.add_argument("--config", required=True, help="YAML config (see configs/linfik_cli.yaml)")
    p.add_argument("--out", required=True, help="output folder: pool.jsonl (texts), linfik.npy, meta.json")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """``jaxval linfik --config C --out DIR``: writes ``DIR/pool.jsonl`` ({"id", "text", "source"} per line),
    ``DIR/linfik.npy`` (``[N]`` float32) and ``DIR/meta.json``."""
    from flax import nnx

    from jaxval._src.logra import LoGra
    from jaxval._src.train import train
    from jaxval.models.gpt import GPT, GPTConfig, loss_fn
    from jaxval.valuation.linfik import linfik

    cfg = load_config(args.config, LINFIK, overrides=args.set)
    setup = lm_setup({k: cfg[k] for k in LM_DATA.fields})
    seed = cfg["seed"]
    gcfg = GPTConfig(vocab_size=setup["tok"].vocab_size, block_size=cfg["block_len"], d_model=cfg["d_model"],
                     n_layer=cfg["n_layer"], n_head=cfg["n_head"])
    model = GPT(gcfg, rngs=nnx.Rngs(seed))
    train(model, loss_fn, setup["pool"], steps=cfg["warmup_steps"], batch_size=cfg["train_batch"],
          lr=cfg["train_lr"], seed=seed, progress=False)
    rank = tuple(cfg["rank"]) if isinstance(cfg["rank"], list) else cfg["rank"]
    logra = LoGra(model, loss_fn, rank=rank, seed=seed, layers=cfg["layers"])
    v = linfik(logra, model, setup["pool"], setup["task"], lr=cfg["linfik_lr"], batch_size=cfg["batch_size"],
               normalize=cfg["normalize"])
    from jaxval._src.provenance import Provenance

    os.makedirs(args.out, exist_ok=True)
    pool_lines = "".join(json.dumps({"id": i, "text": t, "source": int(s)}) + "\n"
                         for i, (t, s) in enumerate(zip(setup["pool_texts"], setup["pool_source"])))
    with open(os.path.join(args.out, "pool.jsonl"), "w") as f:
        f.write(pool_lines)
    np.save(os.path.join(args.out, "linfik.npy"), v)
    prov = Provenance.of(logra, model)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump({"config": cfg, "n_pool": int(len(v)), "logra": logra.config(),
                   "provenance": {"config_hash": prov.config_hash, "model_fingerprint": prov.fingerprint},
                   "pool_sha256": file_sha256(os.path.join(args.out, "pool.jsonl")),
                   "values_sha256": file_sha256(os.path.join(args.out, "linfik.npy"))}, f, indent=1, default=str)
    print(f"wrote {len(v)} LinFiK scores to {args.out}")
    return 0
