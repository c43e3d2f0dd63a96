"""The main job: which training digits made the model say what it says about a test digit?

Trains an MLP on scikit-learn's bundled digits, computes LoGra gradients of the training and test
sets, fits an EK-FAC preconditioner, and scores every test example against every training example with
each candidate method (gradient dot product, cosine, EK-FAC dot product, EK-FAC cosine). Each method is
measured by how often a test digit's top proponent has the test digit's label; the best one (ties: the
agreement over the top 5 proponents, then the first in that order) is the one the picture shows: the top
proponents and opponents of three test digits.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxval as jv
from jaxval import LoGra
from jaxval.models import mlp
from jaxval._src.train import train


def _load_digits(seed: int):
    try:
        from jaxval.data.digits import load_digits
        return load_digits(test_fraction=0.2, seed=seed)
    except ImportError:  # pragma: no cover - the loader module is part of the package
        raise


METHODS = (("gradient dot product", "identity", "dot"), ("cosine", "identity", "cosine"),
           ("EK-FAC dot product", "ekfac", "dot"), ("EK-FAC cosine", "ekfac", "cosine"))


def label_agreement(scores: np.ndarray, y_train: np.ndarray, y_test: np.ndarray, k: int = 1) -> float:
    """Share of (test digit, top-k proponent) pairs with the same label."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(y_train[top] == y_test[:, None]))


def plot(images_test, images_train, y_test, y_train, queries, top, bottom, scores, path: str,
         method: str = "gradient dot product", agreement: dict | None = None):
    from jaxval.evaluation.plots import pyplot

    plt = pyplot()

    k = top.shape[1]
    fig, axes = plt.subplots(len(queries), 2 * k + 1, figsize=(1.3 * (2 * k + 1), 1.9 * len(queries)))
    for r, q in enumerate(queries):
        ax = axes[r, 0]
        ax.imshow(images_test[q], cmap="gray_r")
        ax.set_title(f"test #{q}\nlabel {y_test[q]}", fontsize=8, color="navy")
        for j in range(k):
            for col, idx, color in ((1 + j, top[r, j], "green"), (1 + k + j, bottom[r, j], "firebrick")):
                a = axes[r, col]
                a.imshow(images_train[idx], cmap="gray_r")
                a.set_title(f"y={y_train[idx]}  {scores[q, idx]:+.2g}", fontsize=7, color=color)
    for a in axes.ravel():
        a.set_xticks([])
        a.set_yticks([])
    why = "" if not agreement else (
        f"\n{method}: the best method here by how often the top proponent has the test digit's label ("
        + ", ".join(f"{n} {v['top1']:.1%}" for n, v in agreement.items()) + ")")
    fig.suptitle(f"LoGra influence ({method}): each test digit | top proponents (green) | "
                 f"top opponents (red){why}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: str = "out/demo", rank: int = 64, steps: int = 500, seed: int = 0, k: int = 5,
        queries: tuple[int, ...] | None = None) -> dict:
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    d = _load_digits(seed)
    train_set = {"x": d["x_train"], "y": d["y_train"]}
    test_set = {"x": d["x_test"], "y": d["y_test"]}
    model = mlp.MLP((64, 128, 10), rngs=nnx.Rngs(seed))
    print(f"training an MLP 64-128-10 on {len(d['y_train'])} digits ({steps} steps) ...")
    train(model, mlp.loss_fn, train_set, steps=steps, batch_size=64, lr=3e-3, seed=seed)
    acc = float(np.mean(np.asarray(mlp.predict(model, jnp.asarray(d["x_test"]))) == d["y_test"]))
    print(f"test accuracy {acc:.3f}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logra = LoGra(model, mlp.loss_fn, rank=rank, init="gaussian", seed=seed)
    print(f"LoGra rank {rank}: layers {[l.name for l in logra.layers]}, D = {logra.dim}")
    g_train = logra.grads(model, {k_: jnp.asarray(v) for k_, v in train_set.items()})   # [N, D], one batch
    g_test = logra.grads(model, {k_: jnp.asarray(v) for k_, v in test_set.items()})
    g_train, g_test = (g if isinstance(g, jv.ProjectedGrads) else jv.with_provenance(g, logra, model)
                       for g in (g_train, g_test))   # what the scoring checks against the preconditioner's
    pcs = {"identity": None, "ekfac": jv.fit_preconditioner(logra, model, train_set, kind="ekfac",
                                                             relative_damping=0.1, batch_size=256, progress=False)}
    evaluation, all_scores = {}, {}
    for name, pc, mode in METHODS:
        s = np.asarray(jv.influence(g_test, g_train, precond=pcs[pc], mode=mode, progress=False))
        all_scores[name] = s    # [Q, N]; positive: training on z lowers the test loss
        evaluation[name] = {"top1": label_agreement(s, d["y_train"], d["y_test"], 1),
                            "top5": label_agreement(s, d["y_train"], d["y_test"], 5)}
    print("\nlabel agreement of the top proponent (top 5) per method:")
    for name in evaluation:
        print(f"  {name:<22} {evaluation[name]['top1']:.1%}  ({evaluation[name]['top5']:.1%})")
    method = max(evaluation, key=lambda n: (evaluation[n]["top1"], evaluation[n]["top5"]))
    scores = all_scores[method]

    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    bottom = np.argsort(scores, axis=1, kind="stable")[:, :k]
    same_label = evaluation[method]["top1"]
    if queries is None:  # three test digits of different classes
        queries, seen = [], set()
        for q in range(len(d["y_test"])):
            if d["y_test"][q] not in seen:
                queries.append(q)
                seen.add(d["y_test"][q])
            if len(queries) == 3:
                break
    queries = list(queries)
    for q in queries:
        print(f"\ntest #{q} (label {d['y_test'][q]}):")
        print("  proponents: " + ", ".join(f"#{i} y={d['y_train'][i]} {scores[q, i]:+.3g}" for i in top[q]))
        print("  opponents:  " + ", ".join(f"#{i} y={d['y_train'][i]} {scores[q, i]:+.3g}" for i in bottom[q]))
    png = os.path.join(out_dir, "influence.png")
    plot(d["images_test"], d["images_train"], d["y_test"], d["y_train"], queries, top[queries],
         bottom[queries], scores, png, method=method, agreement=evaluation)
    np.save(os.path.join(out_dir, "scores.npy"), scores)
    summary = {"test_accuracy": acc, "rank": rank, "dim": logra.dim, "n_train": int(g_train.shape[0]),
               "n_test": int(g_test.shape[0]), "method": method, "top_proponent_same_label": same_label,
               "label_agreement": evaluation,
               "seconds": round(time.perf_counter() - t0, 2), "png": png}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{method} (the best of the methods above): the top proponent has the test digit's label for "
          f"{same_label:.1%} of test digits")
    print(f"wrote {png} ({summary['seconds']} s)")
    return summary
