"""Shared by the driver and both workers (numpy + stdlib only: imported under jaxval's venv and the
peers' venv alike). Workload shapes, the data (same bits in every framework), the worker protocol."""

from __future__ import annotations

import gzip
import json
import os
import resource
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULT = "@@RESULT "

WORKLOADS = {
    # name: description; the model shapes are fixed in each framework's model definition. n_log, n_score,
    # q: default sizes (examples logged per round, logged for scoring, queries); layers: LoGra on the
    # Linear layers whose name contains it (default every Linear)
    "token": dict(kind="token", vocab=1000, d=256, n_block=4, hidden=1024, batch=16, seq=128,
                  n_log=128, n_score=1024, q=64),
    "fmnist": dict(kind="mlp", sizes=(784, 512, 256, 10), batch=256, n_log=2048, n_score=8192, q=64),
    # SmolLM2-135M-Instruct (real weights), the 90 MLP projections as in the LoGra paper; random tokens
    "smollm2": dict(kind="llama", vocab=49152, batch=4, seq=128, layers="mlp", n_log=32, n_score=32, q=8),
}


def data_dir() -> Path:
    env = os.environ.get("JAXVAL_DATA")
    if env:
        return Path(env)
    for p in (Path("/work/shared/data"), HERE.parents[2] / "shared" / "data"):
        if p.exists():
            return p
    raise FileNotFoundError("set JAXVAL_DATA to the folder holding fashion-mnist/")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def batches(workload: str, n: int, seed: int, split: str = "train"):
    """``n`` examples as a list of numpy batches (dicts) of the workload's batch size."""
    w = WORKLOADS[workload]
    b = w["batch"]
    out = []
    if w["kind"] in ("token", "llama"):
        rng = np.random.default_rng(seed)
        tok = rng.integers(0, w["vocab"], size=(n, w["seq"]), dtype=np.int32)
        for s in range(0, n, b):
            t = tok[s:s + b]
            out.append({"tokens": t, "mask": np.ones(t.shape, np.float32)})
    else:
        name = "train" if split == "train" else "t10k"
        x = _idx(data_dir() / "fashion-mnist" / f"{name}-images-idx3-ubyte.gz")
        y = _idx(data_dir() / "fashion-mnist" / f"{name}-labels-idx1-ubyte.gz")
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(y))[:n]
        xs = (x[idx].reshape(n, -1).astype(np.float32) / 255.0 - 0.2860) / 0.3530
        ys = y[idx].astype(np.int32)
        for s in range(0, n, b):
            out.append({"x": xs[s:s + b], "y": ys[s:s + b]})
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def du(path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for fn in files:
            total += os.stat(os.path.join(root, fn)).st_blocks * 512
    return total


def apparent(path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for fn in files:
            total += os.path.getsize(os.path.join(root, fn))
    return total


def serve(handlers: dict):
    """Worker loop: one JSON command per stdin line -> one ``@@RESULT {json}`` line on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr          # libraries' prints go to stderr, results stay parseable
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            break
        try:
            res = handlers[op](**cmd)
        except Exception as e:  # report, keep serving
            import traceback
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        res = dict(res or {})
        res.setdefault("peak_rss_mb", peak_rss_mb())
        out.write(RESULT + json.dumps(res) + "\n")
        out.flush()
