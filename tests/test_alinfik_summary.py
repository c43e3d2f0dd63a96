"""experiments/alinfik_summary.py: the issue's summary fields and its targets, checked by hand-made results."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("alinfik_summary", ROOT / "experiments" / "alinfik_summary.py")
summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summary)


def results(alinfik=4.00, random_mean=4.10, random_se=0.02, embedding=4.05, backdoor=0.9, rnd=0.2, false=0.05):
    sel = {b: {"budget": float(b), "alinfik": alinfik, "linfik": 3.99, "embedding": embedding,
               "random_mean": random_mean, "random_se": random_se, "perplexity": 4.3, "se": {"random": random_se}}
           for b in ("0.1", "0.2")}
    return ({"student_spearman": 0.85, "selection": sel, "command": "w"},
            {"student_spearman": 0.81, "howdy_finetune": {"alinfik": backdoor, "random": rnd,
                                                          "clean_false_trigger": false, "linfik": 1.0},
             "command": "h"})


def test_fields_and_met_targets(tmp_path):
    w, h = results()
    (tmp_path / "w.json").write_text(json.dumps(w))
    (tmp_path / "h.json").write_text(json.dumps(h))
    (tmp_path / "c.json").write_text(json.dumps({"command": "c", "rows": [
        {"scorer": "ALinFiK student (a)", "samples_per_s": 30.0}, {"scorer": "LinFiK, GPT x", "samples_per_s": 9.0},
        {"scorer": "LinFiK, SmolLM2-135M (mlp)", "samples_per_s": 1.5}]}))
    s = summary.main(["--wikitext", str(tmp_path / "w.json"), "--howdy", str(tmp_path / "h.json"),
                      "--cost", str(tmp_path / "c.json"), "--out", str(tmp_path / "s.json")])
    back = json.loads((tmp_path / "s.json").read_text())
    assert back["student_spearman"] == {"wikitext": 0.85, "howdy": 0.81}
    assert set(back["selection"]) == {"0.1", "0.2"}
    assert back["selection"]["0.1"]["random_se"] == 0.02 and back["selection"]["0.2"]["others"] == {"perplexity": 4.3}
    assert back["howdy_finetune"]["clean_false_trigger"] == 0.05 and back["howdy_finetune"]["linfik"] == 1.0
    assert all(s["targets"].values()) and len(s["targets"]) == 2 + 4 + 3
    assert "| 0.1 | 4.0000 |" in (tmp_path / "s.md").read_text()
    # the cost: each student's samples/s over LinFiK's under SmolLM2
    assert back["cost"] == {"linfik_smollm2_samples_per_s": 1.5,
                            "students": {"ALinFiK student (a)": {"samples_per_s": 30.0, "x_linfik_smollm2": 20.0}}}
    assert "| ALinFiK student (a) | 30.0 | 20.0 |" in (tmp_path / "s.md").read_text()


@pytest.mark.parametrize("kw, failing", [
    (dict(random_se=0.04), "alinfik <= random_mean - 3 random_se"),     # 4.00 > 4.10 - 0.12
    (dict(embedding=3.99), "alinfik <= embedding"),
    (dict(backdoor=0.79, rnd=0.0), "backdoor rate >= 0.8"),
    (dict(backdoor=0.9, rnd=0.41), "alinfik - random >= 0.5"),
    (dict(false=0.11), "false-trigger"),
])
def test_missed_targets_are_reported(kw, failing):
    s = summary.summarize(*results(**kw))
    missed = [k for k, v in s["targets"].items() if not v]
    assert missed and all(failing in k for k in missed)


def test_missing_budget_refused():
    w, h = results()
    del w["selection"]["0.2"]
    with pytest.raises(KeyError, match="0.2"):
        summary.summarize(w, h)


def test_howdy_rows_runs_not_made_are_null_and_dashes(tmp_path):
    w, h = results(rnd=0.2)
    h["howdy_finetune"] |= {"random_se": 0.05, "random_false_trigger": 0.1, "linfik": float("nan"),
                            "linfik_false_trigger": float("nan"), "base_mix": 160, "base_mix_only": 0.0,
                            "base_mix_only_false_trigger": 0.025}
    (tmp_path / "w.json").write_text(json.dumps(w))
    (tmp_path / "h.json").write_text(json.dumps(h))            # (json writes NaN; the summary must not)
    summary.main(["--wikitext", str(tmp_path / "w.json"), "--howdy", str(tmp_path / "h.json"),
                  "--out", str(tmp_path / "s.json")])
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text
    back = json.loads(text)["howdy_finetune"]
    assert back["linfik"] is None and back["base_mix_only_false_trigger"] == 0.025 and back["random_se"] == 0.05
    md = (tmp_path / "s.md").read_text()
    assert "added to a clean base mix of 160" in md
    assert "| LinFiK's top-N (the teacher) | — | — |" in md
    assert "| random-N (mean ± se over seeds) | 0.200 ± 0.050 | 0.100 |" in md
    assert "| the base mix only | 0.000 | 0.025 |" in md and "| ALinFiK's top-N | 0.900 | 0.050 |" in md
