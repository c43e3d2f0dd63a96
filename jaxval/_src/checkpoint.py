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


def _complete(folder: str) -> bool:
    """A folder written whole by :func:`save` (meta.json is written last, atomically) or :func:`replace_dir`
    (its ``marker`` file)."""
    return os.path.isfile(os.path.join(folder, "meta.json"))


def recover(path: str, complete=_complete) -> None:
    """Finish or clean what a killed :func:`save` / :func:`replace_dir` left beside ``path``:

    * ``path`` missing, ``path.tmp`` complete: the new version was written whole, the swap was cut: it is
      moved into place (``path.old``, the previous version, is then removed);
    * ``path`` missing, only ``path.old`` complete: the previous version is moved back;
    * ``path`` present: leftovers ``path.tmp`` / ``path.old`` are removed (``path`` is the good one).
    """
    path = os.path.abspath(path)
    tmp, old = path + ".tmp", path + ".old"
    if not os.path.exists(path):
        if os.path.isdir(tmp) and complete(tmp):
            os.replace(tmp, path)
        elif os.path.isdir(old) and complete(old):
            os.replace(old, path)
    if os.path.exists(path):
        for p in (tmp, old):
            if os.path.lexists(p):
                shutil.rmtree(p, ignore_errors=True)


def replace_dir(tmp: str, path: str) -> None:
    """Put the complete folder ``tmp`` at ``path``: the old ``path`` (if any) is renamed aside first and
    removed only after the new one is in place, so at every instant a complete version exists (at
    ``path``, or beside it for :func:`recover`)."""
    path = os.path.abspath(path)
    old = path + ".old"
    if os.path.lexists(old):
        shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    if os.path.lexists(old):
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(d: str) -> None:
    """Make renames inside folder ``d`` durable (best effort: some file systems refuse to fsync a folder)."""
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_json_atomic(file: str, obj) -> None:
    part = file + ".part"
    with open(part, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, file)


def save(path: str, arrays: dict[str, Any], meta: dict | None = None, overwrite: bool = False) -> str:
    """Write ``arrays`` (a pytree of arrays) and ``meta`` (JSON-able) to the folder ``path``, whole or not at
    all: into ``path + '.tmp'`` (meta.json last, atomically: its presence marks the folder complete), then
    one rename, the old version renamed aside and removed only after (see :func:`replace_dir`). What a
    killed save left is finished or cleaned by the next save or load (:func:`recover`)."""
    path = os.path.abspath(path)
    recover(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"checkpoint {path} exists; pass overwrite=True to replace it")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ckpt = _checkpointer()
    ckpt.save(os.path.join(tmp, "arrays"), {k: np.asarray(v) for k, v in arrays.items()} if isinstance(arrays, dict) else arrays)
    ckpt.wait_until_finished()
    write_json_atomic(os.path.join(tmp, "meta.json"), meta or {})
    replace_dir(tmp, path)
    return path


def load(path: str) -> tuple[dict[str, Any], dict]:
    """``(arrays, meta)`` as written by ``save``; :class:`jaxval.CheckpointError` for a damaged checkpoint
    (meta.json not JSON, arrays truncated or unreadable), :class:`jaxval.CheckpointNotFoundError` when
    there is none."""
    from jaxval._src.errors import CheckpointError, CheckpointNotFoundError

    path = os.path.abspath(path)
    recover(path)
    if not os.path.exists(os.path.join(path, "meta.json")):
        raise CheckpointNotFoundError(f"{path} is not a jaxval checkpoint (no meta.json)")
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: meta.json is not valid JSON ({e}); write it again "
                              "(e.g. rerun jaxval fit)") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} is damaged: meta.json holds a {type(meta).__name__}, not a mapping")
    if not os.path.isdir(os.path.join(path, "arrays")):
        raise CheckpointError(f"checkpoint {path} is damaged: its arrays folder is missing; write it again")
    try:
        arrays = _checkpointer().restore(os.path.join(path, "arrays"))
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many types (OUT_OF_RANGE, DATA_LOSS, ...)
        first = " ".join(str(e).split())[:200]
        raise CheckpointError(f"checkpoint {path} is damaged: its arrays cannot be read ({type(e).__name__}: "
                              f"{first}); write it again (e.g. rerun jaxval fit)") from e
    return arrays, meta
