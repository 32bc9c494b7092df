"""Beyond one process: tensor-parallel inference on torch.distributed (NCCL on GPUs, gloo on CPUs).

    torchrun --nproc-per-node 2 -m gemma2 generate --model DIR --tp 2 "Hello"

`tensor_parallel.shard_model` splits a built model, `from_pretrained(path, tp_plan="auto")` loads
one with each rank reading only its slices; plan.py holds the split itself, as data.
"""

from gemma2.distributed.plan import TP_PLAN, Layout, check_size, valid_sizes
from gemma2.distributed.tensor_parallel import TensorParallel, shard_model

__all__ = ["TP_PLAN", "Layout", "TensorParallel", "check_size", "shard_model", "valid_sizes"]
