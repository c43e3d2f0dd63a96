"""``jaxval alinfik train | score | select | price``: the ALinFiK student as a command.

The application around :mod:`jaxval.valuation.alinfik`: reading ``pool.jsonl`` / ``linfik.npy`` (what
``jaxval linfik`` writes), the student config (:data:`STUDENT`, ``configs/linfik_student.yaml``), and
writing the outputs.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from jaxval.cli.config import ConfigError, Field, Schema, load_config

__all__ = ["STUDENT", "add_parser", "run"]

STUDENT = Schema({
    "fraction": Field((float,), 0.2, help="share of the pool labelled with LinFiK to train the student"),
    "embed": Field((str, None), None, help="minilm | minilm:max_length=N | hashed[:dim=D,ngrams=3-4-5]"),
    "seed": Field((int,)),
    "hidden": Field((list,)), "val_fraction": Field((float,)), "lr": Field((float,)),
    "weight_decay": Field((float,)), "dropout": Field((float,)), "batch_size": Field((int,)),
    "max_epochs": Field((int,)), "patience": Field((int,)), "rank_weight": Field((float,)), "tau": Field((float,)),
    "huber_delta": Field((float,)), "progress": Field((bool,)),
    "ridge": Field((float,), help="a closed-form ridge head with this penalty instead of the MLP"),
    "target": Field((str,), help="value | rank: fit the LinFiK values or the normal scores of their ranks"),
    "n_finetune": Field((int, None), None, help="fine-tune the top N encoder blocks with the head "
                                                "(jaxval.alinfik.fit_encoder_student); absent: frozen-embedding head"),
    "encoder": Field((str, None), None, help="encoder of the fine-tuned student (default minilm:max_length=128)"),
    "head_lr": Field((float,), help="head learning rate of the fine-tuned student"),
})
"""The config of ``jaxval alinfik train``: ``fraction``, ``embed``, and :func:`jaxval.alinfik.fit_student`'s
keyword arguments (absent keys take fit_student's defaults); with ``n_finetune`` (and optionally ``encoder``,
``head_lr``) the fine-tuned student of :func:`jaxval.alinfik.fit_encoder_student` instead."""


def _read_jsonl(path: str, field: str | None = None) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not JSON lines (one JSON object per line): {e}") from e
    if field is not None:
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict) or field not in r), None)
        if bad is not None:
            raise ConfigError(f"{path}: line {bad + 1} has no '{field}' field")
    return rows


def _values_provenance(pool: str, values: str) -> dict | None:
    """The provenance ``jaxval linfik`` recorded beside ``values`` (meta.json): the pool and the values must be
    the files of that run (their sha256), else :class:`jaxval.ProvenanceError`. None without a meta.json."""
    from jaxval._src.errors import ProvenanceError
    from jaxval.cli.linfik import file_sha256

    meta_path = os.path.join(os.path.dirname(os.path.abspath(values)), "meta.json")
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise ConfigError(f"{meta_path} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "values_sha256" not in meta:
        return None
    if meta["values_sha256"] != file_sha256(values):
        raise ProvenanceError(f"{values} is not the linfik.npy its meta.json ({meta_path}) describes (sha256 "
                              "differs): give the files of one `jaxval linfik` run")
    if meta.get("pool_sha256") != file_sha256(pool):
        raise ProvenanceError(f"{pool} is not the pool.jsonl that {values} was computed for (its sha256 differs "
                              f"from {meta_path}): give the pool.jsonl and linfik.npy of one `jaxval linfik` run")
    return {**(meta.get("provenance") or {}), "values_sha256": meta["values_sha256"],
            "pool_sha256": meta["pool_sha256"]}


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``jaxval alinfik train|score|select|price`` on the argparse sub-parser collection ``sub``."""
    from jaxval.valuation.alinfik import PRICE_RULES

    p = sub.add_parser("alinfik", help="ALinFiK student: train / score / select / price")
    a = p.add_subparsers(dest="action", required=True)
    t = a.add_parser("train", help="distil LinFiK (from `jaxval linfik`) into a student")
    t.add_argument("--pool", required=True, help="pool.jsonl with a 'text' field per line")
    t.add_argument("--values", required=True, help="linfik.npy, one value per pool line")
    t.add_argument("--out", required=True, help="student checkpoint folder")
    t.add_argument("--config", default=None, help="YAML with fit_student keyword arguments (+ 'fraction', 'embed')")
    t.add_argument("--fraction", type=float, default=None, help="fraction of the pool to label (default 0.2)")
    t.add_argument("--embed", default=None, help="minilm | hashed[:dim=..] (default: minilm if installed)")
    t.add_argument("--seed", type=int, default=None, help="seed of the labelled sample and the student (default 0)")
    s = a.add_parser("score", help="predicted LinFiK of texts")
    s.add_argument("--student", required=True)
    s.add_argument("--texts", required=True, help="jsonl with a 'text' field per line")
    s.add_argument("--out", required=True, help=".npy of scores")
    se = a.add_parser("select", help="top-budget sample indices")
    se.add_argument("--scores", required=True)
    se.add_argument("--budget", type=int, required=True)
    se.add_argument("--out", required=True, help=".json list of indices")
    pr = a.add_parser("price", help="prices and per-provider statements")
    pr.add_argument("--scores", required=True)
    pr.add_argument("--total", type=float, required=True)
    pr.add_argument("--providers", default=None,
                    help="jsonl with a 'provider' field per line (default: one provider per line id)")
    pr.add_argument("--rule", default="positive", choices=PRICE_RULES)
    pr.add_argument("--out", required=True, help="statement .json (a .md beside it)")
    p.set_defaults(func=run)
    return p


