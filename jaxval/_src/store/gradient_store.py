"""GradientStore: an on-disk [N, D] matrix of projected per-example gradients (tensorstore zarr3).

Layout of a store folder (or kvstore prefix)::

    manifest.json   format, version, dim, num_rows, dtype, chunk_rows, ids kind, the user config
                    (LoGra layers, ranks, init, seed, model fingerprint, ...) and its sha256 hash.
                    Written atomically and LAST by ``create``: a folder holding arrays but no
                    manifest is a half-created store and is refused (never silently reused).
    grads/          zarr3 array [num_rows, dim] of dtype bfloat16 | float16 | float32, regular chunk
                    grid ``[chunk_rows, dim]`` (one file per chunk of rows, no sharding).
    done/           zarr3 uint8 array [num_rows], the completion record: one byte per row, 1 = the
                    row's gradient is stored. Its chunks are ``[chunk_rows]``, aligned with the
                    chunks of ``grads``, so writers that own disjoint chunk-aligned row blocks touch
                    disjoint files of both arrays (no contention). Unaligned writers stay correct:
                    tensorstore's file kvstore does read-modify-write of a chunk under a lock with
                    generation checks; it is only slower.
    ids/            integer ids: zarr3 int64 array [num_rows].
    ids_bytes/      string ids: the UTF-8 bytes of all ids concatenated (zarr3 uint8) ...
    ids_offsets/    ... and int64 offsets [num_rows + 1]; id i is bytes[off[i]:off[i+1]].

Policies:

* **Ids** default to ``arange(num_rows)``; they must be all integers or all strings and must be
  **unique**: ``create`` raises :class:`StoreError` on a duplicate (it names one) before anything is
  written.
* **Resume**: ``create`` on an existing store with the same dim, num_rows, dtype, config hash (and
  ids, when given) returns the opened store; anything different raises :class:`StoreError` unless
  ``overwrite=True``. A failed call never deletes or changes existing data.
* **Several processes**: one process calls ``create``; the others call ``GradientStore.open(path,
  timeout=...)``, which needs no shape (it waits for the manifest, then opens the arrays from their
  own metadata). Each writer writes chunk-aligned disjoint row ranges (``store.chunk_rows``), waits
  for its write to commit, then calls ``mark_done`` for the range. Rows are never marked done before
  their data are durable, so after a crash ``pending_blocks()`` lists exactly what to recompute.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import time
from typing import Iterator

import ml_dtypes
import numpy as np
import tensorstore as ts

from jaxval._src.errors import StoreCorruptError, StoreError, StoreNotFoundError
from jaxval._src.store.chunks import ChunkFiles, aligned, aligned_empty, zarr3_metadata
from jaxval._src.store.ids import encode_ids
from jaxval._src.store.location import Location, location
from jaxval._src.store.manifest import (ARRAYS, DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, OWN_NAMES, SUMS,
                                        canonical_json, config_hash, default_chunk_rows, normalize_dtype,
                                        parse_manifest)


class GradientStore:
    """An [N, D] matrix of per-example gradients on disk; see the module docstring for the layout.

    Create with :meth:`create`, open with :meth:`open`. Rows are read back as float32.
    """

    def __init__(self, location: Location, manifest: dict, grads, done, *, _ids=None):
        self._loc = location
        self._manifest = manifest
        self._grads = grads
        self._done = done
        self._ids = _ids
        self._np_dtype = DTYPES[manifest["dtype"]]
        self._files = ChunkFiles.probe(location, int(manifest["chunk_rows"]), int(manifest["dim"]),
                                        self._np_dtype.itemsize)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def create(cls, path, dim: int, num_rows: int, dtype: str = "bfloat16", chunk_rows: int | None = None,
               config: dict | None = None, ids=None, overwrite: bool = False,
               compress: bool = False) -> "GradientStore":
        """Create a store (or re-open an identical existing one, which is how runs resume).

        Args:
          path: local folder, ``gs://bucket/prefix`` URL, or a tensorstore kvstore spec dict.
          dim, num_rows: shape of the gradient matrix.
          dtype: "bfloat16" | "float16" | "float32" (stored precision; reads return float32).
          chunk_rows: rows per chunk (one file per chunk). Default: a power of two giving ~8 MiB chunks.
            Writers should own chunk-aligned disjoint row ranges.
          config: JSON-serialisable dict describing how the gradients were made (layers, ranks, init,
            seed, model fingerprint, ...). Its sha256 ``config_hash`` guards resumes.
          ids: one unique id per row, all integers (stored as int64) or all strings (UTF-8 table);
            default ``arange(num_rows)``. Duplicates raise :class:`StoreError`.
          overwrite: replace an existing store (or half-created one) at ``path``. Only the store's own
            entries are removed; other files in the folder are left alone.
          compress: zstd-compress gradient chunks (random-like gradients barely compress; off by default).

        Raises:
          StoreError: bad arguments; an existing store with a different dim / num_rows / dtype /
            config hash / ids; a corrupt or half-created store; an unwritable path. Nothing on disk is
            changed by a failed call.
        """
        loc = location(path)
        # ---- validate everything before touching the disk
        if not isinstance(dim, (int, np.integer)) or int(dim) <= 0:
            raise StoreError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(num_rows, (int, np.integer)) or int(num_rows) <= 0:
            raise StoreError(f"num_rows must be a positive integer, got {num_rows!r}")
        dim, num_rows = int(dim), int(num_rows)
        dtype = normalize_dtype(dtype)
        if chunk_rows is not None and (not isinstance(chunk_rows, (int, np.integer)) or int(chunk_rows) <= 0):
            raise StoreError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise StoreError(f"config must be a dict, got {type(config).__name__}")
        try:
            config_json = json.loads(canonical_json(config))
        except (TypeError, ValueError) as e:
            raise StoreError(f"config must be JSON-serialisable: {e}") from e
        chash = config_hash(config)
        ids_kind, ids_data = encode_ids(ids, num_rows)

        # ---- an existing store?
        raw = loc.read(MANIFEST)
        if raw is not None and not overwrite:
            m = parse_manifest(raw, str(loc))
            problems = []
            if int(m["dim"]) != dim:
                problems.append(f"dim {m['dim']} != {dim}")
            if int(m["num_rows"]) != num_rows:
                problems.append(f"num_rows {m['num_rows']} != {num_rows}")
            if m["dtype"] != dtype:
                problems.append(f"dtype {m['dtype']} != {dtype}")
            if m["config_hash"] != chash:
                problems.append(f"config hash {m['config_hash'][:12]}… != {chash[:12]}… (config differs)")
            if chunk_rows is not None and int(m["chunk_rows"]) != int(chunk_rows):
                problems.append(f"chunk_rows {m['chunk_rows']} != {chunk_rows}")
            if problems:
                raise StoreError(f"a different store already exists at {loc}: " + "; ".join(problems)
                                 + ". Use another path, or pass overwrite=True to replace it")
            store = cls.open(loc)
            if ids is not None and not store._ids_equal(ids_kind, ids_data):
                raise StoreError(f"the store at {loc} was created with different ids; use another path or "
                                 "overwrite=True")
            return store
        present = [n for n in ARRAYS if loc.exists(n)]
        if present and not overwrite and raw is None:
            raise StoreError(f"{loc} holds store arrays {present} but no {MANIFEST}: a half-created store "
                             "(an interrupted create?). Nothing was changed; pass overwrite=True to replace it")

        created_dirs = loc.prepare_for_create()
        if overwrite:  # manifest first, so a crash mid-way leaves a detectable half-created store
            for name in OWN_NAMES:
                loc.remove(name)

        chunk_rows = int(chunk_rows) if chunk_rows is not None else default_chunk_rows(
            dim, num_rows, DTYPES[dtype].itemsize)
        chunk_rows = min(chunk_rows, num_rows)
        made: list[str] = []
        try:
            ctx = ts.Context()
            grads = cls._create_array(loc, "grads", [num_rows, dim], dtype, [chunk_rows, dim],
                                      compress=compress, dimension_names=["row", "dim"], context=ctx)
            made.append("grads")
            done = cls._create_array(loc, "done", [num_rows], "uint8", [chunk_rows], compress=True,
                                     dimension_names=["row"], context=ctx)
            made.append("done")
            if ids_kind == "int":
                made.append("ids")
                a = cls._create_array(loc, "ids", [num_rows], "int64", [min(num_rows, 1 << 20)],
                                      compress=True, context=ctx)
                a.write(ids_data).result()
                ids_np = ids_data
            else:
                data, offsets = ids_data
                made.append("ids_bytes")
                a = cls._create_array(loc, "ids_bytes", [data.size], "uint8",
                                      [max(1, min(data.size, 1 << 22))], compress=True, context=ctx)
                if data.size:
                    a.write(data).result()
                made.append("ids_offsets")
                a = cls._create_array(loc, "ids_offsets", [num_rows + 1], "int64",
                                      [min(num_rows + 1, 1 << 20)], compress=True, context=ctx)
                a.write(offsets).result()
                ids_np = None
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "dim": dim,
                "num_rows": num_rows,
                "dtype": dtype,
                "chunk_rows": chunk_rows,
                "compress": bool(compress),
                "ids_kind": ids_kind,
                "done_granularity": "row",
                "config": config_json,
                "config_hash": chash,
                "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            loc.write_atomic(MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        except BaseException as e:
            for name in made:  # only what this call created
                try:
                    loc.remove(name)
                except Exception:
                    pass
            for d in reversed(created_dirs):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            if isinstance(e, (StoreError, KeyboardInterrupt, SystemExit)):
                raise
            raise StoreError(f"could not create a store at {loc}: {e}") from e
        store = cls(loc, manifest, grads, done)
        if ids_np is not None:
            store._ids = ids_np
        return store

    @staticmethod
    def _create_array(loc, name, shape, dtype, chunk_shape, *, compress, dimension_names=None, context=None):
        spec = {
            "driver": "zarr3",
            "kvstore": loc.kvstore(name),
            "metadata": zarr3_metadata(shape, dtype, chunk_shape, compress=compress,
                                        dimension_names=dimension_names),
            "create": True,
            "store_data_equal_to_fill_value": True,
        }
        return ts.open(spec, context=context).result()

    @classmethod
    def open(cls, path, *, timeout: float = 0.0, poll: float = 0.2) -> "GradientStore":
        """Open an existing store without knowing its shape (it is read from the manifest/metadata).

        ``timeout`` > 0 waits up to that many seconds for the manifest to appear: worker processes use
        it to open a store that process 0 is creating.
        """
        loc = location(path)
        deadline = time.monotonic() + max(0.0, float(timeout))
        while True:
            raw = loc.read(MANIFEST)
            if raw is not None or time.monotonic() >= deadline:
                break
            time.sleep(poll)
        if raw is None:
            present = [n for n in ARRAYS if loc.exists(n)]
            if present:
                raise StoreError(f"{loc} holds store arrays {present} but no {MANIFEST}: a half-created or "
                                 "damaged store. Re-create it with GradientStore.create(..., overwrite=True)")
            raise StoreNotFoundError(f"no GradientStore at {loc}: {MANIFEST} not found "
                                     "(create one with GradientStore.create)")
        m = parse_manifest(raw, str(loc))
        ctx = ts.Context()
        try:
            # chunks of zeros are written too (tensorstore drops them by default): an absent chunk file then
            # always means "never written" (or lost), never "a block of zero gradients"
            grads = ts.open({"driver": "zarr3", "kvstore": loc.kvstore("grads"), "open": True,
                             "store_data_equal_to_fill_value": True},
                            context=ctx).result()
            done = ts.open({"driver": "zarr3", "kvstore": loc.kvstore("done"), "open": True},
                           context=ctx).result()
        except ValueError as e:
            raise StoreError(f"store at {loc} is damaged: its arrays cannot be opened ({e})") from e
        n, d = int(m["num_rows"]), int(m["dim"])
        if tuple(grads.shape) != (n, d) or tuple(done.shape) != (n,):
            raise StoreError(f"store at {loc} is damaged: grads shape {tuple(grads.shape)} / done shape "
                             f"{tuple(done.shape)} disagree with the manifest ({n}, {d})")
        if np.dtype(grads.dtype.numpy_dtype) != DTYPES[m["dtype"]]:
            raise StoreError(f"store at {loc} is damaged: grads dtype {grads.dtype} != manifest {m['dtype']}")
        return cls(loc, m, grads, done)

    # -- properties ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._manifest["num_rows"])

    @property
    def num_rows(self) -> int:
        return len(self)

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    @property
    def dtype(self) -> str:
        """Stored precision name: 'bfloat16' | 'float16' | 'float32'."""
        return self._manifest["dtype"]

    @property
    def chunk_rows(self) -> int:
        return int(self._manifest["chunk_rows"])

    @property
    def config(self) -> dict:
        return json.loads(json.dumps(self._manifest["config"]))

    @property
    def config_hash(self) -> str:
        return self._manifest["config_hash"]

    @property
    def manifest(self) -> dict:
        return json.loads(json.dumps(self._manifest))

    @property
    def path(self) -> str:
        return str(self._loc)

    @property
    def ids(self) -> np.ndarray:
        """int64 array, or an object array of str for string ids (loaded once, then cached)."""
        if self._ids is None:
            if self._manifest["ids_kind"] == "int":
                a = ts.open({"driver": "zarr3", "kvstore": self._loc.kvstore("ids"), "open": True}).result()
                self._ids = np.asarray(a.read().result(), dtype=np.int64)
            else:
                data, offsets = self._read_string_table()
                buf = data.tobytes()
                out = np.empty(len(self), dtype=object)
                out[:] = [buf[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(self))]
                self._ids = out
        return self._ids.copy()

    def _read_string_table(self):
        b = ts.open({"driver": "zarr3", "kvstore": self._loc.kvstore("ids_bytes"), "open": True}).result()
        o = ts.open({"driver": "zarr3", "kvstore": self._loc.kvstore("ids_offsets"), "open": True}).result()
        return np.asarray(b.read().result()), np.asarray(o.read().result(), dtype=np.int64)

    def _ids_equal(self, kind, data) -> bool:
        if kind != self._manifest["ids_kind"]:
            return False
        if kind == "int":
            return np.array_equal(self.ids, data)
        b, o = self._read_string_table()
        return np.array_equal(b, data[0]) and np.array_equal(o, data[1])

    # -- data ----------------------------------------------------------------------------------

    def _check_range(self, start, stop):
        n = len(self)
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= n:
            raise ValueError(f"row range [{start}, {stop}) is outside the store's rows [0, {n})")
        return start, stop


    def read(self, start: int = 0, stop: int | None = None, *, native: bool = False) -> np.ndarray:
        """Rows [start, stop) as float32 [stop - start, dim]; ``native=True``: in the stored dtype
        (``store.dtype``, e.g. bfloat16 as ``ml_dtypes.bfloat16``), no conversion.

        Either way a fresh, C-contiguous, 64-byte-aligned array (XLA:CPU can use it without a copy).
        """
        start, stop = self._check_range(start, len(self) if stop is None else stop)
        if self._files is None:
            arr = self._grads[start:stop].read().result()
        else:
            arr = aligned_empty((stop - start, self.dim), self._np_dtype)
            if stop > start:
                missing = self._files.read_into(start, stop, arr)
                if missing:
                    self._check_missing(missing)
        return aligned(arr, None if native else np.float32)

    # -- integrity: size records, checksums, repair ----------------------------------------------

    def _chunk_rows_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_rows, min((c + 1) * self.chunk_rows, len(self))

    def _check_missing(self, chunks) -> None:
        """Absent chunk files are pending chunks (zeros) unless rows of theirs are marked done: then lost."""
        mask = self.done_mask()
        lost = [c for c in chunks if mask[slice(*self._chunk_rows_range(c))].any()]
        if lost:
            raise StoreCorruptError(self._damage_message({c: "missing" for c in lost}))

    def _damage_message(self, bad: dict) -> str:
        items = sorted(bad.items())
        desc = ", ".join(f"rows [{a}, {b}) ({why})" for (a, b), why in
                         ((self._chunk_rows_range(c), why) for c, why in items[:4]))
        more = f" and {len(items) - 4} more chunks" if len(items) > 4 else ""
        return (f"the store at {self.path} is damaged: chunk files of rows marked done are {desc}{more}. "
                "Run GradientStore.open(path).repair() (it marks those rows pending; nothing else changes), then "
                "rerun the same log_gradients / `jaxval log` call to recompute them")

    def _bad_chunks(self, checksums: bool = False) -> dict:
        """{chunk: why} over chunks holding done rows whose file is missing, of the wrong size, or (with
        ``checksums``) whose crc32 differs from the record taken when the chunk was completed."""
        if self._files is None:
            return {}
        mask = self.done_mask()
        bad = {}
        for c in range(-(-len(self) // self.chunk_rows)):
            a, b = self._chunk_rows_range(c)
            if not mask[a:b].any():
                continue
            st = self._files.status(c)
            if st != "ok":
                bad[c] = st
            elif checksums:
                rec = self._sum_record(c)
                if rec is not None and rec.get("crc32") != self._files.crc32(c):
                    bad[c] = "checksum mismatch"
        return bad

    def check_chunks(self) -> None:
        """Raise :class:`StoreCorruptError` naming the rows if a chunk file of done rows is missing or has
        the wrong size (a stat per chunk: cheap; :meth:`verify` also compares checksums)."""
        bad = self._bad_chunks()
        if bad:
            raise StoreCorruptError(self._damage_message(bad))

    def verify(self) -> None:
        """Full check: every chunk file of done rows present, of its size, and with the crc32 recorded when
        the chunk was completed (reads the whole store once). Raises :class:`StoreCorruptError` naming rows."""
        bad = self._bad_chunks(checksums=True)
        if bad:
            raise StoreCorruptError(self._damage_message(bad))

    def repair(self) -> list[tuple[int, int]]:
        """Mark the rows of damaged chunks (missing, wrong size, checksum mismatch) pending so that a rerun of
        the same log recomputes them; returns their row ranges. Rows of intact chunks are not touched."""
        bad = self._bad_chunks(checksums=True)
        out = []
        for c in sorted(bad):
            a, b = self._chunk_rows_range(c)
            self._done[a:b].write(np.zeros(b - a, dtype=np.uint8)).result()
            self._drop_sum(c)
            out.append((a, b))
        return out

    def _sum_path(self, c: int) -> str | None:
        if self._files is None or self._loc.local is None:
            return None
        return os.path.join(self._loc.local, SUMS, str(c))

    def _sum_record(self, c: int) -> dict | None:
        p = self._sum_path(c)
        if p is None:
            return None
        try:
            with open(p, "rb") as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            return None

    def _drop_sum(self, c: int) -> None:
        p = self._sum_path(c)
        if p is not None:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass

    def _record_sums(self, start: int, stop: int) -> None:
        """After rows [start, stop) are marked done: record size and crc32 of every chunk now complete."""
        if self._files is None or stop <= start:
            return
        cr = self.chunk_rows
        chunks = range(start // cr, (stop - 1) // cr + 1)
        lo, hi = self._chunk_rows_range(chunks[0])[0], self._chunk_rows_range(chunks[-1])[1]
        mask = np.asarray(self._done[lo:hi].read().result()) != 0
        os.makedirs(os.path.join(self._loc.local, SUMS), exist_ok=True)
        for c in chunks:
            a, b = self._chunk_rows_range(c)
            if not mask[a - lo:b - lo].all():
                continue
            crc = self._files.crc32(c)
            if crc is None:
                continue
            rec = json.dumps({"crc32": crc, "size": self._files.chunk_bytes}).encode()
            p = self._sum_path(c)
            tmp = f"{p}.tmp-{os.getpid()}-{threading.get_ident()}"
            with open(tmp, "wb") as f:
                f.write(rec)
            os.replace(tmp, p)

    def write(self, start: int, rows, *, wait: bool = True, mark_done: bool = False):
        """Write ``rows`` ([n, dim], cast to the store dtype, round-to-nearest) at rows [start, start+n).

        With ``wait=False`` returns a ``tensorstore.WriteFutures``: call ``.result()`` (waits for
        the commit) before ``mark_done`` for these rows. ``mark_done=True`` (needs ``wait=True``)
        marks the rows done once the data are committed. Out-of-range or mis-shaped rows raise
        ``ValueError`` before anything is written.
        """
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must have shape [n, {self.dim}], got {rows.shape}")
        start, stop = self._check_range(start, int(start) + rows.shape[0])
        if mark_done and not wait:
            raise ValueError("mark_done=True needs wait=True; with wait=False call fut.result() and then "
                             "store.mark_done(start, stop)")
        if rows.dtype != self._np_dtype:
            if rows.dtype.kind not in "fiu" and rows.dtype != np.dtype(ml_dtypes.bfloat16):
                raise ValueError(f"rows must be a float array, got dtype {rows.dtype}")
            cast = rows.astype(np.float32, copy=False).astype(self._np_dtype)
        else:
            cast = np.array(rows, copy=True) if not wait else rows
        cast = np.ascontiguousarray(cast)
        if self._files is not None and stop > start:
            for c in range(start // self.chunk_rows, (stop - 1) // self.chunk_rows + 1):
                self._drop_sum(c)   # rewritten: its checksum is taken again when its rows are marked done
        fut = self._grads[start:stop].write(cast)
        if not wait:
            return fut
        fut.result()
        if mark_done:
            self.mark_done(start, stop)
        return None

    def mark_done(self, start: int, stop: int) -> None:
        """Record rows [start, stop) as complete. Call only after their data write has committed."""
        start, stop = self._check_range(start, stop)
        if stop > start:
            self._done[start:stop].write(np.ones(stop - start, dtype=np.uint8)).result()
            self._record_sums(start, stop)

    def done_mask(self) -> np.ndarray:
        """bool [num_rows]: True where the row's gradient is stored (read fresh from disk)."""
        return np.asarray(self._done.read().result()) != 0

    def num_done(self) -> int:
        return int(self.done_mask().sum())

    def is_complete(self) -> bool:
        """Every row marked done and (local stores) every chunk file present with its size: a chunk file
        lost after logging makes the store incomplete (see :meth:`check_chunks`, :meth:`repair`)."""
        return bool(self.done_mask().all()) and not self._bad_chunks()

    def pending_blocks(self, block_rows: int | None = None) -> list[tuple[int, int]]:
        """Chunk-aligned (start, stop) blocks of ``block_rows`` (default chunk_rows) not all done."""
        br = self.chunk_rows if block_rows is None else int(block_rows)
        if br <= 0:
            raise ValueError("block_rows must be positive")
        mask = self.done_mask()
        return [(s, min(s + br, len(self))) for s in range(0, len(self), br)
                if not mask[s:s + br].all()]

    def iter_blocks(self, block_rows: int | None = None, start: int = 0,
                    stop: int | None = None, *, native: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(block_start, float32 [rows, dim])`` over [start, stop) in order (``native=True``: in
        the stored dtype, as :meth:`read`).

        Through tensorstore, the read of the next block is issued before the current one is yielded
        (prefetch), so disk reads overlap the caller's compute; a local uncompressed store is read
        straight from its chunk files (faster than tensorstore's prefetched reads from the page cache).
        ``block_rows`` defaults to ``chunk_rows``.
        """
        start, stop = self._check_range(start, len(self) if stop is None else stop)
        br = self.chunk_rows if block_rows is None else int(block_rows)
        if br <= 0:
            raise ValueError("block_rows must be positive")
        if start >= stop:
            return
        if self._files is not None:
            for s in range(start, stop, br):
                yield s, self.read(s, min(s + br, stop), native=native)
            return
        fut = self._grads[start:min(start + br, stop)].read()
        s = start
        while s < stop:
            nxt = s + br
            cur = fut
            if nxt < stop:
                fut = self._grads[nxt:min(nxt + br, stop)].read()
            yield s, aligned(cur.result(), None if native else np.float32)
            s = nxt

    def record_skipped(self, rows_idx, ids) -> None:
        """Record rows written as zeros because their gradients were not finite (``log_gradients(...,
        nonfinite="skip")``): one JSON file per block under ``skipped/`` beside the arrays (writers own
        disjoint blocks, so files never collide)."""
        if self._loc.local is None:
            raise StoreError("nonfinite='skip' needs a local store (the skipped rows are recorded in files)")
        d = os.path.join(self._loc.local, "skipped")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{int(rows_idx[0])}.json"), "w") as f:
            json.dump({"rows": [int(r) for r in rows_idx],
                       "ids": [v.item() if hasattr(v, "item") else v for v in ids]}, f)

    def skipped_rows(self) -> np.ndarray:
        """Rows stored as zeros by ``log_gradients(..., nonfinite="skip")`` (their gradients held NaN / inf)."""
        d = None if self._loc.local is None else os.path.join(self._loc.local, "skipped")
        rows: list[int] = []
        if d and os.path.isdir(d):
            for name in os.listdir(d):
                if name.endswith(".json"):
                    with open(os.path.join(d, name)) as f:
                        rows += json.load(f)["rows"]
        return np.asarray(sorted(rows), np.int64)

    def nbytes_on_disk(self) -> int | None:
        """Total bytes of the store's own files (local stores; None for remote kvstores)."""
        return self._loc.nbytes()

    def info(self) -> dict:
        mask = self.done_mask()
        return {
            "path": self.path,
            "manifest": self.manifest,
            "num_rows": len(self),
            "dim": self.dim,
            "dtype": self.dtype,
            "rows_done": int(mask.sum()),
            "rows_total": len(self),
            "complete": bool(mask.all()),
            "bytes_on_disk": self.nbytes_on_disk(),
        }

    def __repr__(self) -> str:
        return (f"GradientStore(path={self.path!r}, num_rows={len(self)}, dim={self.dim}, "
                f"dtype={self.dtype!r}, chunk_rows={self.chunk_rows})")


def open_store(path, *, timeout: float = 0.0) -> GradientStore:
    """Open an existing store created by this or another process (no shape needed)."""
    return GradientStore.open(path, timeout=timeout)
