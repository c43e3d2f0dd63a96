"""A small on-disk cache of converted model weights (orbax checkpoints), used by the weight loaders.

An entry is a directory ``<cache root>/<key>/`` holding a ``jaxval._src.checkpoint`` checkpoint of a
flat ``{name: numpy array}`` dict and its ``meta.json`` (anything JSON-able the loader needs:
config, tokenizer, ...). Entries are written to a temporary directory and renamed into place, so a failed
or concurrent write never leaves a half-written entry behind; a damaged entry is ignored (and rebuilt by
the caller).

The cache root is ``cache_dir`` when given, else ``$JAXVAL_CACHE``, else ``~/.cache/jaxval``.
Reads and writes go through ``jaxval._src.checkpoint`` (the one module that imports orbax).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

ENV_VAR = "JAXVAL_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root directory (not created)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return Path.home() / ".cache" / "jaxval"


def _key(name: str) -> str:
    # orbax tree keys must not contain "/" (it would be read as nesting)
    return name.replace("/", ".")


def save_entry(directory: str | os.PathLike, weights: dict[str, np.ndarray], meta: dict[str, Any]) -> bool:
    """Write ``weights`` (flat name -> array; names may contain "/") and ``meta`` as a cache entry
    (``jaxval._src.checkpoint``: written aside and renamed into place). Returns False (and leaves nothing
    behind) when the directory cannot be written."""
    from jaxval._src import checkpoint

    directory = Path(directory)
    if directory.is_dir():
        return True
    tree = {_key(k): np.asarray(v) for k, v in weights.items()}
    if len(tree) != len(weights):
        raise ValueError("weight names collide after replacing '/' by '.'")
    try:
        checkpoint.save(str(directory), tree, {"names": list(weights), "meta": meta})
    except FileExistsError:  # a concurrent writer won
        return True
    except OSError:
        return False
    return True


def load_entry(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """``(weights, meta)`` of a cache entry, or None when it is missing or unreadable."""
    from jaxval._src import checkpoint

    try:
        tree, info = checkpoint.load(str(directory))
        weights = {n: np.asarray(tree[_key(n)]) for n in info["names"]}
        return weights, info["meta"]
    except Exception:  # noqa: BLE001 - a missing or damaged entry is rebuilt by the caller
        return None
