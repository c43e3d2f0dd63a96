"""Suite-wide settings.

The suite is compile-bound (tiny models, many shapes): XLA's CPU backend is asked for cheap code generation
(LLVM optimisation level 0, no expensive passes), which cuts the suite's CPU time by about a fifth to a third
without changing what is computed (HLO passes still run; only machine-code optimisation is lighter). The
flags go into the environment before JAX starts, so subprocesses (experiments, multi-process runs) get them
too. ``JAXVAL_TEST_FULL_XLA=1`` runs the suite with XLA's default optimisation instead.

``JAXVAL_TEST_PROFILE=path.jsonl`` appends each test's wall and CPU seconds (its own process and its
subprocesses) to that file, to find what makes the suite slow.
"""

import json
import os
import resource
import time

import pytest

CHEAP_XLA = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")

if os.environ.get("JAXVAL_TEST_FULL_XLA") != "1":
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in CHEAP_XLA if f.split("=")[0] not in
                                                {g.split("=")[0] for g in flags}])


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    path = os.environ.get("JAXVAL_TEST_PROFILE")
    if not path:
        yield
        return
    t, c = time.perf_counter(), _cpu()
    yield
    with open(path, "a") as f:
        f.write(json.dumps({"test": item.nodeid, "wall": round(time.perf_counter() - t, 2),
                            "cpu": round(_cpu() - c, 2)}) + "\n")
