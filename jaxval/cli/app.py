"""The ``jaxval`` command.

    jaxval demo [--out out/demo]                 influence of training digits on test digits
    jaxval log --config configs/digits_mlp.yaml  log a dataset's LoGra gradients into a store (resumable)
    jaxval info STORE [--json]                   a store's manifest, rows done / total, bytes on disk
    jaxval fit --config configs/digits_mlp.yaml  fit a preconditioner; checkpoint beside the store
    jaxval score --store S --queries Q [--precond P] [--mode cosine] [--top-k 10] [--out DIR]
    jaxval attribute --config C --prompt TEXT   a generation's top proponents / opponents, per token (HTML)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _demo(args):
    from jaxval.cli.demo import run

    run(out_dir=args.out, rank=args.rank, steps=args.steps, seed=args.seed)
    return 0


def _human(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0


def _log(args):
    import jax

    from jaxval.cli import config as C
    from jaxval._src.logging import log_gradients

    cfg = C.load_config(args.config)
    if args.output:
        cfg["log"]["output"] = args.output
    elif getattr(args, "split", None) and args.split != cfg["data"]["split"]:
        cfg["log"]["output"] = cfg["score"]["queries_output"]
    lo = cfg["log"]
    t0 = time.perf_counter()
    split = getattr(args, "split", None)
    model, _loss_fn, data, ids, logra = C.prepare(cfg, progress=not args.no_progress, split=split)
    extra = C.store_extra(cfg)
    if split:
        extra["data"] = dict(extra["data"], split=split)
    t1 = time.perf_counter()
    n = len(ids)
    print(f"{cfg.get('name', args.config)}: {n} examples, LoGra {len(logra.layers)} layers, D = {logra.dim}, "
          f"dtype {lo['dtype']} -> {lo['output']}", flush=True)
    stats = getattr(args, "stats", None) or lo.get("stats")
    if stats and split and split != cfg["data"]["split"]:
        stats = None  # statistics belong to the training split's store only
    if stats and (args.process_count or 1) > 1 and jax.process_count() == 1:
        raise C.ConfigError("log.stats with explicit --process-count needs jax.distributed (run under `jaxval "
                            "launch`): each process alone would save only its share of the statistics")
    out = log_gradients(logra, model, data, lo["output"], batch_size=int(lo["batch_size"]), dtype=lo["dtype"],
                        ids=ids, chunk_rows=lo.get("chunk_rows"), overwrite=args.overwrite,
                        process_index=args.process_index, process_count=args.process_count,
                        progress=not args.no_progress, extra_config=extra, stats=stats)
    store, st = out if stats else (out, None)
    from jaxval._src import parallel as distributed
    from jaxval._src.curvature import save_statistics

    # the log pass is the only pass through the model: keep the model it used, and its statistics
    distributed.write_once(model_path(lo["output"]), lambda p: C.save_model(model, p, meta={"model": cfg["model"]},
                                                                             overwrite=True))
    if st is not None:
        distributed.write_once(stats_path(lo["output"]), lambda p: save_statistics(p, st, store, overwrite=True))
    t2 = time.perf_counter()
    info = store.info()
    print(f"rows done {info['rows_done']}/{info['rows_total']}, {_human(info['bytes_on_disk'])} on disk; "
          f"setup {t1 - t0:.1f} s, logging {t2 - t1:.1f} s" + (f"; {stats} statistics saved" if st is not None else ""),
          flush=True)
    return 0


def model_path(store_path: str) -> str:
    """Where ``jaxval log`` keeps the model it logged with (beside the store)."""
    return f"{str(store_path).rstrip('/')}.model"


def stats_path(store_path: str, kind: str = "kfac") -> str:
    """Where ``jaxval log`` keeps the curvature statistics of its pass (beside the store)."""
    return f"{str(store_path).rstrip('/')}.{kind}.stats"


def _info(args):
    from jaxval._src.store import GradientStore

    store = GradientStore.open(args.store)
    if getattr(args, "verify", False):
        store.verify()     # StoreCorruptError naming the rows of a missing / short / corrupted chunk
    info = store.info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    m, cfg = info["manifest"], info["manifest"].get("config", {})
    pct = 100.0 * info["rows_done"] / max(1, info["rows_total"])
    lines = [
        f"store         {info['path']}",
        f"format        {m['format']} v{m['format_version']}, created {m.get('created_utc', '?')}",
        f"shape         {info['num_rows']} rows x {info['dim']} dims, {info['dtype']}, "
        f"chunks of {m['chunk_rows']} rows",
        f"rows done     {info['rows_done']} / {info['rows_total']} ({pct:.1f}%)"
        + ("" if info["complete"] else "  [incomplete: rerun the same `jaxval log` to resume]"),
        f"bytes on disk {info['bytes_on_disk']} ({_human(info['bytes_on_disk'])})",
        f"ids           {m['ids_kind']}",
        f"config hash   {m['config_hash']}",
    ]
    lg = cfg.get("logra") if isinstance(cfg, dict) else None
    if isinstance(lg, dict):
        layers = lg.get("layers", [])
        lines.append(f"logra         init {lg.get('init')}, seed {lg.get('seed')}, {len(layers)} layers, "
                     f"D = {lg.get('dim')}, projections sha256 {str(lg.get('projection_sha256'))[:16]}...")
        for l in layers:
            lines.append(f"  {l['name']:<28} {l['kind']:<14} ({l['n_in']} x {l['n_out']}) -> "
                         f"({l['k_in']} x {l['k_out']})")
    if isinstance(cfg, dict) and cfg.get("model_fingerprint"):
        lines.append(f"model         fingerprint {cfg['model_fingerprint']}")
    extra = cfg.get("extra") if isinstance(cfg, dict) else None
    if extra:
        lines.append("extra         " + json.dumps(extra, sort_keys=True))
    print("\n".join(lines))
    return 0


def _classification_sampler(model, batch, keys):
    import jax

    logits = model(batch["x"])
    return dict(batch, y=jax.vmap(jax.random.categorical)(keys, logits).astype(batch["y"].dtype))


def _fit(args):
    """Fit from the store and its logged statistics when it can (no pass through the model); else one
    model pass with the model ``jaxval log`` saved (trained from the config only when there is none)."""
    from jaxval.cli import config as C
    from jaxval._src import parallel as distributed
    from jaxval._src.curvature import fit_from_store, fit_preconditioner
    from jaxval._src.logra import model_fingerprint
    from jaxval._src.store import GradientStore, StoreError

    from jaxval._src.curvature import check_damping

    cfg = C.load_config(args.config)
    ft = cfg["fit"]
    for key in ("kind", "damping", "relative_damping", "output", "fisher", "num_samples"):
        v = getattr(args, key, None)
        if v is not None:
            ft[key] = v
    if args.damping is not None:
        ft["relative_damping"] = None
    # cheap arguments before any store is read or model built (a bad damping used to surface after both
    # EK-FAC passes)
    try:
        check_damping(ft["kind"], ft["damping"] if ft["relative_damping"] is None else None, ft["relative_damping"])
    except C.ConfigError as e:
        raise C.ConfigError(f"{args.config}: fit: {e}") from None
    if int(ft["num_samples"]) < 1:
        raise C.ConfigError(f"{args.config}: fit.num_samples must be >= 1, got {ft['num_samples']}")
    if args.kind and not args.output:
        ft["output"] = f"{cfg['log']['output'].rstrip('/')}.{ft['kind']}.precond"
    t0 = time.perf_counter()
    out = cfg["log"]["output"]
    try:
        store = GradientStore.open(out)
    except StoreError:
        store = None
    if store is not None and json.dumps(store.config.get("extra"), sort_keys=True) != json.dumps(
            C.store_extra(cfg), sort_keys=True):
        raise StoreError(f"the store at {out} was logged with another model or data config than {args.config}: "
                         "rerun `jaxval log` (with --overwrite) first")
    kind, has_stats = ft["kind"], os.path.exists(stats_path(out))
    damp = dict(damping=ft["damping"], relative_damping=ft["relative_damping"])
    if (store is not None and store.is_complete() and ft["fisher"] == "empirical" and not args.model_pass
            and (kind in ("identity", "raw") or has_stats)):
        pc = fit_from_store(store, stats_path(out) if has_stats and kind != "raw" else None, kind=kind,
                            progress=not args.no_progress, **damp)
        source, n = f"the store{' and its statistics' if kind in ('kfac', 'ekfac') else ''}", len(store)
    else:
        if store is not None and os.path.exists(model_path(out)):
            cfg["model"] = dict(cfg["model"], checkpoint=model_path(out), save_trained=None)  # no retraining
        model, _loss_fn, data, ids, logra = C.prepare(cfg, progress=not args.no_progress)
        if store is not None and model_fingerprint(model) != store.config.get("model_fingerprint"):
            raise StoreError(f"the model of {args.config} is not the one the store at {out} was logged with "
                             "(fingerprints differ): rerun `jaxval log`")
        sample_fn = None
        if ft["fisher"] == "sampled":
            if cfg["model"].get("kind") not in ("mlp", "cnn"):
                raise C.ConfigError("fit.fisher: sampled is built in for classifiers (mlp, cnn) only; use the "
                                    "Python API with your own sample_fn for other models")
            sample_fn = _classification_sampler
        pc = fit_preconditioner(logra, model, data, kind=kind, batch_size=int(ft["batch_size"]), fisher=ft["fisher"],
                                sample_fn=sample_fn, num_samples=int(ft["num_samples"]), seed=int(cfg["seed"]),
                                progress=not args.no_progress, **damp)
        source, n = "a pass through the model", len(ids)
    distributed.write_once(ft["output"], lambda path: pc.save(path, overwrite=True))
    lam = sorted(pc.damping.values()) or [0.0]
    print(f"{kind} preconditioner over {n} examples from {source}, {len(pc.names)} layers, damping "
          f"{lam[0]:.3g}..{lam[-1]:.3g} -> {ft['output']} ({time.perf_counter() - t0:.1f} s)")
    return 0


SCORE_MARKER = ".jaxval-score.json"
"""The completion marker of a ``jaxval score`` folder (written last; its presence = the folder is whole)."""


def _score_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, SCORE_MARKER))


def _check_score_out(out: str) -> None:
    """Refuse an output folder that holds files jaxval score did not write (never mix or delete them)."""
    from jaxval._src.checkpoint import recover
    from jaxval._src.errors import OutputError

    recover(out, complete=_score_complete)
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"--out {out} exists and is not a folder: choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not _score_complete(out):
        raise OutputError(f"--out {out} holds files not written by `jaxval score` (no {SCORE_MARKER}): nothing "
                          "was changed; choose another --out or empty that folder")


def _score(args):
    import numpy as np

    from jaxval.cli import config as C
    from jaxval._src.checkpoint import replace_dir, write_json_atomic
    from jaxval._src.provenance import ProjectedGrads, of_store
    from jaxval._src.scoring import influence, top_k
    from jaxval._src.preconditioner import Preconditioner
    from jaxval.cli.report import render_examples, write_report
    from jaxval._src.errors import IncompleteStoreError, ProvenanceError
    from jaxval._src.store import GradientStore, StoreError

    _check_score_out(args.out)     # cheap checks first: nothing is read or computed for a refused folder
    train = GradientStore.open(args.store)
    queries = GradientStore.open(args.queries)
    for s in (train, queries):
        if not s.is_complete():
            s.check_chunks()
            raise IncompleteStoreError(f"store {s.path} is incomplete ({s.num_done()}/{len(s)} rows): finish "
                                       "`jaxval log` first (rerun the same command to resume)")
    if train.dim != queries.dim:
        raise ProvenanceError(f"the query store has D = {queries.dim}, the training store D = {train.dim}: they "
                              "were logged with different LoGra configurations")
    qprov = of_store(queries)
    if qprov is None or of_store(train) is None:
        raise ProvenanceError("a store records no LoGra configuration / model fingerprint (not written by "
                              "`jaxval log`): score it with the Python API (jaxval.influence(..., unchecked=True))")
    pc = Preconditioner.load(args.precond) if args.precond else None
    q = ProjectedGrads(queries.read(0, len(queries)), qprov)
    k = min(args.top_k, len(train))
    t0 = time.perf_counter()
    import jax

    from jaxval._src import parallel as distributed

    # under several processes the engine splits the rows (whole chunks) and gathers on every process;
    # every provenance check (queries, rows, preconditioner) happens inside influence / top_k
    s = None
    if len(q) * len(train) <= args.max_matrix:
        s = influence(q, train, precond=pc, mode=args.mode, progress=not args.no_progress)
        order = np.argsort(-s, axis=1, kind="stable")
        top_i, bot_i = order[:, :k], order[:, ::-1][:, :k]
        top_v, bot_v = np.take_along_axis(s, top_i, 1), np.take_along_axis(s, bot_i, 1)
    else:
        top_v, top_i = top_k(q, train, k, precond=pc, mode=args.mode, largest=True, progress=not args.no_progress)
        bot_v, bot_i = top_k(q, train, k, precond=pc, mode=args.mode, largest=False, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    if jax.process_index() != 0:
        distributed.barrier("jaxval-score-report")
        return 0
    # the folder is written aside and put in place with one rename: never a mix of old and new files
    out = os.path.abspath(args.out)
    tmp = out + ".tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if s is not None:
            np.save(os.path.join(tmp, "scores.npy"), s)
        t_ids, q_ids = np.asarray(train.ids), np.asarray(queries.ids)
        with open(os.path.join(tmp, "top_k.json"), "w") as f:
            json.dump({"mode": args.mode, "precond": args.precond, "queries": [str(i) for i in q_ids],
                       "proponents": [[str(t_ids[i]) for i in row] for row in np.asarray(top_i)],
                       "proponent_scores": np.asarray(top_v).tolist(),
                       "opponents": [[str(t_ids[i]) for i in row] for row in np.asarray(bot_i)],
                       "opponent_scores": np.asarray(bot_v).tolist()}, f)
        renders = []
        for st in (queries, train):
            dspec = (st.config.get("extra") or {}).get("data")
            mspec = (st.config.get("extra") or {}).get("model")
            try:
                from jaxval.models import factory

                data, ids, _ = C.build_data(dspec, for_model=None, model_cfg=mspec) if dspec else (None, None, None)
                tok = (factory.tokenizer(mspec) if factory.is_named_model(mspec)
                       else C.build_tokenizer(dspec) if dspec else None)
            except Exception:  # noqa: BLE001 - the report then shows ids only
                data, ids, tok = None, None, None
            row_of = {str(v): r for r, v in enumerate(ids)} if ids is not None else {}
            renders.append((render_examples(data, tok), (lambda i, m=row_of: m.get(str(i)))))
        write_report(tmp, q_ids, t_ids, np.asarray(top_v), np.asarray(top_i), np.asarray(bot_v),
                     np.asarray(bot_i), mode=args.mode, query_render=renders[0][0], query_row_of_id=renders[0][1],
                     train_render=renders[1][0], train_row_of_id=renders[1][1])
        write_json_atomic(os.path.join(tmp, SCORE_MARKER), {
            "format": "jaxval.scores", "store": train.path, "queries": queries.path, "precond": args.precond,
            "mode": args.mode, "top_k": k, "store_config_hash": train.config_hash,
            "queries_config_hash": queries.config_hash, "model_fingerprint": qprov.fingerprint,
            "logra_config_hash": qprov.config_hash, "full_matrix": s is not None})
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # the old folder (if any) is untouched
        raise
    path = os.path.join(args.out, "report.md")
    print(f"scored {len(q)} queries x {len(train)} training rows ({args.mode}) in {elapsed:.2f} s -> {path}")
    if jax.process_count() > 1:
        distributed.barrier("jaxval-score-report")
    return 0


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxval", description="Data valuation for large models in JAX.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="influence of training digits on test digits (MLP, LoGra)")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--rank", type=int, default=64)
    d.add_argument("--steps", type=int, default=500)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)

    lg = sub.add_parser("log", help="log a dataset's LoGra gradients into a gradient store (resumable)",
                        description="Build the model, data and LoGra of a YAML config (training the model "
                        "first when the config gives no checkpoint) and log the projected gradients into "
                        "a GradientStore; the model is saved beside it (STORE.model), and with --stats kfac "
                        "the K-FAC statistics of the same pass (STORE.kfac.stats), so that `jaxval fit` "
                        "needs no pass through the model. Rerun the same command to resume.")
    lg.add_argument("--config", required=True, help="YAML config (see configs/digits_mlp.yaml)")
    lg.add_argument("--output", help="store path (overrides log.output)")
    lg.add_argument("--overwrite", action="store_true", help="replace an existing store with another config")
    lg.add_argument("--process-index", type=int, default=None, help="this process's index (default: JAX's)")
    lg.add_argument("--process-count", type=int, default=None, help="number of processes (default: JAX's)")
    lg.add_argument("--no-progress", action="store_true", help="no progress bars")
    lg.add_argument("--stats", choices=["kfac"], default=None,
                    help="also save the K-FAC statistics of this pass beside the store (config: log.stats), so "
                         "that `jaxval fit` needs no pass through the model")
    lg.add_argument("--split", default=None, choices=["train", "test", "all"],
                    help="log this split instead of data.split (the model still trains on data.split); "
                         "default output: score.queries_output")
    lg.set_defaults(func=_log)

    i = sub.add_parser("info", help="describe a gradient store: manifest, rows done / total, bytes on disk")
    i.add_argument("store", help="store path (folder or gs:// URL)")
    i.add_argument("--json", action="store_true", help="print the info as JSON")
    i.add_argument("--verify", action="store_true",
                   help="read every chunk and compare its size and crc32 with the record taken when it was logged")
    i.set_defaults(func=_info)

    f = sub.add_parser("fit", help="fit a preconditioner (identity | raw | kfac | ekfac) from a config")
    f.add_argument("--config", required=True)
    f.add_argument("--kind", choices=["identity", "raw", "kfac", "ekfac"], default=None)
    f.add_argument("--damping", type=_positive_float, default=None, help="absolute λ > 0 (default: relative 0.1)")
    f.add_argument("--relative-damping", type=_positive_float, default=None)
    f.add_argument("--fisher", choices=["empirical", "sampled"], default=None)
    f.add_argument("--model-pass", action="store_true",
                   help="fit from a pass through the model even when the store and its statistics suffice")
    f.add_argument("--num-samples", type=_positive_int, default=None)
    f.add_argument("--output", default=None, help="checkpoint folder (default: beside the store)")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=_fit)

    s = sub.add_parser("score", help="score query gradients against a training store; writes a report")
    s.add_argument("--store", required=True, help="training gradient store")
    s.add_argument("--queries", required=True, help="query gradient store (e.g. `jaxval log --split test`)")
    s.add_argument("--precond", default=None, help="preconditioner checkpoint from `jaxval fit`")
    s.add_argument("--mode", default="cosine", choices=["dot", "cosine", "relative", "l2"])
    s.add_argument("--top-k", type=_positive_int, default=10, help="proponents / opponents kept per query (>= 1)")
    s.add_argument("--out", default="out/scores")
    s.add_argument("--max-matrix", type=_positive_int, default=50_000_000,
                   help="write the full [Q, N] matrix when Q·N is at most this; else stream top-k only")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_score)

    from jaxval.cli import alinfik, attribute, launch, linfik

    attribute.add_parser(sub)
    linfik.add_parser(sub)
    alinfik.add_parser(sub)
    launch.add_parser(sub)
    return p


def main(argv=None) -> int:
    """Run the ``jaxval`` command; returns the exit status. A jaxval error (or an I/O or value error) is one
    line on stderr with status 2; ``--debug`` re-raises it (the traceback)."""
    from jaxval._src.errors import JaxvalError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # argparse: its usage line and message are already on stderr
        return int(e.code or 0)
    if args.command in ("log", "fit", "score"):
        from jaxval._src import parallel as distributed

        distributed.initialize()  # no-op for one process; jax.distributed under `jaxval launch` or on a pod
    try:
        return int(args.func(args) or 0)
    except (JaxvalError, OSError, ValueError) as e:  # ConfigError, StoreError, ...: what was wrong, what to do
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, JaxvalError):
            msg = f"{type(e).__name__}: {msg}"
        print(f"jaxval {args.command}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
