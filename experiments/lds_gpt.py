"""Experiment 3: small character-level GPT on TinyShakespeare — LDS of LoGra vs un-projected EK-FAC.

    python experiments/lds_gpt.py --config configs/lds_gpt.yaml [--tiny] [--out DIR]

Blocks of ``block_len`` characters; the query loss is the summed next-token loss of a held-out block.
No flip-based brittleness test (no single prediction to flip): the removal test instead (the query's loss
increase after removing its top-k proponents vs k random blocks). Character tokenizer fitted on the corpus.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from jaxval.evaluation import retraining as ev  # noqa: E402
from jaxval.data.text import CharTokenizer, load_text, make_blocks  # noqa: E402
from jaxval.models.gpt import GPT, GPTConfig, loss_fn  # noqa: E402


def eval_fn(m, d):
    return {"loss": loss_fn(m, d)}


def main():
    cfg = common.parse(__doc__.splitlines()[0], "configs/lds_gpt.yaml")
    text = load_text(cfg.get("corpus", "tinyshakespeare"))
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    cut = int(0.9 * len(ids))
    bl_ = int(cfg["block_len"])
    train = {k: v[: cfg["n_train"]] for k, v in make_blocks(ids[:cut], bl_).items()}
    held = make_blocks(ids[cut:], bl_)
    step = max(1, len(held["tokens"]) // cfg["n_queries"])  # spread the queries over the held-out text
    queries = {k: v[::step][: cfg["n_queries"]] for k, v in held.items()}
    gcfg = GPTConfig(vocab_size=tok.vocab_size, block_size=bl_, **cfg["gpt"])

    def make(rngs):
        return GPT(gcfg, rngs=rngs)

    tcfg = ev.RetrainConfig(**cfg["train"])
    with ev.Cost() as c:
        model = ev.fit(make, loss_fn, train, tcfg, seed=0)
    from jaxval.models.gpt import param_count

    qloss = float(loss_fn(model, queries).mean()) / (bl_ - 1)
    common.run(cfg, model=model, make_model=make, loss_fn=loss_fn, train=train, queries=queries, retrain_cfg=tcfg,
               eval_fn=eval_fn, precond_kw=cfg["precond"], title="Experiment 3: small GPT on TinyShakespeare",
               extra={"model_info": f"GPT {cfg['gpt']} ({param_count(model)} params, char vocab {tok.vocab_size}), "
                                    f"Adam lr {tcfg.lr}, {tcfg.steps} steps of {tcfg.batch_size} blocks; query "
                                    f"loss {qloss:.3f} nats/char; training one model {c.seconds:.1f} s; "
                                    f"preconditioners: {cfg['precond']}"})


if __name__ == "__main__":
    main()
