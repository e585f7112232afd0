"""Tensor parallelism on torch.distributed (gloo on CPU, NCCL on CUDA).

parallel_state.py   the TP group a model is built for (rank, size, process groups), process
                    group set-up, free ports
communication.py    the collectives the sharded layers use (all-reduce, gather of the last
                    dim) and the step broadcast between rank 0 and the workers
worker.py           a worker rank's loop: load the shard, allocate its KV cache, run steps
executor.py         rank 0's side: starts the workers, the model proxy the runner calls,
                    failure detection, shutdown
launch.py           multi-node entry point for torchrun-style environments
"""
