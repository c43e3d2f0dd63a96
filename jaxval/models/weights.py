"""A small on-disk cache of converted model weights (orbax checkpoints), used by the weight loaders.

An entry is a directory ``<cache root>/<key>/`` holding an orbax ``StandardCheckpointer`` checkpoint of a
flat ``{name: numpy array}`` dict (``weights/``) and a ``meta.json`` (anything JSON-able the loader needs:
config, tokenizer, ...). Entries are written to a temporary directory and renamed into place, so a failed
or concurrent write never leaves a half-written entry behind; a damaged entry is ignored (and rebuilt by
the caller).

The cache root is ``cache_dir`` when given, else ``$JAXVAL_CACHE``, else ``~/.cache/jaxval``.
All orbax use sits in this module, so that a move to another checkpoint API is a one-file change.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
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
    """Write ``weights`` (flat name -> array; names may contain "/") and ``meta`` as a cache entry.
    Returns False (and leaves nothing behind) when the directory cannot be written."""
    import orbax.checkpoint as ocp

    directory = Path(directory)
    if directory.is_dir():
        return True
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        tree = {_key(k): np.asarray(v) for k, v in weights.items()}
        if len(tree) != len(weights):
            raise ValueError("weight names collide after replacing '/' by '.'")
        with ocp.StandardCheckpointer() as ck:
            ck.save((tmp / "weights").absolute(), tree)
        (tmp / "meta.json").write_text(json.dumps({"names": list(weights), "meta": meta}))
        try:
            os.replace(tmp, directory)
        except OSError:
            if not directory.is_dir():  # not a concurrent writer's win
                raise
        return True
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_entry(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """``(weights, meta)`` of a cache entry, or None when it is missing or unreadable."""
    import orbax.checkpoint as ocp

    directory = Path(directory)
    if not (directory / "meta.json").is_file():
        return None
    try:
        info = json.loads((directory / "meta.json").read_text())
        with ocp.StandardCheckpointer() as ck:
            tree = ck.restore((directory / "weights").absolute())
        weights = {n: np.asarray(tree[_key(n)]) for n in info["names"]}
        return weights, info["meta"]
    except Exception:  # noqa: BLE001 - a damaged entry is rebuilt by the caller
        return None
