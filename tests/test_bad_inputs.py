"""Bad inputs through the Python API and the CLI: each must be refused loudly, with a jaxval error whose message
names the problem, and must leave every stored file (sha256) unchanged; kill tests for ``fit`` and ``score``.

One tiny digits pipeline (``jaxval log`` train and test splits, ``jaxval fit``) is built once per session;
tests that damage artifacts copy them first. CLI calls run in-process through ``jaxval.cli.app.main``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx

import jaxval as jv
from jaxval import GradientStore, Preconditioner
from jaxval.cli import config as C
from jaxval.cli.app import main, model_path

ROWS = 160


# ----------------------------------------------------------------------------------------------- helpers

def sha_tree(*roots) -> dict:
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class unchanged:
    """``with unchanged(dir, ...)``: every file under the folders has the same sha256 afterwards (and no file
    was added or removed)."""

    def __init__(self, *roots):
        self.roots = roots

    def __enter__(self):
        self.before = sha_tree(*self.roots)
        return self

    def __exit__(self, *exc):
        assert sha_tree(*self.roots) == self.before, "stored files changed"
        return False


def cli_error(capsys, argv, *needles, code=2):
    """Run the CLI; it must exit with ``code`` and print one jaxval error line (no traceback) naming ``needles``."""
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("jaxval ")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def write_cfg(path, cfg) -> str:
    Path(path).write_text(yaml.safe_dump(cfg))
    return str(path)


def base_cfg(root) -> dict:
    return {
        "name": "bad-inputs", "seed": 0,
        "model": {"kind": "mlp", "sizes": [64, 16, 10], "train": {"steps": 20, "batch_size": 64, "lr": 0.01}},
        "data": {"kind": "digits", "split": "train", "limit": ROWS},
        "logra": {"rank": 4},
        "log": {"output": str(Path(root) / "train.store"), "dtype": "float32", "batch_size": 32, "chunk_rows": 32},
        "fit": {"kind": "kfac", "damping": 1e-3},
        "score": {"queries_output": str(Path(root) / "q.store")},
    }


@pytest.fixture(scope="session")
def P(tmp_path_factory):
    """The session's artifacts: train store, query store, K-FAC preconditioner, and the API objects."""
    root = tmp_path_factory.mktemp("bad_inputs")
    cfg = base_cfg(root)
    path = write_cfg(root / "c.yaml", cfg)
    assert main(["log", "--config", path, "--no-progress"]) == 0
    assert main(["log", "--config", path, "--split", "test", "--no-progress"]) == 0
    assert main(["fit", "--config", path, "--no-progress"]) == 0
    norm = C.load_config(path)
    norm["model"] = dict(norm["model"], checkpoint=model_path(cfg["log"]["output"]), save_trained=None)
    model, loss_fn, data, ids, logra = C.prepare(norm, progress=False)
    _, _, qdata, _, _ = C.prepare(norm, progress=False, split="test")
    qdata = {k: v[:6] for k, v in qdata.items()}
    other_model = nnx.clone(model)
    st = nnx.state(other_model, nnx.Param)
    leaves = nnx.to_flat_state(st)
    _, v0 = leaves[0]
    v0[...] = v0[...] * 1.01
    nnx.update(other_model, st)
    logra_other = jv.LoGra(model, loss_fn, rank=4, seed=1)       # same D, other projections
    assert logra_other.dim == logra.dim
    ns = types.SimpleNamespace(
        root=root, cfg=cfg, cfg_path=path, model=model, other_model=other_model, loss_fn=loss_fn, data=data,
        qdata=qdata, logra=logra, logra_other=logra_other, store=str(root / "train.store"),
        qstore=str(root / "q.store"), pc=str(root / "train.store.kfac.precond"))
    ns.g = logra.grads(model, qdata)
    ns.g_wrapped = jv.ProjectedGrads(ns.g, jv.Provenance.of(logra, model))
    return ns


@pytest.fixture
def copy(P, tmp_path):
    """Copy a session artifact into this test's folder (to damage it)."""
    def f(src, name=None):
        dst = tmp_path / (name or Path(src).name)
        shutil.copytree(src, dst)
        return str(dst)
    return f


# =============================================================================================== provenance (API)

def test_api_queries_from_another_logra_config(P):
    g = jv.ProjectedGrads(P.logra_other.grads(P.model, P.qdata), jv.Provenance.of(P.logra_other, P.model))
    with unchanged(P.root), pytest.raises(jv.ProvenanceError, match="different LoGra configurations"):
        jv.influence(g, GradientStore.open(P.store))


