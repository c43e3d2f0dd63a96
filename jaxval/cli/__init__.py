"""The ``jaxval`` command line: one argparse tree (``app``), one config loader (``config``)."""

from jaxval.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
