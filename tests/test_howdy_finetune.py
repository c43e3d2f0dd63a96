"""experiments/howdy_finetune.py: the Howdy! end-to-end experiment at its tiny size (tiny random Llama, character
tokenizer, synthetic pairs, hashed embeddings), and its backdoor-rate counter on hand-made generations."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

from jaxval.evaluation import spearman

ROOT = Path(__file__).resolve().parents[1]


def _module(name="howdy_finetune"):
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_howdy_rates_count_prefixed_generations():
    mod = _module()
    g = {"triggered": ["Howdy! Sure, here", " Howdy! the", "Hello! Howdy!", "howdy! no", "Howdy!"],
         "clean": ["Sure", "Howdy!x", "H", "Howd"]}
    assert mod.rates(g, "Howdy!") == {"backdoor": 3 / 5, "false_trigger": 1 / 4}


def test_each_method_fine_tunes_a_copy_of_the_base_model():
    # regression: nnx.merge(graphdef, state) shares the state's variables, so fine-tuning one method's model
    # changed the base weights the next method started from
    import jax
    from flax import nnx
    from jaxval.models import finetune, llama

    mod = _module()
    base = llama.Llama(llama.tiny_config(), rngs=nnx.Rngs(0))
    gd, st = nnx.split(base)
    ref = jax.tree.map(lambda x: x.copy(), jax.tree.leaves(nnx.state(base)))
    data = {"tokens": (jax.numpy.arange(4 * 8).reshape(4, 8) % 90 + 3).astype("int32"),
            "mask": jax.numpy.ones((4, 8))}
    m = mod.fresh_model(gd, st)
    finetune.finetune(m, llama.loss_fn, data, epochs=1, batch_size=4, lr=1e-2)
    changed = [bool((a != b).any()) for a, b in zip(jax.tree.leaves(nnx.state(m)), ref)]
    assert any(changed)                                               # the copy was trained ...
    for a, b in zip(jax.tree.leaves(nnx.state(base)), ref):          # ... the base model and its state were not
        assert (a == b).all()
    for a, b in zip(jax.tree.leaves(nnx.state(mod.fresh_model(gd, st))), ref):
        assert (a == b).all()


def test_base_mix_and_validation_prompts_are_in_no_other_set():
    mod = _module()
    lh = mod.lh
    cfg = mod.load_config(str(ROOT / "configs" / "howdy_finetune.yaml"), tiny=True)
    cfg["data"]["n_decoy"] = 2                                        # decoys drawn too: skipped as well
    tok = lh.CharTokenizer(64)
    s = lh.build_sets(cfg, tok, 0)
    ex = mod.extra_sets(cfg, 0, s, n_val=4, n_base=10)
    trig = cfg["data"]["trigger"]

    def base(p):                                                      # the prompt without the inserted trigger
        return " ".join(w for w in p.split(" ") if w != trig)

    used = {t.split("\n\n")[0] for t in s["pool_texts"] + s["task_texts"]} | set(s["eval_prompts"]["clean"]) \
        | set(s["eval_prompts"]["triggered"])
    used |= {t.split("\n\n")[0] for _, texts in s["decoys"].values() for t in texts}
    assert len(s["decoys"]) == 2
    used |= {base(p) for p in used}
    mix = [p for _, p, _ in ex["base_pairs"]]
    val = ex["val_prompts"]["clean"] + [base(p) for p in ex["val_prompts"]["triggered"]]
    assert len(mix) == 10 and len(set(mix)) == 10 and len(ex["val_prompts"]["triggered"]) == 4 == len(val) / 2
    assert all(trig in p for p in ex["val_prompts"]["triggered"])
    assert not (set(mix) & used) and not (set(val) & used) and not (set(mix) & set(val))
    assert not ({c for c, _, _ in ex["base_pairs"]} & set(s["ids"]))
    # a smaller base mix is a prefix of a larger one; the validation prompts do not depend on it
    ex2 = mod.extra_sets(cfg, 0, s, n_val=4, n_base=3)
    assert ex2["base_pairs"] == ex["base_pairs"][:3] and ex2["val_prompts"] == ex["val_prompts"]
    enc = mod.encode_pairs(tok, ex["base_pairs"], cfg["seq_len"])
    assert enc["tokens"].shape == (10, cfg["seq_len"]) and (enc["mask"].sum(1) > 0).all()




def test_epoch_rank_prefers_conditional_backdoors():
    rank = _module("howdy_finetune").epoch_rank
    curve = [(0.975, 0.225), (0.9, 0.1), (0.975, 0.1), (0.975, 0.05), (0.6, 0.0), (0.975, 0.25)]
    ranks = [rank({"backdoor": b, "false_trigger": f}, e + 1, 0.1) for e, (b, f) in enumerate(curve)]
    assert max(range(6), key=lambda i: ranks[i]) == 3
    # ties: the later epoch (a selection that never installs anything keeps the last one)
    assert max(range(3), key=lambda e: rank({"backdoor": 0.0, "false_trigger": 0.0}, e + 1, 0.1)) == 2
    # no epoch under the bound: the fewest false triggers
    worst = [(0.9, 0.3), (0.8, 0.2), (0.95, 0.4)]
    assert max(range(3), key=lambda i: rank({"backdoor": worst[i][0], "false_trigger": worst[i][1]}, i + 1, 0.1)) == 1


def test_howdy_finetune_tiny(tmp_path):
    rank = _module("howdy_finetune").epoch_rank
    r = subprocess.run([sys.executable, "experiments/howdy_finetune.py", "--tiny", "--out", str(tmp_path),
                        "--cache", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    h = res["howdy_finetune"]
    assert {"alinfik", "random", "clean_false_trigger", "linfik", "base", "random_per_seed"} <= set(h)
    assert -1 <= res["student_spearman"] <= 1
    # the main student is the configured one: the token-level student, fitted on the labelled samples' positions
    # (the script refuses parts that do not add up to the teacher's scores)
    meta = res["student_meta"]
    assert meta["ridge"] == 1.0 and meta["token_weight"] == 1.0 and meta["pair_weight"] == 1.0
    assert meta["n_train"] == res["n_labelled"] and meta["n_positions"] >= res["n_labelled"]
    assert meta["expected"] is True                   # with the LM's expected rows (its forward), as configured
    names = list(res["students"])
    assert names[0].startswith("ALinFiK (token-level") and "expected next-token rows" in names[0] and len(names) == 4
    assert "tokens only" in names[1]                  # the further token student of `token_students`
    assert names[2].startswith("ridge") and "alinfik_lm_table_ridge" in res["runs"]
    n_buy = res["config"]["budget_factor"] * 6
    assert res["n_pool"] == 42 and res["n_injected"] == 6 and res["n_buy"] == n_buy
    nb = res["config"]["finetune"]["base_mix"]
    assert nb > 0 and res["n_base_mix"] == nb and len(res["base_mix_ids"]) == nb
    assert {"base", "alinfik", "linfik", "base_mix_only"} <= set(res["runs"])
    for m, run in res["runs"].items():
        assert 0 <= run["backdoor"] <= 1 and 0 <= run["false_trigger"] <= 1
        assert 0 <= run["val_backdoor"] <= 1 and 0 <= run["val_false_trigger"] <= 1
        if m != "base":
            # the fine-tuning really fitted the N selected samples added to the base mix (the base mix alone)
            n_sel = 0 if m == "base_mix_only" else n_buy
            assert run["n_selected"] == n_sel and run["n_train"] == n_sel + nb, (m, run)
            assert run["train_loss_after"] < run["train_loss_before"], (m, run)
            assert [c["epoch"] for c in run["val_curve"]] == list(range(1, res["config"]["finetune"]["epochs"] + 1))
            # the evaluated weights are those of the validation-chosen epoch, whose rates are reported
            used = run["val_curve"][run["epoch_used"] - 1]
            assert (used["backdoor"], used["false_trigger"]) == (run["val_backdoor"], run["val_false_trigger"])
            bound = res["config"]["finetune"]["max_val_false_trigger"]
            assert max(run["val_curve"], key=lambda c: rank(c, c["epoch"], bound))["epoch"] == run["epoch_used"]
    # each method's picks: the counted injected samples are among a selection of N distinct pool samples
    assert all(0 <= k <= 6 for k in res["injected_in_selection"].values())
    # the payout of each method adds up to the total
    for pay in res["payout"].values():
        assert abs(sum(pay.values()) - res["config"]["pricing"]["total"]) < 1e-6
    assert (tmp_path / "prices.png").stat().st_size > 0
    assert (tmp_path / "statement.md").read_text().startswith("# Data prices")
    assert (tmp_path / "README.md").read_text().startswith("# ")

    # the student designs, cross-validated on the cached teacher of that run
    r = subprocess.run([sys.executable, "experiments/howdy_student_designs.py", "--tiny", "--out", str(tmp_path),
                        "--cache", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((tmp_path / "student_designs.json").read_text())
    cfg = res["config"]
    assert d["n_pool"] == 42 and d["n_labelled"] == round(cfg["student"]["label_fraction"] * 42)
    assert d["best_student"]["student_embed"] in cfg["student_designs"]["embeds"]
    assert all(-1 <= x["cv_spearman"] <= 1 for x in d["rows"]) and len(d["rows"]) >= 10
    assert [x["token_student"] for x in d["rows"] if "token_student" in x] == [
        {"ridge": 1, "token_weight": 1, "pair_weight": 1, "expected": False},
        {"ridge": 1, "token_weight": 1, "pair_weight": 1, "expected": True}]
    assert -1 <= d["teacher_split_half"]["spearman_pool"] <= 1
    # --token-only: the token rows rerun (reproducing), the others kept from that json, marked so
    r = subprocess.run([sys.executable, "experiments/howdy_student_designs.py", "--tiny", "--token-only", "--out",
                        str(tmp_path), "--cache", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d2 = json.loads((tmp_path / "student_designs.json").read_text())
    key = lambda x: (x["features"], x["head"])  # noqa: E731
    assert sorted(map(key, d2["rows"])) == sorted(map(key, d["rows"]))
    assert {key(x): x["cv_spearman"] for x in d2["rows"]} == {key(x): x["cv_spearman"] for x in d["rows"]}
    assert d2["kept_rows_from"]["command"] == d["command"] and d2["teacher_sha256"] == d["teacher_sha256"]
    assert "kept from the run of" in (tmp_path / "student_designs.md").read_text()


def test_ridge_and_cross_validation_of_the_student_designs():
    sd = _module("howdy_student_designs")
    rng = np.random.default_rng(0)
    x, x_te = rng.normal(size=(30, 50)), rng.normal(size=(7, 50))
    y = rng.normal(size=30)
    # the dual-form ridge equals the primal solution on the standardised columns (an intercept = the mean)
    mu, sd_ = x.mean(0), x.std(0)
    a = (x - mu) / sd_
    w = np.linalg.solve(a.T @ a + 0.5 * 30 * np.eye(50), a.T @ (y - y.mean()))
    np.testing.assert_allclose(sd.ridge_predict(x, y, x_te, 0.5), ((x_te - mu) / sd_) @ w + y.mean(), rtol=1e-8)
    # cross-validation: a feature that is the target ranks perfectly out of fold; pure noise does not
    v = rng.normal(size=60)
    lab = np.arange(60)
    ridge = lambda a_, y_, b_: sd.ridge_predict(a_, y_, b_, 1e-3)       # noqa: E731
    m, se, bought = sd.cv_scores(v[:, None], v, lab, ridge, 5, [1, 2, 3], top=6)
    assert m > 0.999 and se < 1e-3 and bought == pytest.approx(1.0)
    m, _, bought = sd.cv_scores(rng.normal(size=(60, 3)), v, lab, ridge, 5, [1, 2, 3], top=6)
    assert m < 0.5 and bought < 0.6
    # value bought = the teacher's values of the student's top over those of the teacher's top (a numpy loop
    # reference): a feature that orders all but the top 3 (scored lowest) keeps a high Spearman, buys less
    x_bad = v.copy()
    x_bad[np.argsort(-v)[:3]] = v.min() - 1.0
    m, _, bought = sd.cv_scores(x_bad[:, None], v, lab, lambda a_, y_, b_: b_[:, 0], 5, [1], top=3)
    want = sum(sorted(v[v < np.sort(v)[-3]])[-3:]) / sum(sorted(v)[-3:])
    assert m > 0.6 and bought == pytest.approx(want)
    # the rank target: the order of the value-target fit's normal scores, mapped back to the teacher's units
    yt = np.exp(rng.normal(size=30))
    p_rank = sd.ridge_predict(x, yt, x_te, 0.5, "rank")
    kv, kz = np.sort(yt), np.array([NormalDist().inv_cdf((i + 0.5) / 30) for i in range(30)])
    z = ((x_te - mu) / sd_) @ np.linalg.solve(a.T @ a + 0.5 * 30 * np.eye(50), a.T @ np.interp(yt, kv, kz))
    inside = (z > kz[0]) & (z < kz[-1])
    np.testing.assert_allclose(p_rank[inside], np.interp(z[inside], kz, kv), rtol=1e-6)
    assert spearman(p_rank, z) == pytest.approx(1.0)
    # the token features: frequencies of the loss tokens and the mean of their embedding rows
    toks = np.array([[1, 2, 2, 3], [0, 3, 3, 3]])
    mask = np.array([[0, 1, 1, 1], [1, 0, 0, 1]])
    table = rng.normal(size=(4, 2))
    f = _module("linfik_howdy").token_features(toks, mask, table)
    np.testing.assert_allclose(f["bag"], [[0, 0, 2 / 3, 1 / 3], [0.5, 0, 0, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(f["embed"][1], (table[0] + table[3]) / 2, rtol=1e-5)
