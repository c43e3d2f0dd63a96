"""Several processes with ``jax.distributed``: start-up, the global mesh, row ownership, the launcher.

Public re-exports of :mod:`jaxval._src.parallel`; ``python -m jaxval.distributed -n 2 -- CMD`` launches
``CMD`` in ``n`` local processes.
"""

import sys

from jaxval._src.parallel import (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, LaunchResult, Topology,
                                  allgather_rows, barrier, free_port, global_batch, global_mesh,
                                  global_rows, initialize, is_initialized, launch, make_mesh,
                                  owned_blocks, owned_range, replicate, shard_params, sum_across_processes,
                                  to_host, to_mesh, topology, write_once, xla_flags)
from jaxval.cli.launch import main

__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "LaunchResult", "Topology", "allgather_rows",
           "barrier", "free_port", "global_batch", "global_mesh", "global_rows", "initialize",
           "is_initialized", "launch", "main", "make_mesh", "owned_blocks", "owned_range", "replicate",
           "shard_params", "sum_across_processes", "to_host", "to_mesh", "topology", "write_once", "xla_flags"]

if __name__ == "__main__":
    sys.exit(main())
