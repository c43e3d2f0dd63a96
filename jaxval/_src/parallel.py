"""Scale-out: the same pipeline on one device or on many processes (JAX's multi-controller runtime).

One process per host (or, for local tests, several processes on 127.0.0.1), each driving its own
devices; together they form one global device set and one global :class:`jax.sharding.Mesh`.

Start-up (:func:`initialize`), in order of precedence:

1. explicit arguments ``coordinator``, ``num_processes``, ``process_id``;
2. the environment variables ``JAXVAL_COORDINATOR`` (``host:port``), ``JAXVAL_NUM_PROCESSES``,
   ``JAXVAL_PROCESS_ID`` (what :func:`launch` sets);
3. JAX's own cluster detection (Cloud TPU VMs/pods, SLURM, Open MPI, Kubernetes, or
   ``JAX_COORDINATOR_ADDRESS`` & co.): ``jax.distributed.initialize()`` with no arguments;
4. otherwise a single process: nothing is initialised and everything below degenerates to
   one-process behaviour, so the same script runs unchanged on a laptop.

How the pipeline's stages divide the work (every process runs the same program):

- **log**: :func:`owned_blocks` gives each process disjoint, chunk-aligned row blocks of the store;
  process 0 creates the store, the others open it (waiting for the manifest), every process writes
  and marks done only its own blocks, so a rerun after a crash recomputes exactly the missing blocks
  (``jaxval.log_gradients`` itself, whose process defaults come from jax).
- **fit**: ``jaxval.fit_preconditioner`` with a mesh spanning the processes (the default under
  ``jax.distributed``): each global batch is a global ``jax.Array`` sharded over the mesh's data axis,
  each process materialising only its addressable rows (:func:`global_rows`), and the compiled step's
  sums over the batch axis become cross-process all-reduces. Batching is identical to the one-process
  run, so the result is the same up to float summation order.
  :func:`sum_across_processes` sums host-side statistics when a caller accumulates them per process.
- **score**: :func:`jaxval.influence` / :func:`jaxval.top_k` / :func:`jaxval.self_influence` themselves
  give each process a contiguous range of training rows (:func:`owned_range`, chunk-aligned for a store),
  score it locally, and gather the ``[Q, N]`` matrix (or merge the per-process top-k) on every process;
  process 0 alone writes the result file (:func:`write_once`).

The local launcher :func:`launch` (``jaxval launch -n 2 -- jaxval log ...``, the command in
:mod:`jaxval.cli.launch`) starts ``n`` processes on
127.0.0.1 with the environment variables set, prefixes their output with ``[p0]``, ``[p1]``, ..., and
kills every child's process group on the first failure or on timeout.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID",
    "Topology", "initialize", "topology", "global_mesh", "make_mesh", "shard_params", "owned_blocks", "owned_range", "barrier",
    "sum_across_processes", "allgather_rows", "global_batch", "replicate", "to_host", "to_mesh",
    "global_rows", "spans_processes", "write_once",
    "launch", "LaunchResult", "free_port",
]

ENV_COORDINATOR = "JAXVAL_COORDINATOR"
ENV_NUM_PROCESSES = "JAXVAL_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXVAL_PROCESS_ID"


# ============================================================================ start-up


@dataclasses.dataclass(frozen=True)
class Topology:
    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    initialized: bool            # True when jax.distributed was initialised (by us or before us)

    @property
    def is_main(self) -> bool:
        return self.process_index == 0


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    try:
        return int(v)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={v!r} must be an integer") from e


def _cluster_detected() -> bool:
    """Whether this process is one of several that a cluster manager started (read from the environment
    variables the managers set; JAX's own detection then finds the coordinator)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if env.get("SLURM_JOB_ID") and (_env_int("SLURM_NTASKS") or 1) > 1:
        return True
    if env.get("OMPI_MCA_orte_hnp_uri") and (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def is_initialized() -> bool:
    """Whether ``jax.distributed`` has been started in this process."""
    import jax

    return bool(jax.distributed.is_initialized())


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, local_device_ids: Sequence[int] | None = None, timeout: int = 300,
               auto_detect: bool = True) -> Topology:
    """Start JAX's multi-controller runtime if this is one of several processes; see the module doc.

    Must run before anything touches a JAX backend. Idempotent: a second call (or a runtime started by
    the caller) returns the topology. ``timeout``: seconds to wait for all processes to join.
    """
    import jax

    if not is_initialized():
        coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
        num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
        process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
        explicit = [coordinator is not None, num_processes is not None, process_id is not None]
        if any(explicit) and num_processes not in (None, 1):
            if not all(explicit):
                raise ValueError(
                    "several processes need all of coordinator (host:port), num_processes and process_id: got "
                    f"coordinator={coordinator!r}, num_processes={num_processes!r}, process_id={process_id!r}; set "
                    f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID} or pass them as arguments")
            if not 0 <= int(process_id) < int(num_processes):
                raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num_processes),
                                       process_id=int(process_id), local_device_ids=local_device_ids,
                                       initialization_timeout=int(timeout))
        elif num_processes in (None,) and auto_detect and _cluster_detected():
            jax.distributed.initialize(local_device_ids=local_device_ids, initialization_timeout=int(timeout))
    return topology()


