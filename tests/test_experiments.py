"""Each accuracy experiment runs end to end at its config's tiny size (`--tiny`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# On top of a config's `tiny:` section, fewer distinct compiled programs (the runs are compile-bound). lds_gpt:
# one batch shape for training rows and queries, every retraining call one model wide (the LDS and removal
# retrainings run the same compiled trainer), the removal test on every query (its evaluation data then has the
# LDS's shape) and two methods (EK-FAC full, which the removal test ranks by, and gradient dot; LoGra's method
# runs in the lds_logreg / lds_fmnist smoke runs): 49 -> 24 CPU-s. lds_fmnist: its tiny methods but EK-FAC full
# (run by lds_gpt's smoke run): ~21 -> ~16 CPU-s.
TINIER = {"lds_gpt": {"n_queries": 4, "score_batch_size": 4, "train": {"chunk": 1}, "removal": {"points": 4},
                      "methods": [{"type": "ekfac"}, {"type": "grad", "mode": "dot"}]},
          "lds_fmnist": {"methods": [{"type": "logra", "rank": 4, "init": "pca", "kind": "ekfac"},
                                     {"type": "trak", "k": 16}, {"type": "repsim"}]}}


def tiny_config(name: str, path: Path) -> Path:
    """configs/<name>.yaml with its `tiny:` overrides (the scripts' own loader) and TINIER's, written to ``path``."""
    import yaml

    cfg = _common().load_config(str(ROOT / "configs" / f"{name}.yaml"), True)

    def merge(a, b):
        for k, v in b.items():
            a[k] = merge(dict(a[k]), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    path.write_text(yaml.safe_dump(merge(cfg, TINIER.get(name, {}))))
    return path


@pytest.mark.parametrize("name", ["lds_logreg", "lds_fmnist", "lds_gpt"])
def test_experiment_tiny(name, tmp_path):
    if name == "lds_fmnist" and not (Path(os.environ.get("JAXVAL_DATA", ROOT.parent / "shared" / "data"))
                                     / "fashion-mnist").exists():
        pytest.skip("Fashion-MNIST not found (set JAXVAL_DATA)")
    if name == "lds_gpt" and not (Path(os.environ.get("JAXVAL_DATA", ROOT.parent / "shared" / "data"))
                                  / "tinyshakespeare").exists():
        pytest.skip("TinyShakespeare not found (set JAXVAL_DATA)")
    cfg = tiny_config(name, tmp_path / "config.yaml")
    r = subprocess.run([sys.executable, f"experiments/{name}.py", "--config", str(cfg), "--out", str(tmp_path),
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
    """The WikiText experiment end to end at its tiny size (tiny GPT, tiny random BERT as the fine-tuned student's
    encoder, no MiniLM package): the results hold the summary fields the lead merges, every method at both
    budgets, losses finite, standard errors from the random subsets, and the selections' sizes."""
    import numpy as np

    if not (Path(os.environ.get("JAXVAL_DATA", ROOT.parent / "shared" / "data")) / "wikitext-2").exists():
        pytest.skip("WikiText-2 not found (set JAXVAL_DATA)")
    r = subprocess.run([sys.executable, "experiments/linfik_wikitext.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "README.md").read_text().startswith("# ")
    assert res["n_labelled"] + res["n_heldout"] == res["n_pool"]
    assert -1.0 <= res["student_spearman"] <= 1.0
    assert set(res["selection"]) == {"0.1", "0.2"}
    for frac, e in res["selection"].items():
        assert e["budget"] == round(float(frac) * res["n_pool"])
        for k in ("alinfik", "linfik", "embedding", "perplexity", "random_mean", "alinfik_frozen", "alinfik_hashed"):
            assert np.isfinite(e[k]), k
        assert len(e["per_seed"]["random"]) == 2 and e["random_se"] >= 0
        assert e["random_mean"] == pytest.approx(np.mean(e["per_seed"]["random"]), abs=1e-4)
    assert (tmp_path / "stability.png").exists() and (tmp_path / "scatter.png").exists()


# ---------------------------------------------------------------------------------------------- one loader

def _common():
    import importlib.util

    spec = importlib.util.spec_from_file_location("experiments_common", ROOT / "experiments" / "common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_shipped_config_loads_through_the_one_loader():
    """Pipeline configs against the pipeline schema, the linfik/alinfik CLI configs against theirs, the
    experiments' configs through experiments/common.load_config (the library's loader), tiny or not."""
    import yaml

    from jaxval.cli import config as C
    from jaxval.cli.alinfik import STUDENT
    from jaxval.cli.linfik import LINFIK, LM_DATA

    common = _common()
    seen = set()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if {"model", "data", "log"} <= set(raw):
            cfg = C.load_config(path)
            assert cfg["log"]["output"] and cfg["fit"]["output"]
        elif path.name == "linfik_cli.yaml":
            assert C.load_config(path, LINFIK)["warmup_steps"] == raw["warmup_steps"]
        elif path.name == "linfik_student.yaml":
            assert C.load_config(path, STUDENT)["fraction"] == raw["fraction"]
        else:
            for tiny in ((False, True) if "tiny" in raw else (False,)):
                cfg = common.load_config(str(path), tiny)
                want = {**raw, **(raw["tiny"] if tiny else {})}
                assert "tiny" not in cfg and cfg.get("out") == want.get("out") and set(cfg) == set(want) - {"tiny"}
            if path.name == "linfik_wikitext.yaml":
                LM_DATA.validate(raw["data"], str(path))         # the data keys lm_setup reads
        seen.add(path.name)
    assert {"digits_mlp.yaml", "linfik_cli.yaml", "linfik_student.yaml", "lds_logreg.yaml"} <= seen


def test_config_schema_errors_and_merging(tmp_path):
    from jaxval.cli import config as C

    schema = C.Schema({"lr": C.Field((float,), 0.1), "steps": C.Field((int,), C.REQUIRED),
                       "mode": C.Field((str,), "dot", ("dot", "cosine")),
                       "opt": C.Schema({"name": C.Field((str,), "adam"), "decay": C.Field((float, None), None)})})
    p = tmp_path / "c.yaml"
    p.write_text("steps: 3\nlr: 1e-3\nopt: {decay: 2}\nsmall: {steps: 1, opt: {name: sgd}}\n")
    cfg = C.load_config(p, schema, profiles=("small",))
    assert cfg == {"steps": 3, "lr": 1e-3, "mode": "dot", "opt": {"name": "adam", "decay": 2.0}}   # YAML's 1e-3 str
    assert isinstance(cfg["lr"], float) and isinstance(cfg["opt"]["decay"], float)
    small = C.load_config(p, schema, profile="small", overrides=["opt.decay=null", "mode=cosine"])
    assert small == {"steps": 1, "lr": 1e-3, "mode": "cosine", "opt": {"name": "sgd", "decay": None}}
    cases = {"stpes: 3": "unknown key 'stpes' (did you mean 'steps'?)",
             "steps: 3\nopt: {nme: x}": "unknown key 'opt.nme' (did you mean 'opt.name'?)",
             "steps: true": "steps must be int, got bool True",
             "steps: 2.5": "steps must be int, got float 2.5",
             "steps: 3\nlr: fast": "lr must be float, got str 'fast'",
             "steps: 3\nmode: l3": "mode must be one of ['dot', 'cosine'], got 'l3'",
             "lr: 0.1": "steps is required",
             "steps: 3\nopt: 5": "section 'opt' must be a mapping",
             "- 1": "the top level must be a mapping",
             "steps: [1": "is not valid YAML"}
    for text, msg in cases.items():
        p.write_text(text)
        with pytest.raises(C.ConfigError) as e:
            C.load_config(p, schema)
        assert msg in str(e.value) and "\n" not in str(e.value), (text, str(e.value))
    with pytest.raises(C.ConfigError, match="key=value"):
        C.apply_overrides({}, ["steps"])
    p.write_text("a: 1")
    with pytest.raises(C.ConfigError, match="no 'tiny:'"):
        C.load_config(p, None, profile="tiny")
    with pytest.raises(C.ConfigError, match="not found"):
        C.load_config(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------------------------- layout

def _imports(path: Path) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_library_and_application_are_apart():
    """argparse only in jaxval/cli; matplotlib only in jaxval/evaluation/plots.py; `import jaxval` pulls in
    none of the optional extras ([llm], [plots]) nor scipy (a test-only dependency)."""
    pkg = ROOT / "jaxval"
    users = {m: sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py") if m in _imports(p))
             for m in ("argparse", "matplotlib", "scipy")}
    assert users["argparse"] and all(u.startswith("cli/") for u in users["argparse"]), users["argparse"]
    assert users["matplotlib"] == ["evaluation/plots.py"], users["matplotlib"]
    assert users["scipy"] == [], users["scipy"]
    code = ("import sys, jaxval, jaxval.distributed, jaxval.evaluation; "
            "print(sorted(m for m in ('matplotlib', 'tokenizers', 'gguf', 'safetensors', 'scipy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]


def test_distributed_module_launches(tmp_path):
    """`python -m jaxval.distributed -n 2 -- CMD` (the launcher's own entry point, argparse in jaxval.cli):
    every process sees its id; a failing process's code is the launcher's exit code."""
    child = "import os, sys; print('pid', os.environ['JAXVAL_PROCESS_ID'], os.environ['JAXVAL_NUM_PROCESSES'])"
    r = subprocess.run([sys.executable, "-m", "jaxval.distributed", "-n", "2", "--timeout", "120", "--",
                        sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "[p0] pid 0 2" in r.stdout and "[p1] pid 1 2" in r.stdout
    # process 0 still runs when process 1 fails: it is stopped (SIGTERM), and the launcher's code is process 1's
    # (a process stopped because of the failure does not stand for it, whatever its place)
    fail = ("import os, sys, time; pid = os.environ['JAXVAL_PROCESS_ID']; "
            "sys.exit(3) if pid == '1' else time.sleep(60)")
    r = subprocess.run([sys.executable, "-m", "jaxval.distributed", "-n", "2", "--timeout", "120", "--",
                        sys.executable, "-c", fail], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr[-2000:]
