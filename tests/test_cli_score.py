"""`jaxval log` (train and query splits), `jaxval fit` and `jaxval score` end to end on digits."""

import json

import numpy as np
import yaml

from jaxval.cli.app import main
from jaxval import Preconditioner
from jaxval import GradientStore


def test_log_fit_score_end_to_end(tmp_path):
    cfg = {
        "name": "tiny", "seed": 0,
        "model": {"kind": "mlp", "sizes": [64, 32, 10], "train": {"steps": 60, "batch_size": 64, "lr": 0.01}},
        "data": {"kind": "digits", "split": "train", "limit": 300},
        "logra": {"rank": 8},
        "log": {"output": str(tmp_path / "train.store"), "dtype": "float32", "batch_size": 64},
        "fit": {"kind": "kfac", "damping": 1e-3},
        "score": {"queries_output": str(tmp_path / "q.store")},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["log", "--config", str(path), "--no-progress"]) == 0
    assert main(["log", "--config", str(path), "--split", "test", "--no-progress"]) == 0
    assert main(["fit", "--config", str(path), "--no-progress"]) == 0
    pc_path = str(tmp_path / "train.store.kfac.precond")
    out = tmp_path / "scores"
    assert main(["score", "--store", str(tmp_path / "train.store"), "--queries", str(tmp_path / "q.store"),
                 "--precond", pc_path, "--mode", "cosine", "--top-k", "3", "--out", str(out),
                 "--no-progress"]) == 0
    train, q = GradientStore.open(str(tmp_path / "train.store")), GradientStore.open(str(tmp_path / "q.store"))
    assert len(q) == 300 and q.config["extra"]["data"]["split"] == "test"
    pc = Preconditioner.load(pc_path)
    assert pc.kind == "kfac" and pc.damping[pc.names[0]] == 1e-3
    # reference: cosine in the H⁻¹ metric, float64 numpy from the stored rows
    g, gq = train.read(0, len(train)).astype(np.float64), q.read(0, len(q)).astype(np.float64)
    hg = np.asarray(pc.apply(g.astype(np.float32)), np.float64)
    hq = np.asarray(pc.apply(gq.astype(np.float32)), np.float64)
    ref = (hq @ g.T) / np.sqrt(np.sum(gq * hq, 1))[:, None] / np.sqrt(np.sum(g * hg, 1))[None, :]
    scores = np.load(out / "scores.npy")
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-5)
    top = json.loads((out / "top_k.json").read_text())
    ids = np.asarray(train.ids)
    for qi in range(5):
        assert top["proponents"][qi] == [str(ids[i]) for i in np.argsort(-ref[qi], kind="stable")[:3]]
        assert top["opponents"][qi][0] == str(ids[np.argmin(ref[qi])])
    report = (out / "report.md").read_text()
    assert "## Query" in report and "Proponents" in report and (out / "report_q0.png").exists()


def test_score_refuses_mismatched_stores(tmp_path):
    a = GradientStore.create(str(tmp_path / "a"), dim=4, num_rows=2, dtype="float32", config={"logra": {"projection_sha256": "x"}})
    b = GradientStore.create(str(tmp_path / "b"), dim=4, num_rows=2, dtype="float32", config={"logra": {"projection_sha256": "y"}})
    for s in (a, b):
        s.write(0, np.ones((2, 4), np.float32))
        s.mark_done(0, 2)
    assert main(["score", "--store", str(tmp_path / "a"), "--queries", str(tmp_path / "b"), "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 2