def _train(args) -> None:
    from jaxval.valuation.alinfik import fit_student, make_embed_fn

    cfg = load_config(args.config, STUDENT) if args.config else STUDENT.validate({}, "alinfik train")
    frac = args.fraction if args.fraction is not None else cfg.pop("fraction")
    cfg.pop("fraction", None)
    embed = args.embed or cfg.pop("embed")
    cfg.pop("embed", None)
    seed = args.seed if args.seed is not None else cfg.pop("seed", 0)
    cfg.pop("seed", None)
    if not 0 < frac <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {frac}")
    rows = _read_jsonl(args.pool, "text")
    try:
        v = np.load(args.values)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{args.values} is not a .npy array of LinFiK values ({e})") from e
    provenance = _values_provenance(args.pool, args.values)
    if len(rows) != len(v):
        raise ConfigError(f"{args.pool} has {len(rows)} lines but {args.values} has {len(v)} values: give the "
                          "pool.jsonl and linfik.npy of one `jaxval linfik` run")
    idx = np.sort(np.random.default_rng(seed).permutation(len(v))[: max(8, int(round(frac * len(v))))])
    n_ft, encoder = cfg.pop("n_finetune", None), cfg.pop("encoder", None)
    labelled = [rows[i]["text"] for i in idx]
    if n_ft:
        from jaxval.valuation.student import DEFAULT_ENCODER, fit_encoder_student

        if embed:
            raise ConfigError("embed is the frozen student's feature extractor; the fine-tuned student "
                              "(n_finetune) takes encoder: minilm[:max_length=N]")
        if "ridge" in cfg or "target" in cfg:
            raise ConfigError("ridge / target belong to the frozen-embedding student: drop n_finetune, or them")
        st = fit_encoder_student(labelled, v[idx], encoder or DEFAULT_ENCODER, n_finetune=n_ft, seed=seed, **cfg)
    else:
        if encoder or "head_lr" in cfg:
            raise ConfigError("encoder / head_lr belong to the fine-tuned student: set n_finetune too")
        st = fit_student(labelled, v[idx], make_embed_fn(embed) if embed else None, seed=seed, **cfg)
    st.meta["labelled_indices"] = idx.tolist()
    if provenance is not None:
        st.meta["provenance"] = provenance
    st.save(args.out, overwrite=True)
    print(f"student saved to {args.out}: val spearman {st.meta['val_spearman']:.3f} (epoch {st.meta['best_epoch']})")


def run(args) -> int:
    """Run ``jaxval alinfik <action>`` for parsed ``args``."""
    from jaxval.valuation.alinfik import Student, format_statement, select, statement

    if args.action == "train":
        _train(args)
    elif args.action == "score":
        st = Student.load(args.student)
        pred = st.score([r["text"] for r in _read_jsonl(args.texts, "text")])
        np.save(args.out, pred)
        print(f"scored {len(pred)} texts -> {args.out}")
    elif args.action == "select":
        scores = np.load(args.scores)
        if args.budget < 0 or args.budget > len(scores):
            raise ConfigError(f"--budget must be between 0 and the {len(scores)} scored samples of {args.scores}, "
                              f"got {args.budget}")
        idx = select(scores, args.budget)
        with open(args.out, "w") as f:
            json.dump(idx.tolist(), f)
        print(f"selected {len(idx)} -> {args.out}")
    elif args.action == "price":
        pred = np.load(args.scores)
        provs = ([str(r.get("provider", i)) for i, r in enumerate(_read_jsonl(args.providers))]
                 if args.providers else [str(i) for i in range(len(pred))])
        st = statement(pred, args.total, provs, rule=args.rule)
        with open(args.out, "w") as f:
            json.dump(st, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(format_statement(st))
        print(f"priced {len(pred)} samples for {len(st['providers'])} providers -> {args.out}")
    else:
        raise ConfigError(f"unknown alinfik action {args.action!r}")
    return 0
