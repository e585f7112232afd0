"""Multi-node tensor parallelism: one process per rank, started by torchrun (or any launcher
that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT).

    # machine A (rank 0: the server and the scheduler), machine B (rank 1: a worker)
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --master-addr A --master-port 29500 \\
        -m engine.distributed.launch --model PATH -tp 2 --host 0.0.0.0 --port 8000
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 1 --master-addr A --master-port 29500 \\
        -m engine.distributed.launch --model PATH -tp 2

Every rank takes the server's command line (`python -m engine.server`'s flags; the engine
arguments must be the same everywhere, and the model path must exist on every machine). Rank 0
joins the process group and runs the server, whose engine takes that group instead of spawning
workers; every other rank joins it and runs the worker loop (engine/distributed/worker.py) until
rank 0 stops. WORLD_SIZE must equal --tensor-parallel-size. On CUDA, rank r uses the device
cuda:LOCAL_RANK.
"""

from __future__ import annotations

import logging
import os
import sys

from engine.config import resolve_device
from engine.distributed.executor import set_launched_group, shutdown_all
from engine.distributed.parallel_state import destroy_groups, init_groups
from engine.distributed.worker import rank_device, run_worker

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    from engine.server import __main__ as server_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in names if k not in os.environ]
    if missing:
        print(
            f"error: {', '.join(missing)} not set; start this module with torchrun (or use "
            "`python -m engine.server --tensor-parallel-size N` on one machine)",
            file=sys.stderr,
        )
        return 2
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    args = server_cli.engine_args_from(server_cli.build_parser().parse_args(argv))
    if args.tensor_parallel_size != world_size:
        print(
            f"error: --tensor-parallel-size {args.tensor_parallel_size} differs from "
            f"WORLD_SIZE {world_size}",
            file=sys.stderr,
        )
        return 2
    args = rank_device(args, local_rank)
    tp = init_groups(rank, world_size, resolve_device(args.device), init_method="env://")
    try:
        if rank == 0:
            set_launched_group(tp)
            if args.device != "auto":
                argv += ["--device", args.device]
            return server_cli.main(argv)
        logging.basicConfig(level=logging.INFO)
        run_worker(args, tp)
        return 0
    finally:
        if rank == 0:
            shutdown_all()  # tells the workers to stop
            set_launched_group(None)
        destroy_groups()


if __name__ == "__main__":
    sys.exit(main())
