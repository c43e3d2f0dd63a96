"""``jaxval launch -n N -- CMD ...`` (also ``python -m jaxval.distributed -n N -- CMD ...``): run ``CMD`` as
``N`` cooperating local processes with :func:`jaxval.distributed.launch`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["add_parser", "run", "main"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``jaxval launch -n N [--port P] [--timeout S] [--local-devices K] -- CMD ...`` on ``sub``."""
    p = sub.add_parser("launch", help="run a command as N cooperating processes on 127.0.0.1",
                       description="Start N processes of CMD on 127.0.0.1 with JAXVAL_COORDINATOR, "
                                   "JAXVAL_NUM_PROCESSES and JAXVAL_PROCESS_ID set; prefix their output "
                                   "with [pI]; stop all of them on the first failure or on timeout.")
    p.add_argument("-n", "--num-processes", type=int, required=True)
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before all processes are stopped")
    p.add_argument("--local-devices", type=int, default=None,
                   help="CPU devices per process (sets --xla_force_host_platform_device_count)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Exit code 0 if every process succeeded, else the code of the process whose failure stopped the others
    (not that of a process stopped because of it), or on a timeout the first non-zero code (128 + signal for a
    killed one)."""
    from jaxval._src.parallel import launch

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise SystemExit("jaxval launch: give the command after --, e.g. jaxval launch -n 2 -- jaxval log ...")
    codes = launch(args.num_processes, cmd, port=args.port, timeout=args.timeout, local_devices=args.local_devices)
    c = codes[codes.failed] if codes.failed is not None else next((c for c in codes if c != 0), 0)
    return c if c >= 0 else 128 - c


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxval.distributed -n 2 [--local-devices 2] -- CMD ...`` (the launcher alone)."""
    parser = argparse.ArgumentParser(prog="python -m jaxval.distributed")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["launch", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
