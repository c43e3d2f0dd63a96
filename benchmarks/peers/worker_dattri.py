"""dattri (0.3.0, PyTorch CPU) side of the peer benchmark: its own LoGra (``LoGraAttributor``); run under
the peers' venv, driven by run.py over stdin/stdout with the same protocol as worker_logix.py.

dattri's LoGra monkey-patches each nn.Linear's forward with an autograd Function whose backward computes
the per-example projected gradient from the layer's input and output cotangent and returns no weight
gradient (the same algorithm as jaxval). ``proj_dim = 4096`` gives 64 × 64 per layer, rank 64 as the
other sides; layers with a bias get a ones column on the input side (as jaxval and LogIX). Identity
Hessian, gradients offloaded to disk (``offload="disk"``: its on-disk gradient log). Training loss = SUM
over examples and tokens (as the other sides); dattri's query gradients use its own mean cross-entropy
(a scale only)."""

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
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import common  # noqa: E402
import torch_models  # noqa: E402

torch.set_num_threads(int(os.environ.get("PEERS_TORCH_THREADS", os.cpu_count() or 1)))
_zeros = torch.zeros


def _zeros_unpinned(*args, pin_memory=False, **kwargs):
    """dattri's disk offload allocates its write buffers with ``pin_memory=True``, which raises on a torch
    without an accelerator; on CPU pinning means nothing, so the flag is dropped."""
    return _zeros(*args, **kwargs)


torch.zeros = _zeros_unpinned
logging.getLogger("dattri").setLevel(logging.WARNING)
S: dict = {}


class _SeqLogits(nn.Module):
    """Language models as dattri's query path wants them: ``model(inputs)`` -> logits [B, V, T], so that
    its ``cross_entropy(outputs, targets[B, T])`` is the next-token loss."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, tokens):
        return self.lm(tokens).transpose(1, 2)


def _dataset(workload, batches):
    if common.WORKLOADS[workload]["kind"] in ("token", "llama"):
        tok = torch.from_numpy(np.concatenate([b["tokens"] for b in batches])).long()
        return TensorDataset(tok[:, :-1].contiguous(), tok[:, 1:].contiguous())
    x = torch.from_numpy(np.concatenate([b["x"] for b in batches]))
    y = torch.from_numpy(np.concatenate([b["y"] for b in batches])).long()
    return TensorDataset(x, y)


def _sum_ce(model, batch, device="cpu"):
    x, y = batch
    return F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum")


def setup(workload, weights, rank=64, n_log=128, n_score=1024, q=64, seed=0, root="/tmp/peers_dattri"):
    import dattri
    w = common.WORKLOADS[workload]
    lm, loss_fn = torch_models.build(workload, weights)
    ref, _ = torch_models.build(workload, weights)
    model = _SeqLogits(lm) if w["kind"] in ("token", "llama") else lm
    bs = w["batch"]
    loaders = {k: DataLoader(_dataset(workload, common.batches(workload, n, seed=s, split=sp)), batch_size=bs,
                             shuffle=False)
               for k, n, s, sp in (("log", n_log, 1, "train"), ("score", n_score, 2, "train"),
                                   ("q", q, 3, "test"))}
    with torch.no_grad():
        loss0 = float(loss_fn(ref, {k: torch.from_numpy(np.asarray(v))
                                    for k, v in common.batches(workload, n_log, seed=1)[0].items()}).sum())
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
              and (w.get("layers") is None or w["layers"] in n)]
    S.update(workload=workload, model=model, ref=ref, ref_loss=loss_fn, loaders=loaders, root=root, rank=rank,
             layers=layers, dattri=dattri, runs=0,
             log_b=[{k: torch.from_numpy(np.asarray(v)) for k, v in b.items()}
                    for b in common.batches(workload, n_log, seed=1)])
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    warm = _attributor()
    warm.cache(DataLoader(torch.utils.data.Subset(loaders["log"].dataset, range(bs)), batch_size=bs))
    dim = int(warm.total_proj_dim)
    shutil.rmtree(warm.cache_dir, ignore_errors=True)
    return {"loss0": loss0, "torch": torch.__version__, "dattri": dattri.__version__ if hasattr(dattri, "__version__")
            else "0.3.0", "threads": torch.get_num_threads(), "dim": dim, "layers": layers,
            "params": int(sum(p.numel() for p in ref.parameters()))}


def _attributor():
    from dattri.algorithm import LoGraAttributor
    from dattri.task import AttributionTask
    S["runs"] += 1
    cache = os.path.join(S["root"], f"run{S['runs']}")
    shutil.rmtree(cache, ignore_errors=True)
    task = AttributionTask(loss_func=_sum_ce, model=S["model"], checkpoints=S["model"].state_dict())
    a = LoGraAttributor(task, layer_names=S["layers"], hessian="Identity", proj_dim=S["rank"] ** 2,
                        offload="disk", cache_dir=cache)
    a._setup_compressors = lambda loader: _setup_compressors(a, loader)
    return a


def _setup_compressors(a, loader):
    """dattri 0.3.0 indexes the sample batch twice (``batch[0]`` in the attributor, ``inputs[0]`` again in
    ``setup_model_compressors``), so for (inputs, targets) batches it sizes the projections on ONE example
    (a 1-D input: IndexError for the MLP). Same call, the batch's inputs wrapped once more."""
    from dattri.algorithm.block_projected_if.core.compressor import setup_model_compressors
    x = next(iter(loader))[0]
    a.compressors = setup_model_compressors(a.model, a.layer_names, sparsifier_kwargs=a.sparsifier_kwargs,
                                            projector_kwargs=a.projector_kwargs, sample_inputs=[x],
                                            device=a.device)


def train(n=4):
    return torch_models.train_step_times(S["ref"], S["ref_loss"], S["log_b"], n)


def _cache(loader):
    a = _attributor()
    t0 = time.perf_counter()
    a.cache(loader)
    dt = time.perf_counter() - t0
    n = len(loader.dataset)
    return a, {"seconds": dt, "n": n, "examples_per_s": n / dt, "disk_bytes": common.du(a.cache_dir),
               "apparent_bytes": common.apparent(a.cache_dir), "bytes_per_example": common.du(a.cache_dir) / n}


def log(path=None):
    a, out = _cache(S["loaders"]["log"])
    shutil.rmtree(a.cache_dir, ignore_errors=True)
    return out


def score_prep(path=None):
    a, out = _cache(S["loaders"]["score"])
    t0 = time.perf_counter()
    a.compute_ifvp()        # identity Hessian: dattri copies the gradients as its "IFVP" log (untimed in scoring)
    out["ifvp_copy_s"] = time.perf_counter() - t0
    out["bytes_per_example_with_ifvp"] = common.du(a.cache_dir) / out["n"]
    gq, mapping = a._compute_test_gradients(S["loaders"]["q"])
    a._compute_test_gradients = lambda loader: (gq, mapping)    # scoring times the train side, as the others
    S["score_attr"] = a
    return out


def score(mode="dot"):
    a = S["score_attr"]
    t0 = time.perf_counter()
    s = a.attribute(S["loaders"]["score"], S["loaders"]["q"])
    dt = time.perf_counter() - t0
    return {"seconds": dt, "shape": list(s.T.shape), "checksum": float(s.abs().sum())}


if __name__ == "__main__":
    common.serve(dict(setup=setup, train=train, log=log, score_prep=score_prep, score=score))
