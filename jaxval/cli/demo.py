"""The main job: which training digits made the model say what it says about a test digit?

Trains an MLP on scikit-learn's bundled digits, computes LoGra gradients of the training and test
sets, scores every test example against every training example by gradient dot product, prints the
top proponents and opponents of three test digits and writes a picture of them.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxval._src.logra import LoGra
from jaxval.models import mlp
from jaxval._src.train import train


def _load_digits(seed: int):
    try:
        from jaxval.data.digits import load_digits
        return load_digits(test_fraction=0.2, seed=seed)
    except ImportError:  # pragma: no cover - the loader module is part of the package
        raise


def batched_grads(logra: LoGra, model, data: dict, batch_size: int, desc: str) -> np.ndarray:
    """LoGra gradients of a dataset, batch by batch, with a progress bar. [N, D] float32."""
    n = len(next(iter(data.values())))
    out = np.empty((n, logra.dim), np.float32)
    with tqdm(total=n, desc=desc, unit="ex", disable=n <= batch_size, leave=False) as bar:
        for s in range(0, n, batch_size):
            batch = {k: jnp.asarray(v[s:s + batch_size]) for k, v in data.items()}
            out[s:s + batch_size] = np.asarray(logra.grads(model, batch))
            bar.update(min(batch_size, n - s))
    return out


def plot(images_test, images_train, y_test, y_train, queries, top, bottom, scores, path: str):
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
    fig.suptitle("LoGra influence (gradient dot product): each test digit | top proponents (green) | "
                 "top opponents (red)", fontsize=9)
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
    g_train = batched_grads(logra, model, train_set, 256, "train grads")
    g_test = batched_grads(logra, model, test_set, 256, "test grads")
    scores = g_test @ g_train.T  # [Q, N]; positive: training on z lowers the test loss

    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    bottom = np.argsort(scores, axis=1, kind="stable")[:, :k]
    same_label = float(np.mean(d["y_train"][top[:, 0]] == d["y_test"]))
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
         bottom[queries], scores, png)
    np.save(os.path.join(out_dir, "scores.npy"), scores)
    summary = {"test_accuracy": acc, "rank": rank, "dim": logra.dim, "n_train": int(g_train.shape[0]),
               "n_test": int(g_test.shape[0]), "top_proponent_same_label": same_label,
               "seconds": round(time.perf_counter() - t0, 2), "png": png}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\ntop proponent has the test digit's label for {same_label:.1%} of test digits")
    print(f"wrote {png} ({summary['seconds']} s)")
    return summary
