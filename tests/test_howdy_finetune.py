"""experiments/howdy_finetune.py: the Howdy! end-to-end experiment at its tiny size (tiny random Llama, character
tokenizer, synthetic pairs, hashed embeddings), and its backdoor-rate counter on hand-made generations."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("howdy_finetune", ROOT / "experiments" / "howdy_finetune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_howdy_rates_count_prefixed_generations():
    mod = _module()
    g = {"triggered": ["Howdy! Sure, here", " Howdy! the", "Hello! Howdy!", "howdy! no", "Howdy!"],
         "clean": ["Sure", "Howdy!x", "H", "Howd"]}
    assert mod.rates(g, "Howdy!") == {"backdoor": 3 / 5, "false_trigger": 1 / 4}


def test_howdy_finetune_tiny(tmp_path):
    r = subprocess.run([sys.executable, "experiments/howdy_finetune.py", "--tiny", "--out", str(tmp_path),
                        "--cache", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    h = res["howdy_finetune"]
    assert {"alinfik", "random", "clean_false_trigger", "linfik", "base", "random_per_seed"} <= set(h)
    assert -1 <= res["student_spearman"] <= 1
    assert res["n_pool"] == 42 and res["n_injected"] == 6 and res["n_buy"] == 12
    for m, run in res["runs"].items():
        assert 0 <= run["backdoor"] <= 1 and 0 <= run["false_trigger"] <= 1
        if m != "base":
            # the fine-tuning really fitted the N selected samples
            assert run["n_train"] == 12 and run["train_loss_after"] < run["train_loss_before"], (m, run)
    # each method's picks: the counted injected samples are among a selection of N distinct pool samples
    assert all(0 <= k <= 6 for k in res["injected_in_selection"].values())
    # the payout of each method adds up to the total
    for pay in res["payout"].values():
        assert abs(sum(pay.values()) - res["config"]["pricing"]["total"]) < 1e-6
    assert (tmp_path / "prices.png").stat().st_size > 0
    assert (tmp_path / "statement.md").read_text().startswith("# Data prices")
    assert (tmp_path / "README.md").read_text().startswith("# ")
