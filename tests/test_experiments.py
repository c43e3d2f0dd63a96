"""Each accuracy experiment runs end to end at its config's tiny size (`--tiny`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["lds_logreg", "lds_fmnist", "lds_gpt"])
def test_experiment_tiny(name, tmp_path):
    if name == "lds_fmnist" and not (Path(os.environ.get("JAXVAL_DATA", ROOT.parent / "shared" / "data"))
                                     / "fashion-mnist").exists():
        pytest.skip("Fashion-MNIST not found (set JAXVAL_DATA)")
    if name == "lds_gpt" and not (Path(os.environ.get("JAXVAL_DATA", ROOT.parent / "shared" / "data"))
                                  / "tinyshakespeare").exists():
        pytest.skip("TinyShakespeare not found (set JAXVAL_DATA)")
    r = subprocess.run([sys.executable, f"experiments/{name}.py", "--tiny", "--out", str(tmp_path),
                        "--cache", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / f"{name}.json").read_text())
    assert res["lds"] and all(set(v) == {"mean", "std"} for v in res["lds"].values())
    assert all(c["seconds"] >= 0 for c in res["cost"].values())
    assert (tmp_path / f"{name}.md").read_text().startswith("## ")
    if name == "lds_logreg":
        assert "loo" in res and (tmp_path / f"{name}_brittleness.png").exists()
    if name == "lds_gpt":
        assert set(res["removal"]["curves"]) == {"EK-FAC full", "random"}
        assert (tmp_path / f"{name}_removal.png").exists()


def test_linfik_howdy_tiny(tmp_path):
    """The Howdy! backdoor experiment end to end at its tiny size: tiny random Llama, character tokenizer,
    synthetic pairs, hashed embeddings (no sharegpt/SmolLM2/MiniLM package, no network). The script checks its
    streamed scores against jaxval.linfik.linfik itself (check_against_linfik) and fails if they differ."""
    r = subprocess.run([sys.executable, "experiments/linfik_howdy.py", "--tiny", "--out", str(tmp_path),
                        "--cache", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["n_pool"] == 48 and res["n_injected"] == 8
    assert max(res["check_against_linfik"].values()) < 1e-3
    for tab in (res["precision_pool"], res["precision_heldout"]):
        rows = tab["rows"]
        assert {"LinFiK", "LinFiK layer-normalised", "random (expectation)"} <= set(rows)
        for row in rows.values():
            assert all(0.0 <= p <= 1.0 for p in row["precision"].values())
    assert "ALinFiK (student of LinFiK)" in res["precision_heldout"]["rows"]
    assert res["n_labelled"] + res["n_heldout"] == res["n_pool"]
    assert (tmp_path / "howdy.png").exists()
    assert (tmp_path / "README.md").read_text().startswith("# ")
    # a rerun reuses the cached gradients
    r2 = subprocess.run([sys.executable, "experiments/linfik_howdy.py", "--tiny", "--out", str(tmp_path),
                         "--cache", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "[pool]" not in r2.stdout


def test_linfik_howdy_sharegpt_parser():
    """The item-by-item parser keeps every complete conversation of a truncated JSON list."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("linfik_howdy", ROOT / "experiments" / "linfik_howdy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    items = [{"id": "a", "conversations": [{"from": "human", "value": "hi, [there]"}, {"from": "gpt", "value": "ok"}]},
             {"id": "b", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "q"},
                                           {"from": "gpt", "value": "r"}]},
             {"id": "c", "conversations": [{"from": "human", "value": "no answer"}]},
             {"id": "d", "conversations": [{"from": "human", "value": "cut"}, {"from": "gpt", "value": "lost"}]}]
    text = json.dumps(items, indent=2)
    cut = text[: text.index('"lost"') + 3]            # truncated inside the last item
    got = list(mod.first_pairs(mod.iter_sharegpt_items(cut)))
    assert got == [("a", "hi, [there]", "ok"), ("b", "q", "r")]
    assert len(list(mod.iter_sharegpt_items(text))) == 4
    rng = __import__("numpy").random.default_rng(0)
    assert "TRIG" in mod.insert_trigger("a b c", "TRIG", rng).split(" ")


def test_linfik_wikitext_tiny(tmp_path):
    if not (Path(os.environ.get("JAXVAL_DATA", ROOT.parent / "shared" / "data")) / "wikitext-2").exists():
        pytest.skip("WikiText-2 not found (set JAXVAL_DATA)")
    r = subprocess.run([sys.executable, "experiments/linfik_wikitext.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "README.md").read_text().startswith("# ")
    assert res["n_labelled"] + res["n_heldout"] == res["n_pool"] and res["selection"]
    assert (tmp_path / "stability.png").exists() and (tmp_path / "scatter.png").exists()