def test_api_bare_queries_against_a_store_with_provenance(P):
    with unchanged(P.root), pytest.raises(jv.ProvenanceError, match="bare arrays"):
        jv.influence(np.asarray(P.g), GradientStore.open(P.store))


def test_api_bare_queries_with_logra_of_another_config(P):
    with unchanged(P.root), pytest.raises(jv.ProvenanceError, match="different LoGra configurations"):
        jv.influence(np.asarray(P.g), GradientStore.open(P.store), logra=P.logra_other, model=P.model)


def test_api_queries_of_other_model_weights(P):
    g = jv.ProjectedGrads(P.logra.grads(P.other_model, P.qdata), jv.Provenance.of(P.logra, P.other_model))
    with unchanged(P.root), pytest.raises(jv.ProvenanceError, match="different model weights"):
        jv.influence(g, GradientStore.open(P.store))


def test_api_logra_without_model_is_refused_against_a_fingerprinted_store(P):
    with unchanged(P.root), pytest.raises(jv.ProvenanceError, match="no model fingerprint"):
        jv.influence(np.asarray(P.g), GradientStore.open(P.store), logra=P.logra)


def test_api_preconditioner_of_another_config(P):
    pc = jv.fit_preconditioner(P.logra_other, P.model, P.data, kind="kfac", batch_size=32, progress=False)
    with unchanged(P.root), pytest.raises(jv.ProvenanceError, match="preconditioner"):
        jv.influence(P.g_wrapped, GradientStore.open(P.store), precond=pc)


def test_api_preconditioner_of_other_weights(P):
    pc = jv.fit_preconditioner(P.logra, P.other_model, P.data, kind="kfac", batch_size=32, progress=False)
    assert pc.provenance.fingerprint == jv.model_fingerprint(P.other_model)
    with unchanged(P.root), pytest.raises(jv.ProvenanceError, match="different model weights"):
        jv.influence(P.g_wrapped, GradientStore.open(P.store), precond=pc)


def test_api_preconditioner_without_fingerprint(P):
    old = Preconditioner.load(P.pc)
    cfg = {k: v for k, v in old.config.items() if k != "model_fingerprint"}   # as an older jaxval saved it
    legacy = Preconditioner(old.kind, old.names, old.shapes, old.factors, old.damping, cfg)
    with unchanged(P.root), pytest.raises(jv.ProvenanceError, match="no model fingerprint"):
        jv.influence(P.g_wrapped, GradientStore.open(P.store), precond=legacy)


def test_api_top_k_checks_provenance(P):
    g = jv.ProjectedGrads(P.logra_other.grads(P.model, P.qdata), jv.Provenance.of(P.logra_other, P.model))
    with unchanged(P.root), pytest.raises(jv.ProvenanceError, match="top_k"):
        jv.top_k(g, GradientStore.open(P.store), 3)


def test_api_self_influence_checks_preconditioner(P):
    pc = jv.fit_preconditioner(P.logra_other, P.model, P.data, kind="raw", batch_size=32, progress=False)
    with unchanged(P.root), pytest.raises(jv.ProvenanceError, match="self_influence"):
        jv.self_influence(GradientStore.open(P.store), pc)


def test_api_bare_arrays_with_a_fitted_preconditioner(P):
    pc = Preconditioner.load(P.pc)
    rows = GradientStore.open(P.store).read(0, ROWS)
    with pytest.raises(jv.ProvenanceError, match="bare arrays"):
        jv.influence(np.asarray(P.g), rows, precond=pc)
    # the explicit opt-out, and the same scores as the checked call
    a = jv.influence(np.asarray(P.g), rows, precond=pc, unchecked=True)
    b = jv.influence(P.g_wrapped, GradientStore.open(P.store), precond=pc)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_api_logra_and_provenance_together(P):
    with pytest.raises(jv.ConfigError, match="not both"):
        jv.influence(np.asarray(P.g), GradientStore.open(P.store), logra=P.logra,
                     provenance=jv.Provenance.of(P.logra, P.model))


def test_api_wrapped_queries_plus_logra(P):
    with pytest.raises(jv.ConfigError, match="carry their provenance"):
        jv.influence(P.g_wrapped, GradientStore.open(P.store), logra=P.logra, model=P.model)


