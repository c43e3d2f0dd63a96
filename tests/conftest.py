"""Suite-wide settings.

The suite is compile-bound (tiny models, many shapes): XLA's CPU backend is asked for cheap code generation
(LLVM optimisation level 0, no expensive passes), which cuts the suite's CPU time by about a fifth to a third
without changing what is computed (HLO passes still run; only machine-code optimisation is lighter), and for
its classic fusion emitters instead of the MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=false``: both
are XLA's own CPU code paths; the MLIR pipeline costs more to compile than tiny programs take to run:
tests/test_capture.py 33.4 -> 20.0 CPU-s, measured 2026-12-02). The
flags go into the environment before JAX starts, so subprocesses (experiments, multi-process runs) get them
too. ``JAXVAL_TEST_FULL_XLA=1`` runs the suite with XLA's default optimisation instead. Compiled executables
are kept in one persistent XLA cache per run (``pytest_configure``), and the run is scheduled over the xdist
workers longest work first (``pytest_collection_modifyitems``, ``pytest_xdist_make_scheduler``).

``JAXVAL_TEST_PROFILE=path.jsonl`` appends each test's wall and CPU seconds (its own process and its
subprocesses; setup, i.e. fixtures, included and also given apart), the XLA compilations and persistent-cache
hits in its process, its xdist worker and start time to that file, to find what makes the suite slow.

Helpers the test modules share (test modules never import each other): ``from conftest import rel_err, ce, explicit``;
the subprocess scripts' builders and references (``small_mlp``, ``crash_setup``, ``spd``, ``SolvePrecond``,
``influence_reference``) are here too.
"""

import json
import os
import resource
import shutil
import tempfile
import time
import warnings

import numpy as np
import pytest

CHEAP_XLA = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
             "--xla_cpu_use_fusion_emitters=false")

if os.environ.get("JAXVAL_TEST_FULL_XLA") != "1":
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in CHEAP_XLA if f.split("=")[0] not in
                                                {g.split("=")[0] for g in flags}])


def rel_err(a, b) -> float:
    """The suite's relative error, in float64: max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


class CompileCounter:
    """Counts XLA compilations (jax.monitoring's backend-compile events) inside a ``with`` block."""

    def __enter__(self):
        import jax

        self.n = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)
        return self

    def _on(self, name, *args, **kw):
        if name.endswith("backend_compile_duration"):
            self.n += 1

    def __exit__(self, *exc):
        import jax

        jax.monitoring.unregister_event_duration_listener(self._on)


def ce(logits, y):
    """Per-example cross-entropy of integer labels ``y`` under ``logits`` ``[B, C]``: ``[B]``."""
    import jax
    import jax.numpy as jnp

    return -jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), y]


def explicit(model, loss_fn, projections, batch):
    """``jv.explicit_grads`` (the ``vmap(grad)`` reference) under ``jax.jit``: the same computation, compiled
    as one program (eager vmap(grad) dispatches op by op, each op compiled on its own: slow on CPU).
    ``model``: an nnx module or a parameter pytree."""
    import jax
    from flax import nnx

    import jaxval as jv

    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return jax.jit(lambda st, p, b: jv.explicit_grads(nnx.merge(graphdef, st), loss_fn, p, b))(
            state, projections, batch)
    return jax.jit(lambda m, p, b: jv.explicit_grads(m, loss_fn, p, b))(model, projections, batch)


# Builders and references that a test module and the subprocesses it starts both need: a subprocess script
# imports them from here (``sys.path.insert(0, tests_dir); from conftest import ...``), never from the test module
# itself. They import JAX, flax and jaxval at call time, so that importing conftest stays cheap.

# ------------------------------------------------------------------------------------ tests/test_pipeline.py

CRASH_ROWS = 4096       # rows of crash_setup's dataset: 64 blocks of 64; a killed child logs at most ~10


def small_mlp(n=200, seed=0, sizes=(8, 16, 4), rank=4, logra_seed=0):
    """A small MLP, its LoGra and ``n`` random examples: ``(model, logra, data)``."""
    from flax import nnx

    import jaxval as jv
    from jaxval.models import mlp

    model = mlp.MLP(sizes, rngs=nnx.Rngs(seed))
    logra = jv.LoGra(model, mlp.loss_fn, rank=rank, seed=logra_seed)
    rng = np.random.default_rng(seed)
    data = {"x": rng.normal(size=(n, sizes[0])).astype(np.float32),
            "y": rng.integers(0, sizes[-1], n).astype(np.int32)}
    return model, logra, data