def topology() -> Topology:
    import jax

    return Topology(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                    is_initialized())


def global_mesh(axis: str = "data", devices: Sequence | None = None):
    """A 1-D mesh over every process's devices (process-major order), with an Auto axis ``axis``.

    Auto (not Explicit) axes, so contractions over the sharded batch axis need no ``out_sharding``.
    """
    import jax
    from jax.sharding import Mesh

    devs = list(devices) if devices is not None else jax.devices()
    devs = sorted(devs, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devs), (axis,))


def make_mesh(devices: Sequence | None = None, **axes: int):
    """A mesh over ``devices`` (default: every process's devices, process-major) with Auto axes of the
    given sizes, in the order given: ``make_mesh(data=2, model=4)``; one size may be ``-1`` (the rest).

    The first axis is the batch axis of jaxval's ``mesh=`` arguments. Auto, not Explicit axes
    (``jax.make_mesh``'s default): under Explicit axes ``nnx.Embed``'s ``jnp.take`` of a sharded table
    raises ``ShardingTypeError`` and contractions over a sharded batch need ``out_sharding``. Process-major
    order: with ``data`` = the process count, each process holds one ``data`` row of the mesh.
    """
    import jax
    from jax.sharding import Mesh

    if not axes:
        raise ValueError("give the mesh axes and their sizes, e.g. make_mesh(data=2, model=4)")
    devs = sorted(list(devices) if devices is not None else jax.devices(), key=lambda d: (d.process_index, d.id))
    sizes = [int(s) for s in axes.values()]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive, with at most one -1; got {dict(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and len(devs) % known == 0:
        sizes[sizes.index(-1)] = len(devs) // known
    if math.prod(sizes) != len(devs):
        raise ValueError(f"a mesh {dict(axes)} needs {known if -1 in sizes else math.prod(sizes)}·k devices, "
                         f"there are {len(devs)}: change the axis sizes (or pass devices=)")
    return Mesh(np.array(devs).reshape(sizes), tuple(axes))


def shard_params(model, mesh, axis: str = "model",
                 rules: Callable[[str, tuple[int, ...]], Any] | None = None):
    """Place every array of ``model``'s state on ``mesh``, in place (FSDP / tensor parallel); returns ``model``.

    A leaf at path ``p`` (``"blocks/0/mlp/fc/kernel"``) of shape ``s`` gets ``NamedSharding(mesh,
    rules(p, s))`` when ``rules`` gives a ``PartitionSpec``; otherwise (no rules, or ``rules`` returned None)
    its largest dimension that ``mesh.shape[axis]`` divides is split over ``axis`` and the leaf is
    replicated over the other axes (no such dimension: fully replicated; PRNG keys: replicated).
    Under ``jax.distributed`` every process calls it with the same values (same seed or checkpoint); each
    materialises only its addressable shards. The jaxval stages keep these shardings: the compiled steps
    take the state as it is placed.
    """
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    if axis not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.axis_names)}, not {axis!r}: pass axis= one of them")
    size = int(mesh.shape[axis])

    def spec(path: str, shape: tuple[int, ...]):
        s = rules(path, shape) if rules is not None else None
        if s is not None:
            return s
        dims = [i for i, n in enumerate(shape) if n >= size and n % size == 0]
        if not dims:
            return PartitionSpec()
        i = max(dims, key=lambda d: (shape[d], -d))
        return PartitionSpec(*(axis if d == i else None for d in range(len(shape))))

    def place(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:   # already global: reshard on device
            return jax.jit(lambda a: a, out_shardings=sharding)(x)
        host = np.asarray(x)          # from the host: no slicing program compiled per leaf shape
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    def one(kp, x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = place(jax.random.key_data(x), NamedSharding(mesh, PartitionSpec()))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        path = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp
                        if not isinstance(k, jax.tree_util.GetAttrKey))
        return place(x, NamedSharding(mesh, spec(path, tuple(np.shape(x)))))

    nnx.update(model, jax.tree_util.tree_map_with_path(one, nnx.state(model)))
    return model


def barrier(name: str = "jaxval") -> None:
    """Wait until every process reaches this point (a no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ============================================================================ row ownership


def owned_blocks(num_rows: int, chunk_rows: int, process_index: int | None = None,
                 process_count: int | None = None) -> list[tuple[int, int]]:
    """The chunk-aligned row blocks ``[(start, stop), ...]`` process ``process_index`` owns when logging.

    Chunks are dealt out round-robin (process ``p`` of ``P`` gets chunks ``p, p+P, p+2P, ...``, the
    assignment of :func:`jaxval.pipeline.log_gradients`), so each process writes whole chunk files that
    no other process touches, the load stays balanced when rows differ in cost along the dataset, and
    the assignment does not depend on what is already done (resume).
    """
    import jax

    p = jax.process_index() if process_index is None else int(process_index)
    n = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= p < n:
        raise ValueError(f"process_index must be in [0, {n}), got {p}")
    if chunk_rows <= 0 or num_rows < 0:
        raise ValueError(f"need chunk_rows > 0 and num_rows >= 0, got {chunk_rows}, {num_rows}")
    chunks = math.ceil(num_rows / chunk_rows)
    return [(c * chunk_rows, min((c + 1) * chunk_rows, num_rows)) for c in range(p, chunks, n)]


def spans_processes(mesh) -> bool:
    """Whether ``mesh`` (a ``jax.sharding.Mesh`` or None) holds devices of processes other than this one."""
    import jax

    return mesh is not None and any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def owned_range(num_rows: int, process_index: int | None = None, process_count: int | None = None,
                align: int = 1) -> tuple[int, int]:
    """The contiguous row range ``[start, stop)`` of process ``process_index`` (``align``-aligned starts)."""
    import jax

    p = jax.process_index() if process_index is None else int(process_index)
    n = jax.process_count() if process_count is None else int(process_count)
    units = math.ceil(num_rows / align)
    return min(num_rows, (p * units // n) * align), min(num_rows, ((p + 1) * units // n) * align)


# ============================================================================ collectives


def sum_across_processes(tree: Any, mesh=None) -> Any:
    """Sum a pytree of host-local arrays over all processes (statistics); every process gets the sum.

    One all-reduce per leaf over the global mesh (each process contributes its value on its first local
    device, zeros elsewhere), so the traffic per host is ~2x the leaf size whatever the process count
    (not P x, as an all-gather would be). Sums are in float32 for floating leaves (int32 for integer ones);
    the result is bit-identical on every process.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    if jax.process_count() == 1:
        return jax.tree_util.tree_map(lambda x: np.asarray(x), tree)
    mesh = mesh if mesh is not None else global_mesh()
    axis = mesh.axis_names[0]
    nloc = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    summed = jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))

    def one(x):
        x = np.asarray(x)
        dt = np.float32 if np.issubdtype(x.dtype, np.floating) or x.dtype == np.bool_ else np.int32
        local = np.zeros((nloc,) + x.shape, dt)
        local[0] = x
        g = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec(axis)), local,
                                                   (mesh.size,) + x.shape)
        return np.asarray(summed(g).addressable_data(0)).astype(x.dtype if x.dtype != np.bool_ else dt)

    return jax.tree_util.tree_map(one, tree)