def test_api_checked_paths_agree(P):
    store = GradientStore.open(P.store)
    a = jv.influence(P.g_wrapped, store)
    b = jv.influence(np.asarray(P.g), store, logra=P.logra, model=P.model)
    c = jv.influence(np.asarray(P.g), store, provenance=jv.Provenance.of(P.logra, P.model))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    # the wrapper behaves as an array and passes through jit
    assert np.asarray(P.g_wrapped).shape == P.g_wrapped.shape and P.g_wrapped[0].shape == (P.logra.dim,)
    import jax
    out = jax.jit(lambda g: g)(P.g_wrapped)
    assert isinstance(out, jv.ProjectedGrads) and out.provenance == P.g_wrapped.provenance


def test_linfik_preconditioner_of_another_config(P):
    pc = jv.fit_preconditioner(P.logra_other, P.model, P.data, kind="raw", batch_size=32, progress=False)
    with pytest.raises(jv.ProvenanceError, match="linfik"):
        jv.linfik(P.logra, P.model, P.data, P.qdata, precond=pc, batch_size=32)


def test_linfik_preconditioner_of_other_weights(P):
    pc = Preconditioner.load(P.pc)
    with pytest.raises(jv.ProvenanceError, match="different model weights"):
        jv.linfik(P.logra, P.other_model, P.data, P.qdata, precond=pc, batch_size=32)
    v = jv.linfik(P.logra, P.model, P.data, P.qdata, precond=pc, batch_size=32)   # the right one is accepted
    assert v.shape == (ROWS,) and np.isfinite(v).all()


def test_api_top_k_zero_and_negative(P):
    store = GradientStore.open(P.store)
    for k in (0, -3):
        with pytest.raises(jv.ConfigError, match="positive integer"):
            jv.top_k(P.g_wrapped, store, k)


# =============================================================================================== provenance (CLI)

def test_cli_score_preconditioner_of_another_config(P, tmp_path, capsys):
    pc = jv.fit_preconditioner(P.logra_other, P.model, P.data, kind="kfac", batch_size=32, progress=False)
    pc.save(str(tmp_path / "other.precond"))
    with unchanged(P.root):
        cli_error(capsys, ["score", "--store", P.store, "--queries", P.qstore, "--precond", str(tmp_path / "other.precond"),
                           "--out", str(tmp_path / "o"), "--no-progress"], "different LoGra configurations")
    assert not (tmp_path / "o").exists()


def test_cli_score_preconditioner_of_other_weights(P, tmp_path, capsys):
    pc = jv.fit_preconditioner(P.logra, P.other_model, P.data, kind="kfac", batch_size=32, progress=False)
    pc.save(str(tmp_path / "w.precond"))
    with unchanged(P.root):
        cli_error(capsys, ["score", "--store", P.store, "--queries", P.qstore, "--precond", str(tmp_path / "w.precond"),
                           "--out", str(tmp_path / "o"), "--no-progress"], "different model weights")


def test_cli_score_query_store_of_other_weights(P, tmp_path, capsys):
    jv.log_gradients(P.logra, P.other_model, P.qdata, str(tmp_path / "q2.store"), dtype="float32", progress=False)
    with unchanged(P.root):
        cli_error(capsys, ["score", "--store", P.store, "--queries", str(tmp_path / "q2.store"), "--out",
                           str(tmp_path / "o"), "--no-progress"], "different model weights")


def test_cli_score_stores_without_provenance(tmp_path, capsys):
    for n in ("a", "b"):
        s = GradientStore.create(str(tmp_path / n), dim=4, num_rows=2, dtype="float32")
        s.write(0, np.ones((2, 4), np.float32), mark_done=True)
    with unchanged(tmp_path):
        cli_error(capsys, ["score", "--store", str(tmp_path / "a"), "--queries", str(tmp_path / "b"), "--out",
                           str(tmp_path / "o"), "--no-progress"], "records no LoGra configuration")


# =============================================================================================== stores that cannot lie

def test_nan_inputs_are_an_error_naming_ids(P, tmp_path):
    data = {k: np.array(v) for k, v in P.data.items()}
    data["x"] = data["x"].astype(np.float32)
    data["x"][70] = np.nan
    path = str(tmp_path / "nan.store")
    with pytest.raises(jv.NonFiniteError, match=r"ids \[70\]"):
        jv.log_gradients(P.logra, P.model, data, path, dtype="float32", batch_size=32, chunk_rows=32, progress=False)
    s = GradientStore.open(path)
    assert not s.is_complete() and s.done_mask()[:64].all() and not s.done_mask()[64:96].any()


