"""The fine-tuning text LDS experiment (experiments/lds_text_finetune.py) end to end at a tiny size:
the pipeline runs (fine-tune from one start by the vmapped harness, scores, LDS; `pretrain: null` keeps the
random initialisation as the start, one compile fewer), the JSON has the issue's
schema, and the noise ceiling and every method's LDS equal an independent recomputation with scipy from the
saved arrays (masks, measured losses, scores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JAXVAL_DATA", ROOT.parent / "shared" / "data"))


@pytest.mark.skipif(not (DATA / "wikitext-2").exists() or not (DATA / "tinyshakespeare").exists(),
                    reason="WikiText-2 / TinyShakespeare not found (set JAXVAL_DATA)")
def test_lds_text_finetune_tiny(tmp_path):
    stats = pytest.importorskip("scipy.stats")
    cfg = yaml.safe_load((ROOT / "configs" / "lds_text_finetune.yaml").read_text())
    tiny = {**cfg, "data": {**cfg["data"], "pretrain_shakespeare_chars": 4000, "pretrain_wikitext_chars": 4000,
                            "block_len": 8, "n_finetune": 12, "n_queries": 3},
            "gpt": {"d_model": 8, "n_layer": 1, "n_head": 2},
            "pretrain": None,
            "finetune": {**cfg["finetune"], "steps": 2, "batch_size": 4, "chunk": 12},
            "lds": {"subsets": 6, "seeds": 2, "alpha": 0.5},
            "score_batch_size": 4,  # queries padded to one batch shape with the training batches: one compile
            "methods": [{"name": "logra_gaussian_r4_identity", "type": "logra", "rank": 4, "kind": "identity"}],
            "removal": None}
    tiny.pop("tiny")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny))
    # the subprocess inherits conftest's cheap XLA CPU compilation flags through the environment
    r = subprocess.run([sys.executable, "experiments/lds_text_finetune.py", "--config", str(path), "--out",
                        str(tmp_path), "--cache", str(tmp_path / "cache")], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "lds_text_finetune.json").read_text())
    for k in ("command", "machine", "date", "noise_ceiling", "methods"):
        assert k in res
    assert set(res["methods"]) == {"logra_gaussian_r4_identity"}
    for v in res["methods"].values():
        assert {"lds", "se", "seconds"} <= set(v) and v["se"] >= 0 and v["seconds"] >= 0
    assert (tmp_path / "lds_text_finetune.md").read_text().startswith("## ")

    # independent reference: scipy's Spearman over the saved arrays
    a = np.load(tmp_path / "lds_text_finetune_arrays.npz")
    masks, meas, sc = a["masks"].astype(float), a["measured"].astype(float), a["scores/logra_gaussian_r4_identity"].astype(float)
    ceil = np.nanmean([stats.spearmanr(meas[:, 0, j], meas[:, 1, j])[0] for j in range(meas.shape[2])])
    np.testing.assert_allclose(res["noise_ceiling"], ceil, atol=1e-6)
    pred, tgt = -(masks @ sc.T), meas.mean(1)
    per = [stats.spearmanr(pred[:, j], tgt[:, j])[0] for j in range(sc.shape[0])]
    np.testing.assert_allclose(res["methods"]["logra_gaussian_r4_identity"]["lds"], np.nanmean(per), atol=1e-6)


@pytest.mark.skipif(not (DATA / "wikitext-2").exists(), reason="WikiText-2 not found (set JAXVAL_DATA)")
def test_linfik_cost_tiny(tmp_path):
    # the cost table's smoke run: every scorer timed, the speed-up = the fine-tuned student's rate / LinFiK's
    r = subprocess.run([sys.executable, "experiments/linfik_cost.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {x["scorer"]: x for x in res["rows"]}
    assert len(rows) == 7 and all(x["samples_per_s"] > 0 for x in rows.values())
    assert any(name.startswith("ALinFiK student (ridge on the tiny embedding-table") for name in rows)
    assert any(name.startswith("ALinFiK student (token-level:") for name in rows)
    assert any(name.startswith("ALinFiK student (token-level + the LM's expected") for name in rows)
    student = next(x for name, x in rows.items() if name.startswith("ALinFiK student (fine-tuned tiny"))
    linfik = next(x for name, x in rows.items() if name.startswith("LinFiK, GPT tiny"))
    assert linfik["params"] > 0 and linfik["logra_dim"] > 0
    np.testing.assert_allclose(linfik["student_speedup"], student["samples_per_s"] / linfik["samples_per_s"],
                               rtol=0.01)
    assert (tmp_path / "README.md").read_text().startswith("# Cost")
