"""LogIX (logix-ai 0.1.1, PyTorch CPU) side of the peer benchmark; run under the peers' venv with
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1; driven by run.py over stdin/stdout.

LoGra as LogIX does it: add_lora (rank 64, its default kaiming init) on every nn.Linear (or, where the
workload names ``layers``, those whose name contains it: LogIX's name_filter), the gradient of
the zero bottleneck logged per example ({"grad": ["log"]}), loss = SUM over examples and tokens."""

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
# PEERS_AUTOCAST=bfloat16: forward and backward under torch.autocast("cpu", bfloat16) (its matmuls in bf16)
AUTOCAST = os.environ.get("PEERS_AUTOCAST", "") == "bfloat16"
S: dict = {}


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=AUTOCAST)


def _patch_logix_for_bf16():
    """logix-ai 0.1.1's log saver calls ``.numpy()`` on the logged tensors, which raises for bfloat16
    (autocast): hand it float32 copies (what it stores anyway)."""
    import logix.logging.log_saver as log_saver
    to_numpy = log_saver.to_numpy
    log_saver.to_numpy = lambda t: to_numpy(t.float() if t.dtype == torch.bfloat16 else t)


def _t(b):
    return {k: torch.from_numpy(np.asarray(v)) for k, v in b.items()}


def setup(workload, weights, rank=64, n_log=128, n_score=1024, q=64, seed=0, root="/tmp/peers_logix"):
    import logix
    logging.getLogger("LogIX").setLevel(logging.WARNING)
    if AUTOCAST:
        _patch_logix_for_bf16()
    model, loss_fn = torch_models.build(workload, weights)
    ref, _ = torch_models.build(workload, weights)     # plain copy for the training-step reference
    log_b = [_t(b) for b in common.batches(workload, n_log, seed=1)]
    score_b = [_t(b) for b in common.batches(workload, n_score, seed=2)]
    q_b = [_t(b) for b in common.batches(workload, q, seed=3, split="test")]
    with torch.no_grad():
        loss0 = float(loss_fn(ref, log_b[0]).sum())
    layers = common.WORKLOADS[workload].get("layers")
    S.update(model=model, ref=ref, loss_fn=loss_fn, log_b=log_b, score_b=score_b, q_b=q_b, root=root,
             rank=rank, logix=logix, n_runs=0, name_filter=[layers] if layers else None)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    cfg = os.path.join(root, "config.yaml")
    with open(cfg, "w") as f:
        f.write(f"root_dir: {root}\nlogging:\n  flush_threshold: 1000000000\n  num_workers: 1\n"
                f"lora:\n  init: random\n  rank: {rank}\n")
    S["cfg"] = cfg
    run = _new_run("warm")             # adds the LoRA branches to `model` once, warms up
    _log_batches(run, log_b[:1])
    S["lora_dim"] = int(sum(m.logix_lora_B.weight.numel() for m in model.modules()
                            if hasattr(m, "logix_lora_B")))
    return {"loss0": loss0, "torch": torch.__version__, "threads": torch.get_num_threads(), "autocast": AUTOCAST,
            "dim": S["lora_dim"], "params": int(sum(p.numel() for p in ref.parameters()))}


def _new_run(name):
    logix = S["logix"]
    S["n_runs"] += 1
    project = f"{name}_{S['n_runs']}"
    shutil.rmtree(os.path.join(S["root"], project), ignore_errors=True)
    run = logix.LogIX(project, config=S["cfg"])
    run.watch(S["model"], name_filter=S["name_filter"])
    if not S.get("lora_added"):
        run.add_lora()
        S["lora_added"] = True
    run.setup({"grad": ["log"]})
    run.save(True)
    return run


def _log_batches(run, batches, offset=0):
    model, loss_fn = S["model"], S["loss_fn"]
    i = offset
    for b in batches:
        n = int(next(iter(b.values())).shape[0])
        ids = [f"ex{j}" for j in range(i, i + n)]
        i += n
        with run(data_id=ids):
            model.zero_grad()
            with _autocast():
                loss = loss_fn(model, b).sum()
            loss.backward()
    run.finalize()
    run.logger.clear(hook=True, module=False, buffer=False)   # else its hooks stay on the shared model
    return i - offset


def train(n=4):
    return torch_models.train_step_times(S["ref"], S["loss_fn"], S["log_b"], n, AUTOCAST)


def log(path=None):
    t0 = time.perf_counter()
    run = _new_run("log")
    n = _log_batches(run, S["log_b"])
    dt = time.perf_counter() - t0
    d = run.log_dir
    out = {"seconds": dt, "n": n, "examples_per_s": n / dt, "disk_bytes": common.du(d),
           "apparent_bytes": common.apparent(d), "bytes_per_example": common.du(d) / n}
    shutil.rmtree(d, ignore_errors=True)
    return out


def score_prep(path=None):
    t0 = time.perf_counter()
    run = _new_run("score")
    n = _log_batches(run, S["score_b"])
    dt = time.perf_counter() - t0
    S["score_run"] = run
    out = {"seconds": dt, "n": n, "examples_per_s": n / dt, "bytes_per_example": common.du(run.log_dir) / n}
    # query gradients: a non-saving pass over the queries, as LogIX's examples do
    qrun = _new_run("query")           # a fresh instance (reusing the logging one accumulates stale logs)
    qrun.save(False)
    model, loss_fn = S["model"], S["loss_fn"]
    qb = {k: torch.cat([b[k] for b in S["q_b"]]) for k in S["q_b"][0]}
    with qrun(data_id=[f"q{j}" for j in range(len(next(iter(qb.values()))))]):
        model.zero_grad()
        with _autocast():
            loss = loss_fn(model, qb).sum()
        loss.backward()
    S["q_log"] = qrun.get_log(copy=True)
    qrun.logger.clear(hook=True, module=False, buffer=False)
    return out


def score(mode="dot", batch_size=64):
    run = S["score_run"]
    run.log_dataloader = None
    run.log_dataset = None
    loader = run.build_log_dataloader(batch_size=batch_size)
    t0 = time.perf_counter()
    res = run.compute_influence_all(S["q_log"], loader, mode=mode, precondition=False)
    dt = time.perf_counter() - t0
    s = res["influence"]
    return {"seconds": dt, "shape": list(s.shape), "checksum": float(s.abs().sum())}


if __name__ == "__main__":
    common.serve(dict(setup=setup, train=train, log=log, score_prep=score_prep, score=score))