def test_nan_inputs_skip_policy_records_them(P, tmp_path):
    data = {k: np.array(v) for k, v in P.data.items()}
    data["x"] = data["x"].astype(np.float32)
    data["x"][[5, 99]] = np.inf
    s = jv.log_gradients(P.logra, P.model, data, str(tmp_path / "skip.store"), dtype="bfloat16", batch_size=32,
                         chunk_rows=32, progress=False, nonfinite="skip")
    assert s.is_complete() and s.skipped_rows().tolist() == [5, 99]
    assert not s.read(5, 6).any() and np.isfinite(s.read(0, ROWS)).all()


def test_nonfinite_policy_is_checked(P, tmp_path):
    with pytest.raises(ValueError, match="nonfinite"):
        jv.log_gradients(P.logra, P.model, P.data, str(tmp_path / "x"), nonfinite="ignore", progress=False)
    assert not (tmp_path / "x").exists()


def test_deleted_chunk_is_an_error_naming_rows(P, copy):
    path = copy(P.store)
    os.remove(os.path.join(path, "grads", "c", "2", "0"))
    s = GradientStore.open(path)
    with unchanged(path):
        assert not s.is_complete()
        with pytest.raises(jv.StoreCorruptError, match=r"rows \[64, 96\) \(missing\)"):
            s.read(0, ROWS)
        with pytest.raises(jv.StoreCorruptError, match=r"rows \[64, 96\)"):
            jv.influence(P.g_wrapped, s)


def test_truncated_chunk_is_an_error_naming_rows(P, copy):
    path = copy(P.store)
    f = os.path.join(path, "grads", "c", "1", "0")
    Path(f).write_bytes(Path(f).read_bytes()[:100])
    s = GradientStore.open(path)
    with unchanged(path):
        with pytest.raises(jv.StoreCorruptError, match=r"rows \[32, 64\)"):
            s.check_chunks()
        with pytest.raises(jv.StoreCorruptError, match="shorter than its chunk"):
            s.read(32, 40)


def test_flipped_bits_fail_the_checksum_and_repair_recomputes(P, copy):
    path = copy(P.store)
    f = os.path.join(path, "grads", "c", "3", "0")
    b = bytearray(Path(f).read_bytes())
    b[17] ^= 0x40
    Path(f).write_bytes(bytes(b))
    s = GradientStore.open(path)
    with unchanged(path), pytest.raises(jv.StoreCorruptError, match=r"rows \[96, 128\) \(checksum mismatch\)"):
        s.verify()
    assert s.repair() == [(96, 128)] and not s.is_complete()
    relog(P, path)
    s = GradientStore.open(path)
    s.verify()
    np.testing.assert_array_equal(s.read(0, ROWS), GradientStore.open(P.store).read(0, ROWS))


def relog(P, path):
    """The session's `jaxval log` call through the API (same config, ids and extra config: a resume)."""
    base = GradientStore.open(P.store)
    return jv.log_gradients(P.logra, P.model, P.data, path, dtype="float32", batch_size=32, ids=base.ids,
                            progress=False, extra_config=base.config.get("extra"))


def test_log_resume_recomputes_a_deleted_chunk(P, copy):
    path = copy(P.store)
    os.remove(os.path.join(path, "grads", "c", "0", "0"))
    with pytest.warns(UserWarning, match="recomputed"):
        relog(P, path)
    np.testing.assert_array_equal(GradientStore.open(path).read(0, ROWS), GradientStore.open(P.store).read(0, ROWS))


def test_incomplete_store_refused_by_the_api(P, copy):
    path = copy(P.store)
    s = GradientStore.open(path)
    s._done[40:50].write(np.zeros(10, np.uint8)).result()
    with unchanged(path):
        for call in (lambda: jv.influence(P.g_wrapped, s), lambda: jv.top_k(P.g_wrapped, s, 2),
                     lambda: jv.self_influence(s)):
            with pytest.raises(jv.IncompleteStoreError, match="10 of 160 rows"):
                call()
    assert jv.influence(P.g_wrapped, s, allow_incomplete=True).shape == (6, ROWS)


def test_incomplete_store_refused_by_the_cli(P, copy, tmp_path, capsys):
    path = copy(P.store)
    GradientStore.open(path)._done[0:5].write(np.zeros(5, np.uint8)).result()
    with unchanged(path):
        cli_error(capsys, ["score", "--store", path, "--queries", P.qstore, "--out", str(tmp_path / "o"),
                           "--no-progress"], "incomplete", "155/160")


def test_manifestless_store_with_done_rows_is_not_recreated(P, copy):
    path = copy(P.store)
    os.remove(os.path.join(path, "manifest.json"))
    with unchanged(path), pytest.raises(jv.StoreError, match="160 rows marked done but no manifest"):
        jv.log_gradients(P.logra_other, P.model, P.data, path, dtype="float32", batch_size=32, chunk_rows=32,
                         progress=False)


