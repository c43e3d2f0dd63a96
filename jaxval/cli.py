"""The ``jaxval`` command.

    jaxval demo [--out out/demo]                 influence of training digits on test digits
    jaxval log --config configs/digits_mlp.yaml  log a dataset's LoGra gradients into a store (resumable)
    jaxval info STORE [--json]                   a store's manifest, rows done / total, bytes on disk
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _demo(args):
    from jaxval.demo import run

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
    from jaxval import config as C
    from jaxval.pipeline import log_gradients

    cfg = C.load_config(args.config)
    if args.output:
        cfg["log"]["output"] = args.output
    lo = cfg["log"]
    t0 = time.perf_counter()
    model, _loss_fn, data, ids, logra = C.prepare(cfg, progress=not args.no_progress)
    t1 = time.perf_counter()
    n = len(ids)
    print(f"{cfg.get('name', args.config)}: {n} examples, LoGra {len(logra.layers)} layers, D = {logra.dim}, "
          f"dtype {lo['dtype']} -> {lo['output']}", flush=True)
    store = log_gradients(logra, model, data, lo["output"], batch_size=int(lo["batch_size"]), dtype=lo["dtype"],
                          ids=ids, chunk_rows=lo.get("chunk_rows"), overwrite=args.overwrite,
                          process_index=args.process_index, process_count=args.process_count,
                          progress=not args.no_progress, extra_config=C.store_extra(cfg))
    t2 = time.perf_counter()
    info = store.info()
    print(f"rows done {info['rows_done']}/{info['rows_total']}, {_human(info['bytes_on_disk'])} on disk; "
          f"setup {t1 - t0:.1f} s, logging {t2 - t1:.1f} s", flush=True)
    return 0


def _info(args):
    from jaxval.store import GradientStore

    store = GradientStore.open(args.store)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxval", description="Data valuation for large models in JAX.")
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
                        "a GradientStore. Rerun the same command to resume after an interruption.")
    lg.add_argument("--config", required=True, help="YAML config (see configs/digits_mlp.yaml)")
    lg.add_argument("--output", help="store path (overrides log.output)")
    lg.add_argument("--overwrite", action="store_true", help="replace an existing store with another config")
    lg.add_argument("--process-index", type=int, default=None, help="this process's index (default: JAX's)")
    lg.add_argument("--process-count", type=int, default=None, help="number of processes (default: JAX's)")
    lg.add_argument("--no-progress", action="store_true", help="no progress bars")
    lg.set_defaults(func=_log)

    i = sub.add_parser("info", help="describe a gradient store: manifest, rows done / total, bytes on disk")
    i.add_argument("store", help="store path (folder or gs:// URL)")
    i.add_argument("--json", action="store_true", help="print the info as JSON")
    i.set_defaults(func=_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jaxval.config import ConfigError
    from jaxval.store import StoreError

    try:
        return int(args.func(args) or 0)
    except (StoreError, ConfigError, FileNotFoundError) as e:
        print(f"jaxval {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