def allgather_rows(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Concatenate every process's ``x`` along ``axis`` in process order (shapes may differ on ``axis``)."""
    import jax

    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([x.shape[axis]], np.int64))).reshape(-1)
    m = int(sizes.max())
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, m - x.shape[axis])
    got = np.asarray(multihost_utils.process_allgather(np.pad(x, pad)))  # [P, ..., m, ...]
    parts = [np.take(got[i], np.arange(int(s)), axis=axis) for i, s in enumerate(sizes)]
    return np.concatenate(parts, axis=axis)


def to_host(tree: Any) -> Any:
    """Host numpy copies of a pytree of (possibly global, fully replicated) arrays."""
    import jax

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError("to_host needs a fully replicated global array; gather it first")
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)


def replicate(tree: Any, mesh) -> Any:
    """Place a pytree of host values (the same on every process) replicated on every device of ``mesh``."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    sh = NamedSharding(mesh, PartitionSpec())

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        a = np.asarray(x)
        return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])

    return jax.tree_util.tree_map(one, tree)


def to_mesh(tree: Any, mesh) -> Any:
    """``tree`` on ``mesh``: arrays that already span several processes stay as they are (sharded parameters
    keep their sharding, see :func:`shard_params`); every other value (on the host or on this process's
    devices, the same on every process) is replicated on every device of ``mesh`` (:func:`replicate`)."""
    import jax

    def one(x):
        return x if isinstance(x, jax.Array) and not x.is_fully_addressable else replicate(x, mesh)

    return jax.tree_util.tree_map(one, tree)


def global_batch(batch: Any, mesh, axis: str | None = None) -> Any:
    """A global batch sharded over ``mesh``'s first (or ``axis``) axis from the global host batch.

    Every process may hold (or lazily index) the whole batch; only the rows of its addressable shards
    are read (``jax.make_array_from_callback`` calls back for addressable shards only). A leading size not
    divisible by the axis size is replicated instead (every device computes the whole small batch, and
    the sums stay correct).
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    axis = axis or mesh.axis_names[0]
    ndev = mesh.shape[axis]
    batch = _rows_tree(batch)

    def one(a):
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(a)), impl=jax.random.key_impl(a))
        a = a if isinstance(a, _RowView) else np.asarray(a)
        spec = PartitionSpec(axis) if a.shape[0] % ndev == 0 else PartitionSpec()
        return jax.make_array_from_callback(tuple(a.shape), NamedSharding(mesh, spec),
                                            lambda idx: np.asarray(a[idx]))

    return jax.tree_util.tree_map(one, batch)