def test_manifestless_store_same_config_is_not_recreated_either(P, copy):
    path = copy(P.store)
    os.remove(os.path.join(path, "manifest.json"))
    with unchanged(path), pytest.raises(jv.StoreError, match="Restore manifest.json"):
        jv.log_gradients(P.logra, P.model, P.data, path, dtype="float32", batch_size=32, chunk_rows=32,
                         progress=False)


def test_half_created_store_with_empty_done_record_is_recreated(P, tmp_path):
    path = str(tmp_path / "h.store")
    s = GradientStore.create(path, dim=P.logra.dim, num_rows=ROWS, dtype="float32", chunk_rows=32)
    os.remove(os.path.join(path, "manifest.json"))
    del s
    with pytest.warns(UserWarning, match="half-created"):
        out = jv.log_gradients(P.logra, P.model, P.data, path, dtype="float32", batch_size=32, chunk_rows=32,
                               progress=False)
    assert out.is_complete()


@pytest.mark.parametrize("field,value,needle", [
    ("format_version", "abc", "format_version is 'abc'"),
    ("dim", -4, "dim is -4"),
    ("dtype", "int8", "dtype 'int8'"),
    ("num_rows", "many", "num_rows is 'many'"),
])
def test_damaged_manifest_fields(P, copy, field, value, needle):
    path = copy(P.store)
    m = json.loads(Path(path, "manifest.json").read_text())
    m[field] = value
    Path(path, "manifest.json").write_text(json.dumps(m))
    with unchanged(path), pytest.raises(jv.StoreError, match=needle.replace("(", r"\(")):
        GradientStore.open(path)


def test_manifest_not_json(P, copy, capsys):
    path = copy(P.store)
    Path(path, "manifest.json").write_text('{"format": "jaxval.Grad')
    with unchanged(path):
        cli_error(capsys, ["info", path], "not valid JSON")


# =============================================================================================== atomic outputs

class Killed(BaseException):
    """Stands for SIGKILL inside the write path."""


def test_fit_killed_between_the_two_renames_recovers(P, copy, monkeypatch):
    from jaxval._src import checkpoint

    pc_path = copy(P.pc)
    good = Preconditioner.load(pc_path)
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".precond.tmp"):
            raise Killed()
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(Killed):
        good.with_damping(damping=0.5).save(pc_path, overwrite=True)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    assert not os.path.exists(pc_path) and os.path.isdir(pc_path + ".old") and os.path.isdir(pc_path + ".tmp")
    back = Preconditioner.load(pc_path)       # the complete new one is put in place, leftovers removed
    assert back.damping[back.names[0]] == 0.5
    assert not os.path.exists(pc_path + ".old") and not os.path.exists(pc_path + ".tmp")


def test_fit_killed_while_writing_keeps_the_old_one(P, copy, monkeypatch, capsys):
    from jaxval._src import checkpoint

    pc_path = copy(P.pc)
    cfg = dict(P.cfg, fit={"kind": "kfac", "damping": 0.5, "output": pc_path})
    path = write_cfg(Path(pc_path).parent / "fit.yaml", cfg)
    orig = checkpoint.write_json_atomic

    def die(*a, **k):
        raise Killed()

    monkeypatch.setattr(checkpoint, "write_json_atomic", die)
    with unchanged(pc_path), pytest.raises(Killed):
        main(["fit", "--config", path, "--no-progress"])
    monkeypatch.setattr(checkpoint, "write_json_atomic", orig)
    assert Preconditioner.load(pc_path).damping[Preconditioner.load(pc_path).names[0]] == 1e-3
    assert not os.path.exists(pc_path + ".tmp")   # the incomplete leftover was cleaned


def test_score_killed_mid_folder_keeps_the_old_folder(P, tmp_path, monkeypatch):
    out = str(tmp_path / "scores")
    argv = ["score", "--store", P.store, "--queries", P.qstore, "--precond", P.pc, "--top-k", "3", "--out", out,
            "--no-progress"]
    assert main(argv) == 0
    import jaxval.cli.report as report

    def die(out_dir, *a, **k):
        Path(out_dir, "report.md").write_text("half")
        raise Killed()

    monkeypatch.setattr(report, "write_report", die)
    with unchanged(out), pytest.raises(Killed):
        main(["score", "--store", P.store, "--queries", P.qstore, "--mode", "dot", "--out", out, "--no-progress"])
    assert not os.path.exists(out + ".tmp")


