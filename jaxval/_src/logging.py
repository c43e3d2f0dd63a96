"""Log a dataset's LoGra gradients into a :class:`~jaxval.store.GradientStore`: batching, overlap of
device compute with disk writes, progress, crash-safe resume, several processes.

    store = log_gradients(logra, model, data, "out/train.store", batch_size=64, dtype="bfloat16")

How it works
------------
* **Store and configuration.** The store's config is ``{"producer", "logra": logra.config(),
  "model_fingerprint", "dtype"}`` (plus ``extra_config`` when given, e.g. a description of the data).
  A call on an existing store with the same config, shape and ids *resumes* it; anything different
  raises :class:`~jaxval.store.StoreError` naming what differs and changes nothing on disk, unless
  ``overwrite=True``.
* **Blocks.** Work is split into the store's chunk-aligned row blocks (``chunk_rows`` rows, one file
  per block). Process ``p`` of ``P`` owns blocks ``p, p+P, p+2P, ...`` (block index = ``start //
  chunk_rows``, so the assignment does not depend on what is already done). Only the owned blocks that
  are not complete (``store.pending_blocks()``) are computed, so a rerun after a crash continues where
  the last run stopped. Batches of ``batch_size`` rows are cut inside a block; a short batch is padded
  (by repeating its last example, rows discarded) to the batch shape already compiled.
* **Overlap.** Each batch's gradient step is dispatched asynchronously; the previous batch's result is
  fetched to the host while the next one computes (already cast to the store dtype on the device). A
  complete block is handed to an asynchronous tensorstore write; a background thread waits for the
  write to commit and only then marks the block's rows done. At most ``max_inflight`` block writes are
  queued, so memory stays bounded (a few blocks) whatever the dataset size.
* **Crash safety.** A row is marked done only after its data are durable, and the done record is
  per chunk, so a SIGKILL at any point leaves a store whose done rows are exact; the rerun recomputes
  only the rest, with the same batch cuts, giving a store identical to an uninterrupted run. A store
  left half-created by a crash *during creation* (arrays but no manifest; it can hold no finished
  rows) is re-created when its shape and dtype match this call's; otherwise it is refused.
* **Several processes.** Process 0 creates (or validates) the store; the others open it (waiting up
  to ``open_timeout`` seconds for it to appear) and validate it against their own config. Under
  ``jax.distributed`` (the defaults ``jax.process_index() / jax.process_count()``) the processes also
  meet at a barrier after creation and at the end, so every process returns a complete store and
  ``overwrite=True`` is safe. With explicit ``process_index/process_count`` and no ``jax.distributed``,
  each process returns when *its* blocks are done (check ``store.is_complete()``); there overwriting is
  racy (another process may already have opened the old store), so ``overwrite=True`` is refused in
  processes other than 0: remove an old store before starting several processes.
* **Ids.** One unique id per row (integers or strings), default the row numbers; duplicate ids raise
  before anything is written (the store's policy). A resume must pass the same ids.
* **Statistics in the same pass** (``stats="kfac" | "raw"``): the compiled step (LoGra's one step, with
  ``jaxval.curvature.accumulate_batch`` as its reduction) also accumulates the curvature statistics; the
  call then returns ``(store, stats)`` with ``stats`` a typed state (``KFACState`` / ``RawState``):
  ``jaxval.fit_from_store(store, stats, kind="ekfac" | "kfac")`` fits from it and the stored rows with
  no further pass through the model (``jaxval.save_statistics`` keeps it beside the store), and
  ``jaxval.curvature.finalize(stats, logra, damping=...)`` turns it into a preconditioner directly. The statistics cover every row owned by this process,
  also on a resume (blocks already stored are recomputed for the statistics only, not written).
  Under ``jax.distributed`` they are summed over processes; with explicit process arguments each
  process gets its own share (sum them). Short batches are not padded in this mode (one process, or a
  mesh of this process's devices).
* **A mesh spanning several processes** (``mesh=`` with other processes' devices, e.g. parameters
  sharded with ``jaxval.distributed.shard_params``): a compiled step needs every process, so they run
  in lockstep (SPMD). Each process still owns its blocks and cuts its own pending batches as above
  (padded to one common local batch shape ``L``); they first agree on the largest step count and on
  ``L`` (one small all-gather). At each step the global batch of ``P·L`` rows is assembled with
  ``jax.make_array_from_process_local_data`` over the mesh's first axis, which must lay the rows out so
  that each process's devices hold exactly its own ``L`` rows (checked; ``make_mesh`` does); each
  process then copies back only its addressable rows of the output, i.e. its own examples, and writes
  its own blocks through the same asynchronous writer. A process with fewer batches repeats its last
  one (rows discarded). With ``stats=`` every row carries a weight (1 real, 0 padding) applied to its
  contributions inside the step, whose sums are reduced over the mesh: the returned statistics are the
  global sums, each real row counted once, and padding is used in this mode too.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx
from tqdm.auto import tqdm

from jaxval._src.batching import batch_size as _batch_size, is_array_tree, shard_batch, take
from jaxval._src import curvature
from jaxval._src.logra import LoGra, check_independent_examples, model_fingerprint
from jaxval._src.parallel import replicate, spans_processes, to_host, to_mesh
from jaxval._src.errors import NonFiniteError, StoreWriteError
from jaxval._src.store import (DTYPES, GradientStore, StoreError, StoreNotFoundError, config_diff, config_hash,
                               default_chunk_rows, location, normalize_dtype)

__all__ = ["log_gradients", "store_config", "STATS_KINDS"]

PRODUCER = "jaxval.log_gradients"
STATS_KINDS = ("raw", "kfac")
_JNP_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
_TARGET_CHUNK_BYTES = 8 << 20


# ----------------------------------------------------------------------------------------------- config

def store_config(logra: LoGra, model: nnx.Module | None = None, dtype: str = "bfloat16",
                 extra_config: dict | None = None, fingerprint: str | None = None) -> dict:
    """The config dict ``log_gradients`` stores in (and checks against) a store's manifest."""
    if fingerprint is None:
        if model is None:
            raise ValueError("store_config needs the model (or its fingerprint)")
        fingerprint = model_fingerprint(model)
    cfg = {"producer": PRODUCER, "logra": logra.config(), "model_fingerprint": fingerprint,
           "dtype": normalize_dtype(dtype)}
    if extra_config:
        cfg["extra"] = extra_config
    return cfg