# ============================================================================ the stages


def global_rows(data: Any, start: int, stop: int, mesh) -> Any:
    """Rows ``[start, stop)`` of ``data`` (a pytree with leading axis N, the same on every process; arrays
    may be lazy, e.g. memmaps) as a global batch over ``mesh`` (:func:`global_batch`): each process reads
    only the rows of its addressable shards."""
    return global_batch(_LazyRows(data, start, stop), mesh)


class _LazyRows:
    """Rows ``[start, stop)`` of a pytree ``data``, indexed lazily (for ``global_batch``)."""

    def __init__(self, data, start, stop):
        self.data, self.start, self.stop = data, start, stop

    def leaves(self):
        import jax

        return jax.tree_util.tree_map(lambda a: _RowView(a, self.start, self.stop), self.data)


class _RowView:
    def __init__(self, a, start, stop):
        self.a, self.start, self.stop = a, start, stop
        self.shape = (stop - start,) + tuple(a.shape[1:])

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        rows = idx[0] if idx else slice(None)
        r = range(self.stop - self.start)[rows]
        return np.asarray(self.a[self.start + r.start:self.start + r.stop:r.step])[(slice(None),) + idx[1:]]


def _rows_tree(lazy):
    return lazy.leaves() if isinstance(lazy, _LazyRows) else lazy


