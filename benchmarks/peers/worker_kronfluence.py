"""Kronfluence (1.0.1, PyTorch CPU) side of the EK-FAC peer benchmark; run under the peers' venv; driven by
run_kronfluence.py over stdin/stdout.

EK-FAC on the un-projected model, as Kronfluence does it: ``prepare_model`` wraps every nn.Linear,
``Analyzer.fit_all_factors`` (strategy "ekfac": covariances, float64 eigendecomposition, Lambda re-fit; the
factors are written to disk as safetensors) and ``compute_pairwise_scores`` (Q queries x N training
examples; scores written to disk, read back). Train loss and measurement = SUM of the per-example
cross-entropies of the batch (Kronfluence's convention and LogIX's worker's)."""

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

import common  # noqa: E402
import torch_models  # noqa: E402

torch.set_num_threads(int(os.environ.get("PEERS_TORCH_THREADS", os.cpu_count() or 1)))
S: dict = {}


def _stack(batches):
    x = torch.from_numpy(np.concatenate([b["x"] for b in batches]))
    y = torch.from_numpy(np.concatenate([b["y"] for b in batches]).astype(np.int64))
    return torch.utils.data.TensorDataset(x, y)


def setup(workload, weights, n=2048, q=64, root="/tmp/peers_kronfluence", fisher="empirical"):
    if common.WORKLOADS[workload]["kind"] != "mlp":
        raise ValueError("the Kronfluence worker implements the classification (mlp) workloads only")
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.task import Task

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    model, loss_fn = torch_models.build(workload, weights)
    model.eval()
    train_b = common.batches(workload, n, seed=1)
    q_b = common.batches(workload, q, seed=3, split="test")
    with torch.no_grad():
        b0 = {k: torch.from_numpy(v) for k, v in train_b[0].items()}
        loss0 = float(loss_fn(model, b0).sum())
    params = int(sum(p.numel() for p in model.parameters()))   # before prepare_model (it adds 1 per layer)

    class SumCE(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:             # true Fisher: labels drawn from the model
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    model = prepare_model(model, SumCE())
    shutil.rmtree(root, ignore_errors=True)
    analyzer = Analyzer("fmnist", model, SumCE(), cpu=True, disable_tqdm=True, output_dir=root,
                        log_level=logging.WARNING)
    S.update(analyzer=analyzer, train=_stack(train_b), query=_stack(q_b), batch=common.WORKLOADS[workload]["batch"],
             q=q, fisher=fisher, n_fit=0)
    import kronfluence
    return {"loss0": loss0, "n": len(S["train"]), "q": len(S["query"]), "torch": torch.__version__,
            "kronfluence": kronfluence.__version__, "threads": torch.get_num_threads(),
            "params": params}


def _train(warm):
    return torch.utils.data.Subset(S["train"], range(S["batch"])) if warm else S["train"]


def fit(warm=False):
    """``warm``: on the first training batch only (as the jaxval side's warm-up)."""
    from kronfluence.arguments import FactorArguments

    S["n_fit"] += 1
    name = f"ekfac_{S['n_fit']}"
    args = FactorArguments(strategy="ekfac", use_empirical_fisher=S["fisher"] == "empirical")
    t0 = time.perf_counter()
    S["analyzer"].fit_all_factors(factors_name=name, dataset=_train(warm), per_device_batch_size=S["batch"],
                                  factor_args=args, overwrite_output_dir=True)
    dt = time.perf_counter() - t0
    if S.get("factors"):                  # keep one set of factors on disk
        shutil.rmtree(S["analyzer"].factors_output_dir(S["factors"]), ignore_errors=True)
    S["factors"] = name
    lam = S["analyzer"].load_lambda_matrices(name)
    mean_eig = {m: float((lam["lambda_matrix"][m].double() / lam["num_lambda_processed"][m].double()).mean())
                for m in lam["lambda_matrix"]}
    return {"seconds": dt, "mean_eigenvalue": mean_eig,
            "factor_bytes": common.du(S["analyzer"].factors_output_dir(name))}


def score(out, damping=None, warm=False):
    """Pairwise scores [Q, N] -> ``out`` (.npy). ``damping``: None = Kronfluence's heuristic
    (0.1 x mean Lambda per layer), else the absolute damping factor."""
    from kronfluence.arguments import ScoreArguments

    args = ScoreArguments(damping_factor=damping)
    name = "scores"
    t0 = time.perf_counter()
    S["analyzer"].compute_pairwise_scores(
        scores_name=name, factors_name=S["factors"], query_dataset=S["query"], train_dataset=_train(warm),
        per_device_query_batch_size=S["q"], per_device_train_batch_size=S["batch"], score_args=args,
        overwrite_output_dir=True)
    s = S["analyzer"].load_pairwise_scores(name)["all_modules"].numpy()    # computed -> disk -> read back
    dt = time.perf_counter() - t0
    np.save(out, s)
    return {"seconds": dt, "shape": list(s.shape), "path": out}


if __name__ == "__main__":
    common.serve(dict(setup=setup, fit=fit, score=score))