def _explain_mismatch(store: GradientStore, config: dict) -> str:
    diff = config_diff(store.config, config)
    if not diff:
        return ""
    more = f" (+{len(diff) - 6} more)" if len(diff) > 6 else ""
    return " Differing config entries: " + ", ".join(diff[:6]) + more + "."


# ----------------------------------------------------------------------------------------------- data

def _unpack(item):
    if not (isinstance(item, tuple) and len(item) == 2):
        raise ValueError("an iterable `data` must yield (ids, batch) pairs (ids may be None: row numbers); "
                         f"got {type(item).__name__}. Pass a pytree of arrays with a leading axis N instead "
                         "to log a whole dataset")
    return item


def _collect_iterable_ids(data) -> tuple[int, Any]:
    total, parts, kinds = 0, [], set()
    for item in data:
        bids, batch = _unpack(item)
        n = _batch_size(batch)
        if bids is None:
            kinds.add("none")
        else:
            arr = np.asarray(bids) if not isinstance(bids, list) else bids
            if len(arr) != n:
                raise ValueError(f"a batch of {n} examples came with {len(arr)} ids")
            kinds.add("ids")
            parts.append(list(np.asarray(arr).tolist()) if not isinstance(arr, list) else arr)
        total += n
    if kinds == {"ids", "none"}:
        raise ValueError("some batches came with ids and some with None; give ids for every batch or none")
    ids = None if "ids" not in kinds else [v for p in parts for v in p]
    return total, ids


# ----------------------------------------------------------------------------------------------- writer

class _Writer:
    """Background committer: ``submit`` starts an async tensorstore write of a block; a thread waits for
    its commit, then marks the rows done. At most ``max_inflight`` writes wait in the queue."""

    def __init__(self, store: GradientStore, max_inflight: int, on_block: Callable | None):
        self._store, self._on_block = store, on_block
        self._q: queue.Queue = queue.Queue(maxsize=max(1, int(max_inflight)))
        self._err: BaseException | None = None
        self.rows_written = 0
        self._t = threading.Thread(target=self._run, name="jaxval-gradient-writer", daemon=True)
        self._t.start()

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._err is not None:
                continue  # keep draining so that submit never blocks forever
            start, stop, fut = item
            try:
                fut.result()                      # the data are committed ...
                self._store.mark_done(start, stop)  # ... only then are the rows done
                self.rows_written += stop - start
                if self._on_block is not None:
                    self._on_block(start, stop)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self._err = write_error(self._store, start, stop, e)

    def check(self):
        if self._err is not None:
            raise self._err

    def submit(self, start: int, rows: np.ndarray):
        self.check()
        try:
            fut = self._store.write(start, rows, wait=False)
        except Exception as e:  # noqa: BLE001
            raise write_error(self._store, start, start + rows.shape[0], e) from e
        self._q.put((start, start + rows.shape[0], fut))

    def close(self):
        self._q.put(None)
        self._t.join()
        self.check()


class _Block:
    __slots__ = ("start", "stop", "buf", "filled", "write")

    def __init__(self, start, stop, dim, np_dtype, write: bool):
        self.start, self.stop, self.write, self.filled = start, stop, write, 0
        self.buf = np.empty((stop - start, dim), np_dtype) if write else None


