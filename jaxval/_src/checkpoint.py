"""Orbax checkpoints of pytrees of arrays plus a JSON sidecar, behind one small module.

Everything jaxval checkpoints (preconditioners, trained models, students) goes through ``save`` and
``load``, so a move to another orbax API is a change to this file only.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np


def _checkpointer():
    """This process alone writes or reads (under jax.distributed the other processes are not involved: callers
    write from process 0 only, see ``jaxval.distributed.write_once``). orbax is imported here, not at module
    import: it takes ~130 ms and ``import jaxval`` reaches this module through ``jaxval.evaluate``."""
    import jax
    import orbax.checkpoint as ocp

    me = jax.process_index()
    opts = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                              barrier_sync_key_prefix=f"jaxval-p{me}")
    return ocp.StandardCheckpointer(multiprocessing_options=opts)


def save(path: str, arrays: dict[str, Any], meta: dict | None = None, overwrite: bool = False) -> str:
    """Write ``arrays`` (a pytree of arrays) and ``meta`` (JSON-able) to the folder ``path``.

    Writes into ``path + '.tmp'`` first and renames, so a failed save never leaves a half checkpoint
    where a good one was."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"checkpoint {path} exists; pass overwrite=True to replace it")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ckpt = _checkpointer()
    ckpt.save(os.path.join(tmp, "arrays"), {k: np.asarray(v) for k, v in arrays.items()} if isinstance(arrays, dict) else arrays)
    ckpt.wait_until_finished()
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta or {}, f, indent=1, sort_keys=True)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load(path: str) -> tuple[dict[str, Any], dict]:
    """``(arrays, meta)`` as written by ``save``."""
    path = os.path.abspath(path)
    if not os.path.exists(os.path.join(path, "meta.json")):
        raise FileNotFoundError(f"{path} is not a jaxval checkpoint (no meta.json)")
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    arrays = _checkpointer().restore(os.path.join(path, "arrays"))
    return arrays, meta