def test_score_killed_between_renames_recovers_next_run(P, tmp_path, monkeypatch):
    from jaxval._src import checkpoint

    out = str(tmp_path / "scores")
    argv = ["score", "--store", P.store, "--queries", P.qstore, "--top-k", "2", "--out", out, "--no-progress"]
    assert main(argv) == 0
    real = os.replace

    def replace(src, dst):
        if str(src).endswith("scores.tmp"):
            raise Killed()
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    assert not os.path.exists(out)
    assert main(argv) == 0          # the next run finds the complete leftover, then writes its own
    assert os.path.isfile(os.path.join(out, ".jaxval-score.json"))
    assert not os.path.exists(out + ".old") and not os.path.exists(out + ".tmp")


def test_score_refuses_a_foreign_folder(P, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("do not touch")
    with unchanged(out):
        cli_error(capsys, ["score", "--store", P.store, "--queries", P.qstore, "--out", str(out), "--no-progress"],
                  "not written by `jaxval score`")


def test_score_out_is_a_file(P, tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    with unchanged(f):
        cli_error(capsys, ["score", "--store", P.store, "--queries", P.qstore, "--out", str(f), "--no-progress"],
                  "not a folder")


def test_student_save_is_atomic(tmp_path, monkeypatch):
    from jaxval._src import checkpoint
    from jaxval.valuation.alinfik import Student, fit_student

    emb = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    st = fit_student(None, emb[:, 0], embeddings=emb, hidden=(4,), max_epochs=3, patience=2)
    path = str(tmp_path / "student")
    st.save(path)
    real = os.replace

    def replace(src, dst):
        if str(src).endswith("student.tmp"):
            raise Killed()
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(Killed):
        st.save(path, overwrite=True)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    back = Student.load(path)
    np.testing.assert_allclose(back.predict_embeddings(emb), st.predict_embeddings(emb), rtol=1e-6)


# =============================================================================================== CLI

def test_cli_typo_inside_a_section(P, tmp_path, capsys):
    cfg = dict(P.cfg, logra={"rnak": 4})
    path = write_cfg(tmp_path / "typo.yaml", cfg)
    cli_error(capsys, ["log", "--config", path, "--no-progress"], "logra.rnak", "did you mean 'logra.rank'", path)


def test_cli_typo_two_levels_deep(P, tmp_path, capsys):
    cfg = dict(P.cfg, model=dict(P.cfg["model"], train={"stepz": 3}))
    path = write_cfg(tmp_path / "deep.yaml", cfg)
    cli_error(capsys, ["log", "--config", path, "--no-progress"], "model.train.stepz", path)


def test_cli_unknown_top_level_key(P, tmp_path, capsys):
    path = write_cfg(tmp_path / "top.yaml", dict(P.cfg, modle={"kind": "mlp"}))
    cli_error(capsys, ["fit", "--config", path, "--no-progress"], "'modle'", path)


def test_cli_wrong_type_names_key_and_file(P, tmp_path, capsys):
    cfg = dict(P.cfg, log=dict(P.cfg["log"], batch_size="big"))
    path = write_cfg(tmp_path / "type.yaml", cfg)
    cli_error(capsys, ["log", "--config", path, "--no-progress"], "log.batch_size must be int", path)


def test_cli_wrong_choice(P, tmp_path, capsys):
    cfg = dict(P.cfg, fit={"kind": "ekfca"})
    path = write_cfg(tmp_path / "choice.yaml", cfg)
    cli_error(capsys, ["fit", "--config", path, "--no-progress"], "fit.kind must be one of", path)


def test_cli_config_not_a_mapping(tmp_path, capsys):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    cli_error(capsys, ["log", "--config", str(p)], "top level must be a mapping", str(p))


def test_cli_config_missing(tmp_path, capsys):
    cli_error(capsys, ["fit", "--config", str(tmp_path / "nope.yaml")], "not found")


def test_cli_yaml_object_tag(tmp_path, capsys):
    p = tmp_path / "tag.yaml"
    p.write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    cli_error(capsys, ["linfik", "--config", str(p), "--out", str(tmp_path / "o")], "not valid YAML")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("k", ["0", "-3", "two"])
def test_cli_top_k_not_positive(P, tmp_path, capsys, k):
    capsys.readouterr()
    with unchanged(P.root):
        assert main(["score", "--store", P.store, "--queries", P.qstore, "--top-k", k, "--out",
                     str(tmp_path / "o")]) == 2
    assert "--top-k: must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value", [("--damping", "-1"), ("--relative-damping", "0"), ("--num-samples", "0")])
def test_cli_fit_bad_numbers_on_the_command_line(P, capsys, flag, value):
    capsys.readouterr()
    with unchanged(P.root):
        assert main(["fit", "--config", P.cfg_path, flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_cli_fit_negative_damping_in_yaml_before_any_model(P, tmp_path, capsys, monkeypatch):
    def no(*a, **k):
        raise AssertionError("the model was built before the damping was checked")

    monkeypatch.setattr(C, "prepare", no)
    import jaxval._src.curvature as curv
    monkeypatch.setattr(curv, "fit_from_store", no)
    cfg = dict(P.cfg, fit={"kind": "ekfac", "damping": -0.1, "output": str(tmp_path / "pc")})
    path = write_cfg(tmp_path / "neg.yaml", cfg)
    with unchanged(P.root):
        cli_error(capsys, ["fit", "--config", path, "--no-progress"], "damping must be > 0", path)
    cfg = dict(P.cfg, fit={"kind": "ekfac", "relative_damping": 0.0, "output": str(tmp_path / "pc")})
    path = write_cfg(tmp_path / "zero.yaml", cfg)
    cli_error(capsys, ["fit", "--config", path, "--no-progress"], "relative_damping must be > 0")


def test_api_fit_negative_damping_before_the_passes(P, monkeypatch):
    import jaxval._src.curvature as curv

    def no(*a, **k):
        raise AssertionError("a pass ran before the damping was checked")

    monkeypatch.setattr(curv, "accumulate", no)
    with pytest.raises(jv.ConfigError, match="damping must be > 0"):
        jv.fit_preconditioner(P.logra, P.model, P.data, kind="ekfac", damping=-1.0, progress=False)


def test_cli_truncated_preconditioner_array(P, copy, tmp_path, capsys):
    pc = copy(P.pc)
    files = sorted((p for p in Path(pc, "arrays").rglob("*") if p.is_file() and p.stat().st_size > 200),
                   key=lambda p: -p.stat().st_size)
    files[0].write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 3])
    with unchanged(pc, P.root):
        cli_error(capsys, ["score", "--store", P.store, "--queries", P.qstore, "--precond", pc, "--out",
                           str(tmp_path / "o"), "--no-progress"], "is damaged")


def test_cli_truncated_preconditioner_meta(P, copy, tmp_path, capsys):
    pc = copy(P.pc)
    meta = Path(pc, "meta.json")
    meta.write_text(meta.read_text()[:40])
    with unchanged(pc):
        cli_error(capsys, ["score", "--store", P.store, "--queries", P.qstore, "--precond", pc, "--out",
                           str(tmp_path / "o"), "--no-progress"], "meta.json is not valid JSON")


def test_cli_preconditioner_missing(P, tmp_path, capsys):
    cli_error(capsys, ["score", "--store", P.store, "--queries", P.qstore, "--precond", str(tmp_path / "none"),
                       "--out", str(tmp_path / "o"), "--no-progress"], "not a jaxval checkpoint")


def test_api_store_folder_is_not_a_preconditioner(P):
    with unchanged(P.root), pytest.raises(jv.CheckpointError, match="not a jaxval checkpoint"):
        Preconditioner.load(P.store)


def test_cli_store_missing(P, tmp_path, capsys):
    cli_error(capsys, ["score", "--store", str(tmp_path / "none"), "--queries", P.qstore, "--out",
                       str(tmp_path / "o")], "no GradientStore")


def test_cli_info_on_a_random_folder(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    cli_error(capsys, ["info", str(tmp_path / "junk")], "no GradientStore")


def test_cli_debug_shows_the_traceback(tmp_path):
    with pytest.raises(jv.StoreNotFoundError):
        main(["--debug", "info", str(tmp_path / "nothing")])


def test_cli_feature_width_mismatch(P, tmp_path, capsys):
    cfg = dict(P.cfg, model=dict(P.cfg["model"], sizes=[32, 16, 10]),
               log=dict(P.cfg["log"], output=str(tmp_path / "w.store")))
    path = write_cfg(tmp_path / "width.yaml", cfg)
    cli_error(capsys, ["log", "--config", path, "--no-progress"], "model.sizes[0]", "64")
    assert not (tmp_path / "w.store").exists()


def _writes_failing(monkeypatch, message, after=1):
    calls = [0]
    real = GradientStore.write

    def write(self, start, rows, **kw):
        calls[0] += 1
        if calls[0] > after:
            raise ValueError(message)
        return real(self, start, rows, **kw)

    monkeypatch.setattr(GradientStore, "write", write)


@pytest.mark.parametrize("status,needle", [
    ("RESOURCE_EXHAUSTED: Error writing local file: No space left on device", "the disk is full"),
    ("PERMISSION_DENIED: Error opening file: Permission denied", "permission denied"),
])
def test_cli_write_failure_says_rows_kept_and_rerun_resumes(P, tmp_path, capsys, monkeypatch, status, needle):
    cfg = dict(P.cfg, log=dict(P.cfg["log"], output=str(tmp_path / "full.store")))
    path = write_cfg(tmp_path / "full.yaml", cfg)
    _writes_failing(monkeypatch, status)
    line = cli_error(capsys, ["log", "--config", path, "--no-progress"], needle, "32 of 160 rows", "rerun")
    assert "resumes" in line
    monkeypatch.undo()
    s = GradientStore.open(str(tmp_path / "full.store"))
    assert s.num_done() == 32
    assert main(["log", "--config", path, "--no-progress"]) == 0
    np.testing.assert_array_equal(GradientStore.open(str(tmp_path / "full.store")).read(0, ROWS),
                                  GradientStore.open(P.store).read(0, ROWS))


def test_cli_alinfik_budget_larger_than_pool(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.arange(5.0))
    cli_error(capsys, ["alinfik", "select", "--scores", str(tmp_path / "s.npy"), "--budget", "9", "--out",
                       str(tmp_path / "sel.json")], "--budget must be between 0 and the 5")
    assert not (tmp_path / "sel.json").exists()


def test_cli_alinfik_pool_of_another_linfik_run(tmp_path, capsys):
    from jaxval.cli.linfik import file_sha256

    run = tmp_path / "run"
    run.mkdir()
    (run / "pool.jsonl").write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(10)))
    np.save(run / "linfik.npy", np.arange(10, dtype=np.float32))
    (run / "meta.json").write_text(json.dumps({"pool_sha256": file_sha256(str(run / "pool.jsonl")),
                                               "values_sha256": file_sha256(str(run / "linfik.npy")),
                                               "provenance": {"config_hash": "c", "model_fingerprint": "f"}}))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": i, "text": f"u{i}"}) + "\n" for i in range(10)))
    with unchanged(run):
        cli_error(capsys, ["alinfik", "train", "--pool", str(other), "--values", str(run / "linfik.npy"), "--out",
                           str(tmp_path / "st")], "not the pool.jsonl")
    assert not (tmp_path / "st").exists()