def write_once(path: str, write: Callable[[str], Any]) -> None:
    """Process 0 calls ``write(path)``; every process then waits for it (a result written exactly once)."""
    import jax

    if jax.process_index() == 0:
        write(path)
    barrier("jaxval-write-once")


# ============================================================================ local launcher


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pump(stream, prefix: str, out, lock):
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        with lock:
            out.write(f"{prefix} {line}\n")
            out.flush()
    stream.close()


def _signal_group(pid: int, sig) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM the child's process group (it leads its own session), then SIGKILL after ``grace`` s."""
    if proc.poll() is not None:  # the leader is gone; its group may still hold children
        _signal_group(proc.pid, signal.SIGKILL)
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_group(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass



_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None = None, flags: str | None = None) -> str:
    """``flags`` (default: this process's ``XLA_FLAGS``) without any host device count, plus ``devices``
    simulated CPU devices when given: the ``XLA_FLAGS`` of a child process that keeps its parent's other
    XLA settings (a child compared bit for bit with its parent must compile alike)."""
    kept = [f for f in (os.environ.get("XLA_FLAGS", "") if flags is None else flags).split()
            if not f.startswith(_DEVICE_COUNT)]
    return " ".join(kept + ([f"{_DEVICE_COUNT}={int(devices)}"] if devices is not None else []))


def launch(n: int, cmd: Sequence[str] | str, port: int | None = None, timeout: float | None = 3600.0, *,
           host: str = "127.0.0.1", local_devices: int | None = None, env: Mapping[str, str] | None = None,
           cwd: str | None = None, out=None, grace: float = 3.0) -> list[int]:
    """Run ``cmd`` as ``n`` cooperating processes on ``host``; return their exit codes (process order).

    Each child gets ``JAXVAL_COORDINATOR=host:port``, ``JAXVAL_NUM_PROCESSES=n``, ``JAXVAL_PROCESS_ID=i``
    (and, with ``local_devices=k``, ``--xla_force_host_platform_device_count=k`` in ``XLA_FLAGS``), runs in
    its own process group, and has its output lines prefixed with ``[p<i>]``. When any child exits
    non-zero, or ``timeout`` seconds pass, every remaining child's process group is terminated (SIGTERM,
    then SIGKILL), and the launcher reports which process failed. A killed child's code is negative
    (``-signal``), as in :mod:`subprocess`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    if not argv:
        raise ValueError("no command to launch")
    out = out or sys.stdout
    port = port or free_port(host)
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []

    def say(msg):
        with lock:
            out.write(f"[launch] {msg}\n")
            out.flush()

    base = dict(os.environ if env is None else env)
    try:
        for i in range(n):
            e = dict(base)
            e.update({ENV_COORDINATOR: f"{host}:{port}", ENV_NUM_PROCESSES: str(n), ENV_PROCESS_ID: str(i),
                      "PYTHONUNBUFFERED": "1"})
            if local_devices:
                e["XLA_FLAGS"] = xla_flags(int(local_devices), e.get("XLA_FLAGS", ""))
            p = subprocess.Popen(argv, env=e, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}]", out, lock), daemon=True)
            t.start()
            pumps.append(t)
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        failed = None
        while True:
            codes = [p.poll() for p in procs]
            bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                say(f"process {failed} (pid {procs[failed].pid}) exited with code {codes[failed]}; "
                    "stopping the others")
                break
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                say(f"timeout after {timeout:g} s; stopping processes "
                    f"{[i for i, c in enumerate(codes) if c is None]}")
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            _kill_group(p, grace)
        for t in pumps:
            t.join(timeout=2.0)
    return LaunchResult([p.returncode for p in procs], pids=[p.pid for p in procs], failed=failed)


class LaunchResult(list):
    """The exit codes of :func:`launch` (a list, process order), with the children's ``pids`` and ``failed``: the
    process whose non-zero exit stopped the others (None when none failed, or on a timeout). The others' codes
    are then what stopping them gave (``-15``), whatever their place in the list."""

    def __init__(self, codes, pids=(), failed: int | None = None):
        super().__init__(codes)
        self.pids = list(pids)
        self.failed = failed