# ----------------------------------------------------------------------------------------------- checks

_EXP_MASKS = {2: (np.uint16, {"bfloat16": 0x7F80, "float16": 0x7C00})}


def nonfinite_rows(rows: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``rows`` ([n, D] float32 / float16 / bfloat16) holding a NaN or inf (one pass;
    for 16-bit floats a test of the exponent bits, no conversion)."""
    rows = np.asarray(rows)
    if rows.dtype.itemsize == 2 and rows.dtype.name in ("bfloat16", "float16"):
        m = 0x7F80 if rows.dtype.name == "bfloat16" else 0x7C00
        bad = ((rows.view(np.uint16) & m) == m).any(axis=1)
    else:
        bad = ~np.isfinite(rows).all(axis=1)
    return np.flatnonzero(bad)


def write_error(store, start: int, stop: int, e: BaseException) -> BaseException:
    """A failed block write as a :class:`StoreWriteError` saying why, which rows are kept and that a rerun
    resumes (disk full, permission denied, any other I/O error); other exceptions as they are."""
    import errno

    text = " ".join(str(e).split())
    code = getattr(e, "errno", None)
    if "RESOURCE_EXHAUSTED" in text or code == errno.ENOSPC or "No space left" in text:
        why = "the disk is full (RESOURCE_EXHAUSTED)"
    elif "PERMISSION_DENIED" in text or code in (errno.EACCES, errno.EPERM, errno.EROFS) or "ermission denied" in text:
        why = "permission denied (PERMISSION_DENIED: the store is not writable)"
    elif isinstance(e, OSError) or any(k in text for k in ("UNAVAILABLE", "DATA_LOSS", "INTERNAL", "UNKNOWN")):
        why = f"an I/O error ({text[:200]})"
    else:
        return e
    err = _write_error_message(store, start, stop, why)
    err.__cause__ = e
    return err


def _write_error_message(store, start, stop, why) -> StoreWriteError:
    try:
        kept = f"{store.num_done()} of {len(store)} rows"
    except Exception:  # noqa: BLE001
        kept = "the rows marked done"
    err = StoreWriteError(f"writing rows [{start}, {stop}) of the store at {store.path} failed: {why}. {kept} "
                          "already marked done are intact and kept; fix the cause and rerun the same call (jaxval "
                          "log / log_gradients): it resumes with the pending rows only")
    err.rows, err.why = (start, stop), why
    return err


# ----------------------------------------------------------------------------------------------- setup

def _recover_half_created(path, dim: int, num_rows: int, dtype: str) -> bool:
    """True if ``path`` holds a store left half-created by a crash during ``create`` (arrays, no manifest)
    whose grads array has this call's shape and dtype: such a store holds no finished rows (rows can only
    be written after the manifest exists), so it can be re-created without losing anything."""
    try:
        loc = location(path)
        if loc.read("manifest.json") is not None:
            return False
        if not loc.exists("grads") and not loc.exists("done"):
            return False
        grads = ts.open({"driver": "zarr3", "kvstore": loc.kvstore("grads"), "open": True}).result()
    except Exception:  # noqa: BLE001 - anything unreadable is not ours to replace
        return False
    if not (tuple(grads.shape) == (num_rows, dim) and np.dtype(grads.dtype.numpy_dtype) == DTYPES[dtype]):
        return False
    # a store whose manifest was lost AFTER rows were logged is not half-created: its rows are someone's work
    try:
        done = ts.open({"driver": "zarr3", "kvstore": loc.kvstore("done"), "open": True}).result()
        n_done = int((np.asarray(done.read().result()) != 0).sum())
    except Exception:  # noqa: BLE001 - no readable done record: cannot prove it holds nothing
        n_done = -1
    if n_done != 0:
        what = f"{n_done} rows marked done" if n_done > 0 else "an unreadable done record"
        raise StoreError(f"{path} holds store arrays with {what} but no manifest.json (deleted or lost): it is not "
                         "a half-created store, so it is not re-created. Restore manifest.json from a backup "
                         "(or recreate it with the same call's config), or, to discard those rows, pass "
                         "overwrite=True (jaxval log --overwrite)")
    return True


def _create_or_open(path, *, dim, n, dtype, chunk_rows, config, ids, overwrite, creator, batch,
                    open_timeout) -> GradientStore:
    if creator:
        try:
            GradientStore.open(path)
            exists = True
        except StoreNotFoundError:
            exists = False
        except StoreError:
            exists = True  # corrupt / half-created: create() decides (and explains)
        if exists and not overwrite and _recover_half_created(path, dim, n, dtype):
            warnings.warn(f"jaxval: {path} holds a store left half-created by an interrupted run (no "
                          "manifest, no finished rows); re-creating it", stacklevel=3)
            overwrite, exists = True, False
        cr = chunk_rows
        if cr is None and (not exists or overwrite):
            cr = default_chunk_rows(dim, n, DTYPES[dtype].itemsize, multiple_of=batch)
        try:
            return GradientStore.create(path, dim=dim, num_rows=n, dtype=dtype, chunk_rows=cr, config=config,
                                        ids=ids, overwrite=overwrite)
        except StoreError as e:
            hint = ""
            try:
                hint = _explain_mismatch(GradientStore.open(path), config)
            except Exception:  # noqa: BLE001
                pass
            if hint:
                raise StoreError(f"{e}.{hint}") from e
            raise
    store = GradientStore.open(path, timeout=open_timeout)
    problems = []
    if store.dim != dim:
        problems.append(f"dim {store.dim} != {dim}")
    if len(store) != n:
        problems.append(f"num_rows {len(store)} != {n}")
    if store.dtype != dtype:
        problems.append(f"dtype {store.dtype} != {dtype}")
    if store.config_hash != config_hash(config):
        problems.append("config differs." + _explain_mismatch(store, config))
    if chunk_rows is not None and store.chunk_rows != int(chunk_rows):
        problems.append(f"chunk_rows {store.chunk_rows} != {chunk_rows}")
    if problems:
        raise StoreError(f"the store at {store.path} (created by process 0) does not match this process's "
                         "call: " + "; ".join(problems) + " All processes must make the same call")
    if ids is not None:
        mine = np.asarray(ids if not isinstance(ids, np.ndarray) else ids)
        theirs = store.ids
        if mine.shape != theirs.shape or not all(
                a == b for a, b in zip(theirs.tolist(), mine.tolist())):
            raise StoreError(f"the store at {store.path} was created with different ids than this process's")
    return store


def _barrier(name: str):
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------- API

def log_gradients(logra: LoGra, model: nnx.Module, data, path, batch_size: int = 64, dtype: str = "bfloat16",
                  ids=None, chunk_rows: int | None = None, overwrite: bool = False,
                  process_index: int | None = None, process_count: int | None = None, progress: bool = True,
                  stats: str | None = None, *, num_rows: int | None = None, extra_config: dict | None = None,
                  fingerprint: str | None = None, max_inflight: int = 2, open_timeout: float = 300.0,
                  pad: bool = True, on_block: Callable[[int, int], Any] | None = None, mesh=None,
                  nonfinite: str = "raise"):
    """Compute LoGra projected gradients of every example of ``data`` and store them at ``path``.

    Resumable (rerun the same call after a crash), several processes at once; see the module docstring.

    Args:
      logra, model: the :class:`~jaxval.LoGra` and the model whose gradients are logged.
      data: a pytree of arrays with a leading axis N (row i of the store = example i), or an iterable of
        ``(ids, batch)`` pairs (``ids``: the batch's ids or None; rows are stored in iteration order). An
        iterable is read once more first to collect the ids unless ``ids=`` (or ``num_rows=`` with
        None ids) is given; a one-shot iterator needs one of them. On a resume the iterable is read
        again from the start (batches in finished blocks are skipped without computing).
      path: local folder, ``gs://bucket/prefix`` or a tensorstore kvstore spec (see ``GradientStore``).
      batch_size: examples per compiled step (array data).
      dtype: stored precision, ``"bfloat16"`` | ``"float16"`` | ``"float32"`` (cast on the device,
        round to nearest even).
      ids: one unique id per row (all integers or all strings); default the row numbers.
      chunk_rows: rows per chunk = the unit of work, resume and write. Default: a multiple of
        ``batch_size`` giving ~8 MiB chunks (an existing store keeps its own).
      overwrite: replace an existing store with a different config (default: refuse, change nothing).
      process_index, process_count: this process's share (blocks ``p, p+P, ...``); default
        ``jax.process_index()``, ``jax.process_count()``.
      progress: show a tqdm bar (examples/s).
      stats: ``None`` | ``"kfac"`` | ``"raw"``: also accumulate preconditioner statistics in the same pass;
        the call then returns ``(store, stats)``.
      num_rows: N for an iterable ``data`` whose batches carry no ids (otherwise inferred).
      extra_config: JSON-able dict stored in the config (so a resume with other data refuses).
      fingerprint: use this model fingerprint instead of hashing the parameters.
      max_inflight: block writes queued behind compute (memory ≈ (max_inflight + 2) blocks).
      open_timeout: seconds a process other than 0 waits for process 0 to create the store.
      pad: pad short batches to the compiled batch shape (avoids recompiles; ignored with ``stats``).
      on_block: ``on_block(start, stop)`` called (from the writer thread) after a block is stored.
      mesh: a ``jax.sharding.Mesh``; each batch is split over its first axis. A mesh of this process's
        devices: data parallel within the process (batch sizes divisible by the axis size are sharded,
        others replicated). A mesh spanning every process under ``jax.distributed`` (e.g. parameters
        placed with ``jaxval.distributed.shard_params``): every process runs every compiled step (SPMD)
        on a global batch assembled from the processes' own batches; the first axis must give each
        process's devices their own rows (``jaxval.distributed.make_mesh``'s process-major order); array
        ``data`` only. See the module docstring.
      nonfinite: ``"raise"`` (default): a NaN / inf gradient raises :class:`jaxval.NonFiniteError` naming the
        example ids (its block is not stored; blocks already done are kept); ``"skip"``: such rows are
        stored as zeros, marked done and recorded in ``skipped.json`` beside the store
        (``store.skipped_rows()``), so that a caller can see and drop them.

    Returns:
      The :class:`~jaxval.store.GradientStore` (``(store, stats)`` when ``stats`` is given).

    Raises:
      StoreError: the path holds a different store (config, shape, dtype, ids, chunking), a corrupt or
        foreign one, or cannot be written. Nothing stored is changed.
      ValueError: bad arguments or data (e.g. duplicate ids, batches of mismatched sizes).
    """
    if not isinstance(batch_size, (int, np.integer)) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    if stats is not None and stats not in STATS_KINDS:
        raise ValueError(f"stats must be None or one of {STATS_KINDS}, got {stats!r} (for EK-FAC log with "
                         "stats='kfac', then jaxval.fit_from_store(store, stats, kind='ekfac'))")
    if int(max_inflight) < 1:
        raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    dtype = normalize_dtype(dtype)
    if process_count is None:
        process_count = jax.process_count()
    if process_index is None:
        process_index = jax.process_index()
    pi, pc = int(process_index), int(process_count)
    if pc < 1 or not 0 <= pi < pc:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of {process_count}")
    coordinated = pc > 1 and jax.process_count() == pc and jax.process_index() == pi
    if overwrite and pi != 0 and not coordinated:
        raise ValueError("overwrite=True in a process other than 0 is racy without jax.distributed: remove "
                         "the old store first, or let process 0 alone create it with overwrite=True")
    check_independent_examples(model)
    multi = spans_processes(mesh)

    # ---- the dataset: N and the ids
    array_mode = is_array_tree(data)
    if multi:
        _check_global_mesh(mesh, array_mode, coordinated, pc)
    if array_mode:
        n = _batch_size(data)
    else:
        if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise ValueError("data must be a pytree of arrays with a leading example axis, or an iterable "
                             f"of (ids, batch) pairs; got {type(data).__name__}")
        if ids is not None:
            n = len(ids)
        elif num_rows is not None:
            n = int(num_rows)
        else:
            if iter(data) is data:
                raise ValueError("data is a one-shot iterator: pass ids=[...] (all ids, in order) or "
                                 "num_rows=N, or a re-iterable (a list, or an object whose __iter__ restarts)")
            n, ids = _collect_iterable_ids(data)
    if n <= 0:
        raise ValueError("data has no examples (N = 0): nothing to log")
    if num_rows is not None and int(num_rows) != n:
        raise ValueError(f"num_rows={num_rows} but the data / ids give {n} rows")

    config = store_config(logra, model, dtype, extra_config, fingerprint)
    creator = pi == 0
    if coordinated and not creator:
        _barrier(f"jaxval.log_gradients.create:{path}")   # wait for process 0 to create / validate
    err = None
    try:
        store = _create_or_open(path, dim=logra.dim, n=n, dtype=dtype, chunk_rows=chunk_rows, config=config,
                                ids=ids, overwrite=overwrite and creator, creator=creator, batch=batch_size,
                                open_timeout=open_timeout)
    except Exception as e:  # noqa: BLE001
        if not (coordinated and creator):
            raise
        err = e  # process 0 still meets the others at the barrier (they then fail to open / validate)
    if coordinated and creator:
        _barrier(f"jaxval.log_gradients.create:{path}")
        if err is not None:
            raise err

    # ---- chunk files of done rows lost since (deleted, truncated): recompute them on this resume
    damaged = store.repair() if creator else []
    if damaged:
        warnings.warn(f"jaxval: {store.path}: chunk files of rows {damaged[:4]} were missing or damaged; they were "
                      "marked pending and are recomputed now", stacklevel=2)

    # ---- the plan: owned blocks, pending ones written
    cr = store.chunk_rows
    pending = {s for s, _ in store.pending_blocks()}
    owned = [(s, min(s + cr, n)) for s in range(0, n, cr) if (s // cr) % pc == pi]
    plan = [(s, e, s in pending) for s, e in owned if s in pending or stats is not None]

    acc = None
    if plan or multi:
        run = _Run(logra, model, store, dtype, stats, batch_size, max_inflight, progress, on_block, pad, pi, pc,
                   mesh, multi, nonfinite)
        try:
            if multi:
                acc = run.spmd(data, plan)
            elif array_mode:
                acc = run.arrays(data, plan)
            else:
                acc = run.stream(data, plan, n)
        except StoreWriteError as e:   # the queued writes have finished now: say how many rows are kept
            if not hasattr(e, "rows"):
                raise
            raise _write_error_message(store, *e.rows, e.why) from e.__cause__
    elif stats is not None:
        acc = curvature.init(logra, stats)

    if coordinated:
        _barrier(f"jaxval.log_gradients.done:{path}")
    if stats is None:
        return store
    from jax.experimental import multihost_utils

    if multi:   # the global sums, already reduced inside the compiled step (each real row counted once)
        acc = jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(acc, tiled=True))
    else:
        acc = jax.tree_util.tree_map(np.asarray, acc)
        if coordinated:
            acc = jax.tree_util.tree_map(lambda x: np.asarray(x).sum(0), multihost_utils.process_allgather(acc))
    return store, jax.tree_util.tree_map(jnp.asarray, acc)


def masked_accumulate(layers, losses, pairs, g, aux):
    """The ``reduce`` of LoGra's step that accumulates statistics with a weight per row: ``aux = (state,
    w [B])``, ``w`` 1 for a real row and 0 for a padding row. Every statistic is a sum over rows of
    products of the row's ``g`` / pairs (a token counts when its cotangent is not zero), so scaling a
    row's ``g``, inputs and cotangents by 0 removes its contribution; ``examples`` becomes ``Σ w``."""
    state, w = aux

    def scale(x):
        return x * w.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)

    if pairs is not None:
        pairs = {name: [(scale(a), scale(s), cot_is_s) for a, s, cot_is_s in calls] for name, calls in pairs.items()}
    stats = curvature.batch_statistics(layers, state, scale(g), pairs)
    return curvature.update(state, stats._replace(examples=jnp.sum(w)))


