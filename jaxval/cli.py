"""The ``jaxval`` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args):
    from jaxval.demo import run

    run(out_dir=args.out, rank=args.rank, steps=args.steps, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxval", description="Data valuation for large models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="influence of training digits on test digits (MLP, LoGra)")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--rank", type=int, default=64)
    d.add_argument("--steps", type=int, default=500)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
