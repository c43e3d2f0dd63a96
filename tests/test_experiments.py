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