def _check_global_mesh(mesh, array_mode: bool, coordinated: bool, pc: int) -> None:
    """Refuse a mesh spanning processes that the SPMD pass cannot use (clear errors, before any work)."""
    procs = {d.process_index for d in mesh.devices.flat}
    if not coordinated or procs != set(range(jax.process_count())) or pc != jax.process_count():
        raise ValueError(f"mesh= spans processes {sorted(procs)}: log_gradients then runs every step on every "
                         f"process, which needs jax.distributed with all {jax.process_count()} processes in the "
                         "mesh and the default process_index/process_count; or give each process a mesh of its "
                         "own jax.local_devices()")
    if not array_mode:
        raise ValueError("with a mesh spanning processes, data must be the whole dataset as a pytree of arrays "
                         "with a leading axis N (the same on every process; memmaps are read lazily), not an "
                         "iterable of batches")
    size = mesh.shape[mesh.axis_names[0]]
    if size % pc:
        raise ValueError(f"the mesh's first (batch) axis {mesh.axis_names[0]!r} has {size} positions, not a "
                         f"multiple of the {pc} processes: each process must hold its own rows; build the mesh "
                         f"with jaxval.distributed.make_mesh({mesh.axis_names[0]}={pc}·k, ...)")


def _process_rows(sharding, rows: int, pc: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of a ``[rows, ...]`` array under ``sharding`` (split over its first axis) that
    this process's devices hold: they must be ``rows / pc`` contiguous rows that no other process's device
    holds, or ``ValueError`` (the mesh's first axis mixes processes)."""
    me = jax.process_index()
    spans: dict[int, set] = {}
    for d, idx in sharding.devices_indices_map((rows,)).items():
        r = range(rows)[idx[0]]
        spans.setdefault(d.process_index, set()).add((r.start, r.stop))
    mine = sorted(spans.get(me, ()))
    lo, hi = (mine[0][0], mine[-1][1]) if mine else (0, 0)
    contiguous = all(a[1] == b[0] for a, b in zip(mine, mine[1:]))
    shared = any(s < hi and lo < e for p, ss in spans.items() if p != me for s, e in ss)
    if not contiguous or shared or hi - lo != rows // pc:
        raise ValueError("the mesh's first (batch) axis does not give each process its own rows (this process's "
                         f"devices hold rows {mine} of {rows}, shared with another process: {shared}): order the "
                         "mesh's devices process-major along that axis, e.g. with "
                         "jaxval.distributed.make_mesh(data=<a multiple of the process count>, model=...)")
    return lo, hi


class _Run:
    """One logging pass of one process over its planned blocks."""

    def __init__(self, logra, model, store, dtype, stats, batch_size, max_inflight, progress, on_block, pad,
                 pi, pc, mesh, multi: bool = False, nonfinite: str = "raise"):
        self.logra, self.store, self.stats, self.bs = logra, store, stats, batch_size
        self.dim, self.np_dtype = store.dim, np.dtype(_JNP_DTYPES[dtype])
        reduce = (masked_accumulate if multi else curvature.accumulate_batch) if stats else None
        self.step, self.state = logra.step_for(model, reduce, dtype=_JNP_DTYPES[dtype])
        self.pad = pad and stats is None
        self.max_inflight, self.progress, self.on_block = max_inflight, progress, on_block
        self.pi, self.pc, self.mesh, self.multi = pi, pc, mesh, multi
        self.nonfinite = nonfinite
        self.projections = logra.projections
        self.acc = None
        if stats is not None:
            self.acc = curvature.init(logra, stats)
        if multi:   # sharded parameters stay as placed; host-local values are replicated on the mesh
            self.state = to_mesh(self.state, mesh)
            self.projections = replicate(to_host(self.projections), mesh)
            if self.acc is not None:
                self.acc = replicate(to_host(self.acc), mesh)
        self.fetch: collections.deque = collections.deque()

    # -- the compute / fetch / write pipeline

    def _dispatch(self, batch, weight):
        """The step on ``batch`` (already global in SPMD mode); ``weight``: a scalar, or (SPMD) ``[rows]``."""
        if self.mesh is not None and not self.multi:
            batch = shard_batch(batch, self.mesh)
        if self.stats is None:
            g = self.step(self.state, batch, self.projections)[0]
        else:
            w = weight if self.multi else jnp.float32(weight)
            g, _, self.acc = self.step(self.state, batch, self.projections, None, (self.acc, w))
        if self.multi and not g.sharding.is_equivalent_to(self.rows_sharding, g.ndim):
            g = self._reshard(g)   # rows over the first axis, so that each process holds its own rows
        return g

    def _host(self, g) -> np.ndarray:
        """``g`` on the host: the whole batch, or (SPMD) this process's own rows ``[lo, hi)`` of it."""
        if not self.multi:
            return np.asarray(g)
        lo, hi = self.own
        out = np.empty((hi - lo,) + tuple(g.shape[1:]), g.dtype)
        for sh in g.addressable_shards:      # replicas over the other axes hold the same rows
            r = range(g.shape[0])[sh.index[0]]
            out[r.start - lo:r.stop - lo] = np.asarray(sh.data)
        return out

    def _drain(self, keep: int):
        while len(self.fetch) > keep:
            targets, n, g = self.fetch.popleft()
            host = None
            for blk, row_off, g_off, cnt in targets:
                if blk.write:
                    if host is None:
                        host = self._host(g)
                    rows = host[g_off:g_off + cnt]
                    bad = nonfinite_rows(rows)
                    if bad.size:
                        rows = self._nonfinite(blk.start + row_off + bad, rows, bad)
                    blk.buf[row_off:row_off + cnt] = rows
                blk.filled += cnt
                if blk.filled == blk.stop - blk.start:
                    if blk.write:
                        self.writer.submit(blk.start, blk.buf)
                        blk.buf = None
            if host is None:
                jax.block_until_ready(g)  # stats-only or padding batch: keep the queue bounded
            self.bar.update(n)

    def _nonfinite(self, rows_idx, rows, bad):
        """NaN / inf gradients: raise naming the examples (default), or (``nonfinite="skip"``) store zeros,
        record the rows in ``skipped.json`` beside the store and go on."""
        ids = self.store.ids[rows_idx]
        if self.nonfinite != "skip":
            raise NonFiniteError(
                f"the gradients of {len(rows_idx)} example(s) hold NaN or inf: ids {ids[:8].tolist()} (rows "
                f"{rows_idx[:8].tolist()}); nothing of their block was stored and the rows already done are kept. "
                "Fix the data or the model (e.g. inf inputs, a diverged checkpoint), or pass nonfinite='skip' to "
                "store them as zeros and record them (store.skipped_rows())")
        rows = np.array(rows, copy=True)
        rows[bad] = 0
        self.store.record_skipped(rows_idx, ids)
        return rows

    def _open(self, total: int):
        self.writer = _Writer(self.store, self.max_inflight, self.on_block)
        desc = "logging gradients" + (f" [{self.pi}/{self.pc}]" if self.pc > 1 else "")
        self.bar = tqdm(total=total, desc=desc, unit="ex", disable=not self.progress,
                        dynamic_ncols=True, smoothing=0.1)

    def _close(self, ok: bool):
        try:
            if ok:
                self._drain(0)
        finally:
            self.bar.close()
            self.writer.close()  # waits for queued writes: what was computed is kept

    def _queue(self, targets, count: int, g):
        """Queue a dispatched batch's rows for their blocks; fetch the previous batch's to the host."""
        self.fetch.append((targets, count, g))
        self._drain(1)
        self.writer.check()

    def arrays(self, data, plan):
        total = sum(e - s for s, e, _ in plan)
        eff = min(self.bs, max(e - s for s, e, _ in plan))
        self._open(total)
        ok = False
        try:
            for s, e, write in plan:
                blk = _Block(s, e, self.dim, self.np_dtype, write)
                for b0 in range(s, e, self.bs):
                    b1 = min(b0 + self.bs, e)
                    batch = take(data, b0, b1, eff if self.pad else None)
                    self._queue([(blk, b0 - s, 0, b1 - b0)], b1 - b0, self._dispatch(batch, 1.0))
            ok = True
        finally:
            self._close(ok)
        return self.acc

    def spmd(self, data, plan):
        """Every process in every step (a mesh spanning processes); see the module docstring."""
        from jax.experimental import multihost_utils
        from jax.sharding import NamedSharding, PartitionSpec

        cuts = [(s, e, w, b0, min(b0 + self.bs, e)) for s, e, w in plan for b0 in range(s, e, self.bs)]
        local = min(self.bs, max((e - s for s, e, _ in plan), default=1))
        agreed = np.asarray(multihost_utils.process_allgather(np.asarray([len(cuts), local], np.int64)))
        steps, local = (int(v) for v in agreed.reshape(-1, 2).max(0))
        if steps == 0:
            return self.acc
        axis = self.mesh.axis_names[0]
        per_process = self.mesh.shape[axis] // self.pc   # data-axis positions each process's devices hold
        local = -(-local // per_process) * per_process
        rows = local * self.pc
        self.rows_sharding = NamedSharding(self.mesh, PartitionSpec(axis))
        self.own = _process_rows(self.rows_sharding, rows, self.pc)
        self._reshard = jax.jit(lambda x: x, out_shardings=self.rows_sharding)

        def place(tree):
            return jax.tree_util.tree_map(lambda a: jax.make_array_from_process_local_data(
                self.rows_sharding, np.asarray(a), (rows,) + tuple(np.shape(a)[1:])), tree)

        self._open(sum(e - s for s, e, _ in plan))
        ok, blk, batch = False, None, None
        try:
            for i in range(steps):
                if i < len(cuts):
                    s, e, write, b0, b1 = cuts[i]
                    if blk is None or blk.start != s:
                        blk = _Block(s, e, self.dim, self.np_dtype, write)
                    batch = take(data, b0, b1, local)
                    targets, real = [(blk, b0 - s, 0, b1 - b0)], b1 - b0
                else:   # padding: this process's last batch again (or row 0 when it has none), discarded
                    if batch is None:
                        batch = take(data, 0, 1, local)
                    targets, real = [], 0
                weight = None
                if self.stats is not None:
                    weight = place((np.arange(local) < real).astype(np.float32))
                self._queue(targets, real, self._dispatch(place(batch), weight))
            ok = True
        finally:
            self._close(ok)
        return self.acc

    def stream(self, data, plan, n):
        cr = self.store.chunk_rows
        plan_map = {s // cr: (s, e, w) for s, e, w in plan}
        blocks: dict[int, _Block] = {}
        store_ids = None
        total = sum(e - s for s, e, _ in plan)
        self._open(total)
        ok, row = False, 0
        try:
            for item in data:
                bids, batch = _unpack(item)
                b = _batch_size(batch)
                r0, r1 = row, row + b
                row = r1
                if r1 > n:
                    raise ValueError(f"data yielded more rows than the store's {n}")
                k0, k1 = r0 // cr, (r1 - 1) // cr
                touched = [k for k in range(k0, k1 + 1) if k in plan_map]
                if not touched:
                    continue
                if bids is not None:
                    if store_ids is None:
                        store_ids = self.store.ids
                    given = np.asarray(bids).tolist() if not isinstance(bids, list) else list(bids)
                    if len(given) != b or given != store_ids[r0:r1].tolist():
                        raise ValueError(f"the ids of rows [{r0}, {r1}) differ from the store's ids: the data "
                                         "must yield the same examples, in the same order, on every run")
                targets = []
                for k in touched:
                    s, e, w = plan_map[k]
                    blk = blocks.get(k)
                    if blk is None:
                        blk = blocks[k] = _Block(s, e, self.dim, self.np_dtype, w)
                    lo, hi = max(r0, s), min(r1, e)
                    targets.append((blk, lo - s, lo - r0, hi - lo))
                weight = 1.0 if (k0 % self.pc) == self.pi else 0.0  # stats: each batch counted once
                self._queue(targets, sum(t[3] for t in targets), self._dispatch(batch, weight))
                for k in touched:
                    blk = blocks[k]
                    if blk.filled == blk.stop - blk.start:
                        del blocks[k]
            self._drain(0)
            for k in [k for k, blk in blocks.items() if blk.filled == blk.stop - blk.start]:
                del blocks[k]
            if row != n:
                raise ValueError(f"data yielded {row} rows but the store has {n}; finished blocks were kept, the "
                                 "rest are pending")
            ok = True
        finally:
            self._close(ok)
        return self.acc
