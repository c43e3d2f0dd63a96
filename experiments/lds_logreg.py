"""Experiment 1: multinomial logistic regression on sklearn digits — LOO, LDS and brittleness.

    python experiments/lds_logreg.py --config configs/lds_logreg.yaml [--tiny] [--out DIR]

The model is convex (L2 = the preconditioners' damping), fitted to its optimum by full-batch Nesterov
gradient descent; retrained models (subsets, leave-one-out, brittleness) start from that optimum and
run to the new optimum, so seeds do not matter and one seed per subset suffices.
"""

import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from jaxval.evaluation import retraining as ev  # noqa: E402
from jaxval.data import load_digits  # noqa: E402


class LogReg(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(64, 10, rngs=rngs, kernel_init=nnx.initializers.zeros)

    def __call__(self, x):
        return self.fc(x)


def loss_fn(m, b):
    return -jax.nn.log_softmax(m(b["x"]))[jnp.arange(b["y"].shape[0]), b["y"]]


def sample_fn(m, b, keys):
    return {"x": b["x"], "y": jax.vmap(jax.random.categorical)(keys, m(b["x"])).astype(jnp.int32)}


def eval_fn(m, d):
    logits = m(d["x"])
    return {"loss": loss_fn(m, d), "correct": jnp.argmax(logits, -1) == d["y"]}


def main():
    cfg = common.parse(__doc__.splitlines()[0], "configs/lds_logreg.yaml")
    d = load_digits(seed=0)
    n, q = cfg["n_train"], cfg["n_queries"]
    train = {"x": d["x_train"][:n], "y": d["y_train"][:n]}
    queries = {"x": d["x_test"][:q], "y": d["y_test"][:q]}
    lam = float(cfg["l2"])
    fit_cfg = ev.RetrainConfig(l2=lam, **cfg["fit"])
    model = ev.fit(LogReg, loss_fn, train, fit_cfg)
    acc = float(jnp.mean(eval_fn(model, {"x": d["x_test"], "y": d["y_test"]})["correct"]))
    retrain_cfg = ev.RetrainConfig(l2=lam, **cfg["retrain"])
    precond_kw = {"damping": lam, "sample_fn": sample_fn, **cfg["precond"]}
    common.run(cfg, model=model, make_model=LogReg, loss_fn=loss_fn, train=train, queries=queries,
               retrain_cfg=retrain_cfg, eval_fn=eval_fn, precond_kw=precond_kw, features_fn=lambda m, b: b["x"],
               warm_start=model, title="Experiment 1: logistic regression on digits",
               extra={"model_info": f"64→10 multinomial logistic regression, L2 {lam}, test accuracy {acc:.3f}; "
                                    f"preconditioners: sampled Fisher ({cfg['precond']['num_samples']} labels/example), "
                                    f"damping = L2"})


if __name__ == "__main__":
    main()