def crash_setup(n=CRASH_ROWS):
    """A tiny token model whose logging takes a second or two on a busy 2-core machine:
    ``(model, logra, data, ids)``."""
    from flax import nnx

    import jaxval as jv
    from jaxval.models import token_mlp

    model = token_mlp.TokenMLP(vocab_size=64, d_model=64, n_block=2, hidden=256, rngs=nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logra = jv.LoGra(model, token_mlp.loss_fn, rank=8)
    rng = np.random.default_rng(0)
    data = {"tokens": rng.integers(0, 64, (n, 32)).astype(np.int32), "mask": np.ones((n, 32), np.float32)}
    ids = [f"seq-{i:05d}" for i in range(n)]
    return model, logra, data, ids


# ------------------------------------------------------------------------------------ tests/test_influence.py

def spd(d, seed):
    """A random symmetric positive definite ``d × d`` matrix (float64), eigenvalues in about [1, 5]."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d))
    return A @ A.T / d + np.eye(d)


class SolvePrecond:
    """H⁻¹ g by solving with an explicit SPD matrix H (pure jax, traceable)."""

    def __init__(self, H):
        import jax.numpy as jnp

        self.H = jnp.asarray(H, jnp.float32)

    def apply(self, g):
        import jax.numpy as jnp

        return jnp.linalg.solve(self.H, g.T).T


def influence_reference(q, z, H=None, mode="dot"):
    """Scores of queries ``q`` against rows ``z`` in float64 numpy (``H``: the preconditioner's matrix)."""
    q, z = q.astype(np.float64), z.astype(np.float64)
    Hinv = np.eye(q.shape[1]) if H is None else np.linalg.inv(H)
    s = q @ Hinv @ z.T
    qs = np.einsum("qd,de,qe->q", q, Hinv, q)
    zs = np.einsum("nd,de,ne->n", z, Hinv, z)
    if mode == "dot":
        return s
    if mode == "cosine":
        return s / np.sqrt(qs)[:, None] / np.sqrt(zs)[None, :]
    if mode == "relative":
        return s / np.sqrt(zs)[None, :]
    if mode == "l2":
        return s - 0.5 * zs[None, :]
    raise ValueError(mode)


def pytest_configure(config):
    """One persistent XLA compilation cache per run, in a fresh temporary folder, shared by the xdist workers
    and every subprocess (through the environment, set before any of them imports JAX; removed at the end by
    the process that made it). Executables are compiled once per HLO and set of flags: tests that build new
    LoGra objects over the same model and shapes, parent and child processes and the two workers then load
    the compiled code instead of compiling it again (the same executable: results are bit for bit those of a
    fresh compilation). ``JAXVAL_TEST_XLA_CACHE=0`` turns it off; a ``JAX_COMPILATION_CACHE_DIR`` already
    set is used as it is."""
    if os.environ.get("JAXVAL_TEST_XLA_CACHE", "1") == "0" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    os.environ.update(JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="jaxval-test-xla-cache-"),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                      # no size limit: with one, JAX locks the folder and rescans every entry at each write
                      # (quadratic: measured slower than no cache at a few thousand entries); without, a read
                      # racing a write of the same entry fails its check, warns and compiles
                      JAX_COMPILATION_CACHE_MAX_SIZE="-1",
                      JAXVAL_TEST_XLA_CACHE_OWNER=str(os.getpid()))


def pytest_unconfigure(config):
    if os.environ.get("JAXVAL_TEST_XLA_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# Scheduling under xdist (`-n 2 --dist loadscope --no-loadscope-reorder`, pyproject addopts; the scheduler
# below): the tests of a module whose expensive module- or session-scoped fixture they share run on one worker
# (the fixture is built once per run, not once per worker); every other test is a unit of its own, handed to
# whichever worker is free, in collection order, the longest work first (from a JAXVAL_TEST_PROFILE ranking), so
# that no long test starts last and runs alone on one worker while the other idles. (xdist's `xdist_group`
# marks do nothing under pytest 9: xdist 3.8 renames `item._nodeid`, which pytest 9 no longer reads.)
ONE_WORKER = ("test_bad_inputs.py", "test_bert.py", "test_distributed.py", "test_linfik.py", "test_llama.py",
              "test_pipeline.py", "test_sharding.py")
FIRST = ("tests/test_experiments.py::test_linfik_wikitext_tiny", "tests/test_experiments.py::test_linfik_howdy_tiny",
         "tests/test_distributed.py", "tests/test_experiments.py::test_experiment_tiny[lds_gpt]",
         "tests/test_sharding.py", "tests/test_howdy_finetune.py", "tests/test_experiments_text.py",
         "tests/test_experiments.py::test_experiment_tiny[lds_fmnist]", "tests/test_bad_inputs.py",
         "tests/test_experiments.py::test_experiment_tiny[lds_logreg]", "tests/test_llama.py", "tests/test_pipeline.py",
         "tests/test_bert.py", "tests/test_linfik.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, p in enumerate(FIRST) if item.nodeid.startswith(p)), len(FIRST))

    items.sort(key=rank)   # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadscope``: one unit per ONE_WORKER module, one per test elsewhere."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleOrTest(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path.rsplit("/", 1)[-1] in ONE_WORKER else nodeid

    return ModuleOrTest(config, log)


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


_SETUP_CPU = pytest.StashKey[float]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    c = _cpu()
    yield
    item.stash[_SETUP_CPU] = _cpu() - c


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = os.environ.get("JAXVAL_TEST_PROFILE")
    if not path:
        yield
        return
    counts = _compile_counts(item.session)
    before = dict(counts)
    start, t, c = time.time(), time.perf_counter(), _cpu()
    yield
    with open(path, "a") as f:
        f.write(json.dumps({"test": item.nodeid, "wall": round(time.perf_counter() - t, 2),
                            "cpu": round(_cpu() - c, 2), "setup_cpu": round(item.stash.get(_SETUP_CPU, 0.0), 2),
                            "compiles": counts["compiles"] - before["compiles"],
                            "cache_hits": counts["hits"] - before["hits"],
                            "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                            "start": round(start, 2)}) + "\n")


_COUNTS = pytest.StashKey[dict]()


def _compile_counts(session) -> dict:
    """This process's XLA compilations (a persistent-cache hit counts as one too) and cache hits so far."""
    if _COUNTS not in session.stash:
        import jax

        counts = session.stash[_COUNTS] = {"compiles": 0, "hits": 0}

        def on_duration(name, *args, **kw):
            if name.endswith("backend_compile_duration"):
                counts["compiles"] += 1

        def on_event(name, *args, **kw):
            if name.endswith("compilation_cache/cache_hits"):
                counts["hits"] += 1

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)
    return session.stash[_COUNTS]
