"""Experiment 2: MLP 784-512-256-10 on Fashion-MNIST — LDS of LoGra vs un-projected EK-FAC and baselines.

    python experiments/lds_fmnist.py --config configs/lds_fmnist.yaml [--tiny] [--out DIR]

Every model (the one attributed and each retrained one) is trained by the same vmapped program: Adam,
batches drawn with replacement from its subset, fresh initialisation from its seed.
"""

import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from jaxval.evaluation import retraining as ev  # noqa: E402
from jaxval.data import load_idx_dataset  # noqa: E402
from jaxval.models.mlp import MLP, loss_fn  # noqa: E402


def sample_fn(m, b, keys):
    return {"x": b["x"], "y": jax.vmap(jax.random.categorical)(keys, m(b["x"])).astype(jnp.int32)}


def eval_fn(m, d):
    return {"loss": loss_fn(m, d), "correct": jnp.argmax(m(d["x"]), -1) == d["y"]}


def last_hidden(m, b):
    x = b["x"]
    for layer in list(m.layers)[:-1]:
        x = m.activation(layer(x))
    return x


def main():
    cfg = common.parse(__doc__.splitlines()[0], "configs/lds_fmnist.yaml")
    d = load_idx_dataset(cfg.get("data", "fashion-mnist"))
    n, q = cfg["n_train"], cfg["n_queries"]
    train = {"x": d["x_train"][:n], "y": d["y_train"][:n]}
    queries = {"x": d["x_test"][:q], "y": d["y_test"][:q]}
    sizes = tuple(cfg["sizes"])

    def make(rngs):
        return MLP(sizes, rngs=rngs)

    tcfg = ev.RetrainConfig(**cfg["train"])
    with ev.Cost() as c:
        model = ev.fit(make, loss_fn, train, tcfg, seed=0)
    acc = float(jnp.mean(eval_fn(model, {"x": d["x_test"][:2000], "y": d["y_test"][:2000]})["correct"]))
    common.run(cfg, model=model, make_model=make, loss_fn=loss_fn, train=train, queries=queries, retrain_cfg=tcfg,
               eval_fn=eval_fn, precond_kw={"sample_fn": sample_fn, **cfg["precond"]}, features_fn=last_hidden,
               title="Experiment 2: MLP on Fashion-MNIST",
               extra={"model_info": f"MLP {'-'.join(map(str, cfg['sizes']))} (ReLU), Adam lr {tcfg.lr}, "
                                    f"{tcfg.steps} steps of {tcfg.batch_size}; test accuracy {acc:.3f} "
                                    f"(first 2,000 test images); training one model {c.seconds:.1f} s; "
                                    f"preconditioners: {cfg['precond']}"})


if __name__ == "__main__":
    main()