def test_cli_linfik_unknown_key(tmp_path, capsys):
    p = tmp_path / "l.yaml"
    p.write_text("d_modle: 8\n")
    cli_error(capsys, ["linfik", "--config", str(p), "--out", str(tmp_path / "o")], "d_modle", "did you mean")


def test_errors_form_one_hierarchy():
    for cls in (jv.ConfigError, jv.ProvenanceError, jv.NonFiniteError, jv.CheckpointError, jv.OutputError,
                jv.StoreError, jv.StoreNotFoundError, jv.IncompleteStoreError, jv.StoreCorruptError,
                jv.StoreWriteError, jv.CheckpointNotFoundError):
        assert issubclass(cls, jv.Error) and issubclass(cls, ValueError) or issubclass(cls, OSError)
    assert jv.Error is jv.JaxvalError and jv.MismatchError is jv.ProvenanceError
    assert issubclass(jv.StoreNotFoundError, FileNotFoundError)


def test_cli_info_verify_names_the_corrupted_rows(P, copy, capsys):
    path = copy(P.store)
    f = os.path.join(path, "grads", "c", "4", "0")
    b = bytearray(Path(f).read_bytes())
    b[3] ^= 1
    Path(f).write_bytes(bytes(b))
    assert main(["info", path]) == 0                     # the cheap checks pass (size is right) ...
    with unchanged(path):
        cli_error(capsys, ["info", "--verify", path], "rows [128, 160) (checksum mismatch)", "repair()")


def test_cli_list_element_of_wrong_type_names_the_key(P, tmp_path, capsys):
    cfg = dict(P.cfg, model=dict(P.cfg["model"], sizes=[64, "wide", 10]),
               log=dict(P.cfg["log"], output=str(tmp_path / "s.store")))
    path = write_cfg(tmp_path / "sizes.yaml", cfg)
    cli_error(capsys, ["log", "--config", path, "--no-progress"], "model.sizes[1] must be a positive int")


def test_cli_launch_zero_processes(capsys):
    cli_error(capsys, ["launch", "-n", "0", "--", "true"], "n must be >= 1")
