"""The store manifest: format, dtypes, the canonical config hash, the one chunk-size rule, and config diffs."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import ml_dtypes
import numpy as np

from jaxval._src.errors import StoreError

FORMAT = "jaxval.GradientStore"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = ("grads", "done", "ids", "ids_bytes", "ids_offsets")
SUMS = "sums"   # per-chunk checksum records (size and crc32 of each complete chunk file)
OWN_NAMES = (MANIFEST,) + ARRAYS + (SUMS, "skipped")

DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
DTYPE_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "f16": "float16", "half": "float16", "float16": "float16",
    "fp32": "float32", "f32": "float32", "float": "float32", "single": "float32", "float32": "float32",
}
TARGET_CHUNK_BYTES = 8 << 20


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def canonical_json(config: Any) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=_json_default)


def config_hash(config: dict | None) -> str:
    """sha256 (hex) of the canonical JSON (sorted keys, no spaces) of ``config`` ({} for None)."""
    return hashlib.sha256(canonical_json(config or {}).encode("utf-8")).hexdigest()


def normalize_dtype(dtype) -> str:
    if isinstance(dtype, str):
        name = DTYPE_ALIASES.get(dtype.lower())
    else:
        try:
            name = DTYPE_ALIASES.get(np.dtype(dtype).name)
        except TypeError:
            name = None
    if name is None:
        raise StoreError(f"unsupported store dtype {dtype!r}; use one of 'bfloat16', 'float16', 'float32'")
    return name


def default_chunk_rows(dim: int, num_rows: int, itemsize: int, multiple_of: int = 1) -> int:
    """Rows per chunk (one file each) giving ~8 MiB chunks: a power of two, or with ``multiple_of`` (the
    logging batch size) a multiple of it, so that batches never straddle chunk files; at most ``num_rows``."""
    rows = max(1, TARGET_CHUNK_BYTES // max(1, dim * itemsize))
    if multiple_of > 1:
        rows = max(1, rows // multiple_of) * multiple_of
    else:
        rows = 1 << int(math.floor(math.log2(rows)))
    return int(max(1, min(rows, num_rows)))


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like configs differ (for error messages)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{p} (new)")
            elif k not in new:
                out.append(f"{p} (missing)")
            else:
                out += config_diff(old[k], new[k], p)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out += config_diff(a, b, f"{prefix}[{i}]")
        return out
    return [] if old == new else [prefix or "(root)"]


def parse_manifest(raw: bytes, where: str) -> dict:
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"corrupt store manifest at {where}/{MANIFEST}: not valid JSON ({e}). "
                         "Restore it, or re-create the store with overwrite=True") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{where}/{MANIFEST} is not a jaxval GradientStore manifest "
                         f"(format={m.get('format') if isinstance(m, dict) else None!r})")
    try:
        version = int(m.get("format_version", -1))
    except (TypeError, ValueError):
        raise StoreError(f"corrupt store manifest at {where}/{MANIFEST}: format_version is "
                         f"{m.get('format_version')!r}, not an integer. Restore the manifest, or re-create the "
                         "store with overwrite=True") from None
    for key in ("dim", "num_rows", "chunk_rows"):
        v = m.get(key)
        if key in m and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise StoreError(f"corrupt store manifest at {where}/{MANIFEST}: {key} is {v!r}, not a positive "
                             "integer. Restore the manifest, or re-create the store with overwrite=True")
    if "dtype" in m and m["dtype"] not in DTYPES:
        raise StoreError(f"corrupt store manifest at {where}/{MANIFEST}: dtype {m['dtype']!r} is not one of "
                         f"{sorted(DTYPES)}")
    if version > FORMAT_VERSION:
        raise StoreError(f"store at {where} has format version {m['format_version']}, newer than this "
                         f"jaxval supports ({FORMAT_VERSION}); upgrade jaxval")
    missing = [k for k in ("dim", "num_rows", "dtype", "chunk_rows", "ids_kind", "config", "config_hash")
               if k not in m]
    if missing:
        raise StoreError(f"corrupt store manifest at {where}/{MANIFEST}: missing keys {missing}")
    return m
