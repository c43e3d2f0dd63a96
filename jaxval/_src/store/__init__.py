"""GradientStore: an on-disk [N, D] matrix of projected per-example gradients (tensorstore zarr3)."""

from jaxval._src.errors import StoreError, StoreNotFoundError
from jaxval._src.store.chunks import aligned, aligned_empty
from jaxval._src.store.gradient_store import GradientStore, open_store
from jaxval._src.store.location import location
from jaxval._src.store.manifest import DTYPES, config_diff, config_hash, default_chunk_rows, normalize_dtype

__all__ = ["DTYPES", "GradientStore", "StoreError", "StoreNotFoundError", "aligned", "aligned_empty", "config_diff",
           "config_hash", "default_chunk_rows", "location", "normalize_dtype", "open_store"]
