"""Row ids of a store: all integers (int64) or all strings (a UTF-8 table), unique."""

from __future__ import annotations

import numpy as np

from jaxval._src.errors import StoreError


def encode_ids(ids, num_rows: int):
    """Return ("int", int64 array) or ("str", (uint8 bytes, int64 offsets)); raises on bad/duplicate ids."""
    if ids is None:
        return "int", np.arange(num_rows, dtype=np.int64)
    if isinstance(ids, (str, bytes)):
        raise StoreError("ids must be a sequence with one id per row, not a single string")
    if isinstance(ids, np.ndarray) or (hasattr(ids, "__array__") and not isinstance(ids, (list, tuple))):
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.shape[0] != num_rows:
            raise StoreError(f"ids must be 1-D with num_rows={num_rows} entries, got shape {arr.shape}")
        kind = arr.dtype.kind
        if kind == "O":
            ids = arr.tolist()
    else:
        kind = "O"
    if kind == "O":
        lst = list(ids)
        if len(lst) != num_rows:
            raise StoreError(f"ids must have num_rows={num_rows} entries, got {len(lst)}")
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in lst):
            try:
                arr = np.asarray([int(v) for v in lst], dtype=np.int64)
            except OverflowError as e:
                raise StoreError("integer ids must fit in int64") from e
            kind = "i"
        elif all(isinstance(v, str) for v in lst):
            arr = np.asarray(lst, dtype=object)
            kind = "U"
        else:
            bad = next((v for v in lst if not isinstance(v, str)), None)
            raise StoreError("ids must be all integers or all strings, not a mix or another type "
                             f"(e.g. {bad!r})")
    if kind in "iu":
        if kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise StoreError("integer ids must fit in int64")
        out = arr.astype(np.int64)
        uniq, counts = np.unique(out, return_counts=True)
        if uniq.size != out.size:
            dup = uniq[counts > 1]
            raise StoreError(f"ids must be unique: {dup.size} duplicated value(s), e.g. {int(dup[0])!r}")
        return "int", out
    if kind in "US":
        strs = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr.tolist()]
        seen: set[str] = set()
        for s in strs:
            if s in seen:
                raise StoreError(f"ids must be unique: duplicated id {s!r}")
            seen.add(s)
        enc = [s.encode("utf-8") for s in strs]
        offsets = np.zeros(num_rows + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in enc], dtype=np.int64)
        data = np.frombuffer(b"".join(enc), dtype=np.uint8)
        return "str", (data, offsets)
    raise StoreError(f"ids must be integers or strings, got dtype {arr.dtype}")
