"""jaxval.models.generate (batched greedy) against the key/value-cached one-prompt decoder of the Llama module,
and jaxval.models.finetune (partial fine-tuning) against a hand-written optax loop over the trained leaves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxval import ConfigError
from jaxval.models import generate, llama
from jaxval.models.finetune import finetune, param_path, trainable_filter


def _tiny(seed=0):
    return llama.Llama(llama.tiny_config(), rngs=nnx.Rngs(seed))


def test_greedy_batch_equals_cached_decoder():
    m = _tiny()
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, m.cfg.vocab_size, size=n)) for n in (5, 9, 1, 9, 3, 7, 10)]
    steps = 6
    ref = [llama.generate_ids(m, p, steps) for p in prompts]          # KV cache, one prompt at a time
    got = generate.greedy(m, prompts, steps, batch_size=4)            # 2 batches, the last one padded
    assert got == ref
    # stop ids: cut after the first stop token (kept), as the reference does
    stop = ref[1][2]
    got_s = generate.greedy(m, prompts, steps, batch_size=4, stop_ids=[stop])
    assert got_s == [llama.generate_ids(m, p, steps, stop_ids=[stop]) for p in prompts]
    assert len(got_s[1]) <= 3 and got_s[1][-1] == stop


def test_greedy_starts_with_equals_generation():
    m = _tiny()
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(3, m.cfg.vocab_size, size=n)) for n in (4, 9, 2, 7, 5)]
    prompts.append(list(prompts[1]))                                  # a duplicate: two hits for its target
    ref = generate.greedy(m, prompts, 3, batch_size=4)
    for i in range(len(prompts)):
        got = generate.greedy_starts_with(m, prompts, ref[i], batch_size=4)
        assert got.tolist() == [r == ref[i] for r in ref]
    assert generate.greedy_starts_with(m, prompts, ref[1][:1], batch_size=4).tolist() == \
        [r[0] == ref[1][0] for r in ref]
    wrong_second = [ref[0][0], (ref[0][1] + 1) % m.cfg.vocab_size, ref[0][2]]      # right first token only
    assert not generate.greedy_starts_with(m, prompts, wrong_second, batch_size=4)[0]


def test_upper_blocks_equal_the_whole_model():
    m = _tiny(2)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, m.cfg.vocab_size, size=(3, 10)).astype(np.int32)
    mask = np.ones((3, 10), np.float32)
    mask[:, :3] = 0
    gd, st = nnx.split(m)

    @jax.jit
    def both(st):
        mm = nnx.merge(gd, st)
        outs = []
        for k in (0, 1, 2):
            h = mm.hidden_after(tokens, k)
            outs.append((mm.from_layer(h, k), llama.upper_loss_fn(llama.Upper(mm, k), {"h": h, "tokens": tokens,
                                                                                       "mask": mask})))
        return mm(tokens), llama.loss_fn(mm, {"tokens": tokens, "mask": mask}), outs

    full, loss, outs = both(st)
    for logits_k, loss_k in outs:
        np.testing.assert_allclose(np.asarray(logits_k), np.asarray(full), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(loss_k), np.asarray(loss), rtol=1e-5)


def test_greedy_errors_and_rate():
    m = _tiny()
    with pytest.raises(ConfigError, match="context"):
        generate.greedy(m, [[1] * 60], 8)
    with pytest.raises(ConfigError, match="at least one token"):
        generate.greedy(m, [[]], 2)
    assert generate.starts_with_rate([" Howdy! hi", "Howdy!", "howdy!", "Hi Howdy!", "Howdy"], "Howdy!") == 0.4
    assert generate.starts_with_rate([" Howdy!"], "Howdy!", strip=False) == 0.0


def test_finetune_trains_only_the_matching_leaves_as_adamw_does():
    m = _tiny(1)
    rng = np.random.default_rng(2)
    n, t = 6, 12
    data = {"tokens": rng.integers(0, m.cfg.vocab_size, size=(n, t)).astype(np.int32),
            "mask": np.ones((n, t), np.float32)}
    data["mask"][:, :4] = 0                                           # loss on the "response" only
    pattern = r"blocks/1/(mlp|attn/o_proj)"
    before = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    mean_loss = jax.jit(lambda gd, st: jnp.mean(llama.loss_fn(nnx.merge(gd, st), data)), static_argnums=0)
    loss0 = float(mean_loss(*nnx.split(m)))

    # independent reference: optax AdamW on the flat dict of matching leaves, full batch (order-free)
    lr, steps = 3e-3, 4
    keys = [k for k in before if __import__("re").search(pattern, k)]
    assert len(keys) == 4

    # the trained leaves, split off by the filter under test: exactly the regex matches, nothing else
    gsub, sub, rest = nnx.split(m, trainable_filter(pattern), ...)
    assert sorted(param_path(p) for p, _ in nnx.to_flat_state(sub)) == sorted(keys)

    def loss_of(sub):
        return jnp.mean(llama.loss_fn(nnx.merge(gsub, sub, rest), data))

    tx = optax.adamw(lr, weight_decay=0.0)
    opt = tx.init(sub)
    grad = jax.jit(jax.grad(loss_of))
    for _ in range(steps):
        upd, opt = tx.update(grad(sub), opt, sub)
        sub = optax.apply_updates(sub, upd)
    sub = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(sub)}

    finetune(m, llama.loss_fn, data, epochs=steps, batch_size=n, lr=lr, trainable=pattern)
    after = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    for k in before:
        if k in keys:
            np.testing.assert_allclose(after[k], np.asarray(sub[k]), rtol=2e-4, atol=2e-6)
            assert not np.array_equal(after[k], before[k])
        else:
            assert np.array_equal(after[k], before[k]), k
    assert float(mean_loss(*nnx.split(m))) < loss0

    with pytest.raises(ConfigError, match="nothing to train"):
        finetune(m, llama.loss_fn, data, epochs=1, batch_size=2, lr=lr, trainable=r"no_such_layer")
    with pytest.raises(ConfigError, match="regular expression"):
        trainable_filter("(")


def _optax_reference(m, data, pattern, tx, bs, epochs, seed):
    """The documented fine-tuning run written out with optax: the leaves matching ``pattern`` updated by ``tx``
    over mini-batches of ``bs`` (a fresh permutation of the rows from ``default_rng(seed)`` each epoch, the
    remainder dropped); the trained leaves after each epoch, by path."""
    n = len(data["tokens"])
    gsub, sub, rest = nnx.split(m, trainable_filter(pattern), ...)
    opt = tx.init(sub)
    grad = jax.jit(jax.grad(lambda p, b: jnp.mean(llama.loss_fn(nnx.merge(gsub, p, rest), b))))
    order_rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        order = order_rng.permutation(n)
        for j in range(n // bs):
            b = {k: v[order[j * bs:(j + 1) * bs]] for k, v in data.items()}
            upd, opt = tx.update(grad(sub, b), opt, sub)
            sub = optax.apply_updates(sub, upd)
        out.append({param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(sub)})
    return out


def test_finetune_on_epoch_sees_each_epoch_of_one_adamw_run():
    # reference: a hand-written optax AdamW loop over mini-batches in the documented order (a fresh permutation
    # of the rows from the seeded generator each epoch, batches of batch_size, the remainder dropped), its
    # weights after each epoch; finetune's on_epoch must see those (one optimiser state through the epochs)
    m = _tiny(3)
    rng = np.random.default_rng(5)
    n, t, bs, epochs, lr, seed = 7, 10, 3, 3, 2e-3, 4
    data = {"tokens": rng.integers(0, m.cfg.vocab_size, size=(n, t)).astype(np.int32),
            "mask": np.ones((n, t), np.float32)}
    pattern = r"blocks/0/mlp"
    ref = _optax_reference(m, data, pattern, optax.adamw(lr, weight_decay=0.01), bs, epochs, seed)

    seen = []

    def on_epoch(e, model):
        flat = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        seen.append((e, {k: flat[k] for k in ref[0]}))

    finetune(m, llama.loss_fn, data, epochs=epochs, batch_size=bs, lr=lr, trainable=pattern, weight_decay=0.01,
             seed=seed, on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1, 2, 3]
    for (_, got), want in zip(seen, ref):
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=2e-6)
    assert not np.allclose(seen[0][1][next(iter(ref[0]))], seen[-1][1][next(iter(ref[0]))])


def test_finetuning_copies_of_one_model_compiles_the_step_once():
    # fine-tuning several copies of one model (the experiments' methods, one after the other) reuses the
    # trainer's compiled step: equal graphs, the same loss, an equal filter of the same pattern, the same settings
    from conftest import CompileCounter

    rng = np.random.default_rng(2)
    data = {"tokens": rng.integers(0, 64, size=(6, 8)).astype(np.int32), "mask": np.ones((6, 8), np.float32)}
    assert trainable_filter(r"blocks/1/") == trainable_filter(r"blocks/1/")
    finetune(_tiny(7), llama.loss_fn, data, epochs=1, batch_size=3, lr=1e-3, trainable=r"blocks/1/")   # compiles
    with CompileCounter() as c:
        for seed in (8, 9):
            m = _tiny(seed)
            before = np.asarray(nnx.state(m, nnx.Param)["blocks"][1]["mlp"]["up_proj"]["kernel"][...]).copy()
            finetune(m, llama.loss_fn, data, epochs=2, batch_size=3, lr=1e-3, trainable=r"blocks/1/", seed=seed)
            after = np.asarray(nnx.state(m, nnx.Param)["blocks"][1]["mlp"]["up_proj"]["kernel"][...])
            assert not np.array_equal(before, after)                  # it trained
    assert c.n == 0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_finetune_schedule_is_optax_adamw_with_that_schedule(schedule):
    # reference: optax.adamw driven by optax's own schedules (warm-up joined to a linear / cosine decay), the
    # documented batch order; finetune(schedule=..., warmup_steps=...) must reach the same weights
    m = _tiny(4)
    rng = np.random.default_rng(6)
    n, t, bs, epochs, lr, seed, warm = 7, 10, 3, 3, 3e-3, 1, 2
    steps = epochs * (n // bs)
    data = {"tokens": rng.integers(0, m.cfg.vocab_size, size=(n, t)).astype(np.int32),
            "mask": np.ones((n, t), np.float32)}
    decay = {"linear": optax.linear_schedule(lr, 0.0, steps - warm),
             "cosine": optax.cosine_decay_schedule(lr, steps - warm)}[schedule]
    sched = optax.join_schedules([optax.linear_schedule(lr / warm, lr, warm - 1), decay], [warm])
    pattern = r"blocks/1/mlp"
    want = _optax_reference(m, data, pattern, optax.adamw(sched, weight_decay=0.01), bs, epochs, seed)[-1]
    constant = _tiny(4)
    finetune(constant, llama.loss_fn, data, epochs=epochs, batch_size=bs, lr=lr, trainable=pattern,
             weight_decay=0.01, seed=seed)
    finetune(m, llama.loss_fn, data, epochs=epochs, batch_size=bs, lr=lr, trainable=pattern, weight_decay=0.01,
             seed=seed, schedule=schedule, warmup_steps=warm)
    got = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    other = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(constant, nnx.Param))}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=2e-6)
        assert not np.allclose(other[k], want[k], rtol=2e-4, atol=2e-6)   # the schedule changed the run
    with pytest.raises(ConfigError, match="schedule"):
        finetune(m, llama.loss_fn, data, epochs=1, batch_size=3, lr=lr, trainable=pattern, schedule="step")
    with pytest.raises(ConfigError, match="warmup_steps"):
        finetune(m, llama.loss_fn, data, epochs=1, batch_size=3, lr=lr, trainable=pattern, warmup_steps=3)
