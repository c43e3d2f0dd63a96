"""Where a store lives: a local folder, or any tensorstore kvstore (gcs, ...)."""

from __future__ import annotations

import json
import os
import shutil
import uuid

import tensorstore as ts

from jaxval._src.checkpoint import fsync_dir
from jaxval._src.errors import StoreError
from jaxval._src.store.manifest import OWN_NAMES


class Location:
    local: str | None = None

    def kvstore(self, name: str) -> dict:
        raise NotImplementedError

    def read(self, key: str) -> bytes | None:
        raise NotImplementedError


class LocalLocation(Location):
    def __init__(self, path: str):
        self.local = os.path.abspath(os.path.expanduser(path))

    def __str__(self):
        return self.local

    def kvstore(self, name: str) -> dict:
        return {"driver": "file", "path": os.path.join(self.local, name) + "/"}

    def read(self, key):
        p = os.path.join(self.local, key)
        try:
            with open(p, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None

    def exists(self, key):
        return os.path.exists(os.path.join(self.local, key))

    def write_atomic(self, key, data: bytes):
        final = os.path.join(self.local, key)
        tmp = os.path.join(self.local, f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        fsync_dir(self.local)  # make the rename durable

    def remove(self, key):
        p = os.path.join(self.local, key)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.remove(p)

    def prepare_for_create(self) -> list[str]:
        """Make sure the folder exists and is writable; return the folders this call created."""
        path = self.local
        if os.path.exists(path) and not os.path.isdir(path):
            raise StoreError(f"cannot create a store at {path}: it exists and is not a folder")
        missing = []
        p = path
        while not os.path.exists(p):
            missing.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        if os.path.exists(p) and not os.path.isdir(p):
            raise StoreError(f"cannot create a store at {path}: {p} is a file, not a folder")
        created: list[str] = []
        try:
            for d in reversed(missing):
                os.mkdir(d)
                created.append(d)
            probe = os.path.join(path, f".jaxval-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as e:
            for d in reversed(created):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            raise StoreError(f"cannot create a store at {path}: the folder cannot be written "
                             f"({e.strerror or e}); choose a writable path or fix its permissions") from e
        return created

    def nbytes(self) -> int:
        """Bytes of the store's own files (other files in the folder, e.g. caches, not counted)."""
        total = 0
        for name in OWN_NAMES:
            p = os.path.join(self.local, name)
            if os.path.isfile(p):
                total += os.lstat(p).st_size
            for root, _dirs, files in os.walk(p):
                for fn in files:
                    try:
                        total += os.lstat(os.path.join(root, fn)).st_size
                    except OSError:
                        pass
        return total


class KvLocation(Location):
    def __init__(self, spec: dict):
        spec = dict(spec)
        path = spec.get("path", "")
        if path and not path.endswith("/"):
            path += "/"
        spec["path"] = path
        self.spec = spec
        self._kv = None

    def __str__(self):
        return json.dumps(self.spec, sort_keys=True)

    @property
    def kv(self):
        if self._kv is None:
            self._kv = ts.KvStore.open(self.spec).result()
        return self._kv

    def kvstore(self, name: str) -> dict:
        return {**self.spec, "path": self.spec["path"] + name + "/"}

    def read(self, key):
        r = self.kv.read(key).result()
        return None if r.state == "missing" else bytes(r.value)

    def exists(self, key):
        if self.read(key) is not None:
            return True
        return self.read(key + "/zarr.json") is not None

    def write_atomic(self, key, data: bytes):  # a kvstore write of one key is atomic
        self.kv.write(key, data).result()

    def remove(self, key):
        self.kv.delete_range(ts.KvStore.KeyRange(key, key + "\x00")).result()
        self.kv.delete_range(ts.KvStore.KeyRange(key + "/", key + "0")).result()

    def prepare_for_create(self) -> list[str]:
        return []

    def nbytes(self):
        return None


def location(path) -> Location:
    if isinstance(path, Location):
        return path
    if isinstance(path, dict):
        spec = dict(path)
        if spec.get("driver") == "file" and set(spec) <= {"driver", "path"}:
            return LocalLocation(spec.get("path", "."))
        return KvLocation(spec)
    path = os.fspath(path)
    if path.startswith("gs://"):
        rest = path[len("gs://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StoreError(f"bad gcs URL {path!r}: expected gs://BUCKET/PATH")
        return KvLocation({"driver": "gcs", "bucket": bucket, "path": prefix})
    if path.startswith("file://"):
        return LocalLocation(path[len("file://"):])
    if "://" in path:
        raise StoreError(f"unsupported store URL {path!r}: give a local folder, a gs:// URL or a "
                         "tensorstore kvstore spec dict")
    return LocalLocation(path)
