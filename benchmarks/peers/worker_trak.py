"""TRAK (traker 0.3.2, PyTorch CPU) side of the peer benchmark, classification workloads (fmnist); run under
the peers' venv, driven by run.py (``--peer trak``) with the protocol of worker_logix.py.

TRAK's route: per-example gradients of all parameters (``torch.func`` vmap), then a dense Gaussian JL
projection to ``proj_dim`` (on CPU its ``BasicProjector``, generating the projection in blocks), features
stored in float16 by TRAK's default (``use_half_precision``), ``finalize_features`` forms its kernel (Φᵀ Φ)⁻¹.
This worker runs TRAK in float32 (``use_half_precision=False``) unless ``PEERS_TRAK_HALF=1``: on a CPU
without AVX-512 (the 2026-12-02 VM) torch's float16 matmul in TRAK's projector is emulated and one
256-example batch did not finish in 20 minutes; float32 is TRAK's fast route on such a CPU. Logging = TRAKer
set-up + ``featurize`` of N examples + ``finalize_features``; scoring = ``finalize_scores`` of Q queries
already featurized (``score``, untimed, as the other sides' precomputed query gradients).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
import torch_models  # noqa: E402

torch.set_num_threads(int(os.environ.get("PEERS_TORCH_THREADS", os.cpu_count() or 1)))
PROJ_DIM = int(os.environ.get("PEERS_TRAK_PROJ_DIM", "8192"))
HALF = os.environ.get("PEERS_TRAK_HALF", "0") == "1"
S: dict = {}


def _t(b):
    return (torch.from_numpy(np.asarray(b["x"])), torch.from_numpy(np.asarray(b["y"])).long())


def setup(workload, weights, rank=64, n_log=512, n_score=1024, q=64, seed=0, root="/tmp/peers_trak"):
    if common.WORKLOADS[workload]["kind"] != "mlp":
        raise ValueError("the TRAK worker implements the classification workload (fmnist) only")
    model, loss_fn = torch_models.build(workload, weights)
    model.eval()
    log_b = common.batches(workload, n_log, seed=1)
    S.update(model=model, loss_fn=loss_fn, root=root, runs=0,
             log_b=[_t(b) for b in log_b], ref_b=[{k: torch.from_numpy(np.asarray(v)) for k, v in b.items()}
                                                 for b in log_b],
             score_b=[_t(b) for b in common.batches(workload, n_score, seed=2)],
             q_b=[_t(b) for b in common.batches(workload, q, seed=3, split="test")])
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    with torch.no_grad():
        loss0 = float(loss_fn(model, S["ref_b"][0]).sum())
    _featurize(S["log_b"][:1])                                  # warm-up
    return {"loss0": loss0, "torch": torch.__version__, "threads": torch.get_num_threads(), "dim": PROJ_DIM,
            "half_precision": HALF, "params": int(sum(p.numel() for p in model.parameters()))}


def _featurize(batches):
    from trak import TRAKer
    logging.getLogger("TRAK").setLevel(logging.WARNING)
    S["runs"] += 1
    d = os.path.join(S["root"], f"run{S['runs']}")
    n = sum(int(b[0].shape[0]) for b in batches)
    t0 = time.perf_counter()
    tr = TRAKer(model=S["model"], task="image_classification", train_set_size=n, save_dir=d, device="cpu",
                proj_dim=PROJ_DIM, use_half_precision=HALF, logging_level=logging.WARNING)
    tr.load_checkpoint(S["model"].state_dict(), model_id=0)
    for b in batches:
        tr.featurize(batch=b, num_samples=int(b[0].shape[0]))
    tr.finalize_features()
    dt = time.perf_counter() - t0
    return tr, d, {"seconds": dt, "n": n, "examples_per_s": n / dt, "disk_bytes": common.du(d),
                   "bytes_per_example": common.du(d) / n}


def train(n=4):
    return torch_models.train_step_times(S["model"], S["loss_fn"], S["ref_b"], n)


def log(path=None):
    _, d, out = _featurize(S["log_b"])
    shutil.rmtree(d, ignore_errors=True)
    return out


def score_prep(path=None):
    tr, d, out = _featurize(S["score_b"])
    S["trak"], S["n_exp"] = tr, 0
    return out


def score(mode="dot"):
    tr = S["trak"]
    S["n_exp"] += 1
    name = f"q{S['n_exp']}"
    nq = sum(int(b[0].shape[0]) for b in S["q_b"])
    tr.start_scoring_checkpoint(exp_name=name, checkpoint=S["model"].state_dict(), model_id=0, num_targets=nq)
    for b in S["q_b"]:
        tr.score(batch=b, num_samples=int(b[0].shape[0]))
    t0 = time.perf_counter()
    s = tr.finalize_scores(exp_name=name)
    dt = time.perf_counter() - t0
    s = np.asarray(s)
    return {"seconds": dt, "shape": list(s.T.shape), "checksum": float(np.abs(s).sum())}


if __name__ == "__main__":
    common.serve(dict(setup=setup, train=train, log=log, score_prep=score_prep, score=score))
