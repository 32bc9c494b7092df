"""Fine-tuning across processes with FSDP2 (torch.distributed.fsdp.fully_shard): parameters, gradients and
optimiser state sharded over the ranks, each rank training on its share of every batch.

    dist.init_process_group("gloo")     # under torchrun: launch.init_from_env()
    shard_for_training(model)           # one group per decoder layer, the rest (embedding = tied head) one more

Each decoder layer is one FSDP group, gathered for its forward and backward and freed after; the
root group holds what is left: the embedding, which is the tied LM head (one parameter, so one
group, as the issue of tied weights in separate groups would otherwise double it), the final norm
and a classifier's score layer. The mesh is the CPU's under gloo (a CUDA-visible process would
otherwise move the parameters to the GPU, pytorch#132471) and the GPU's under NCCL.

The loss is normalised by the number of targets in the whole step (every rank, every
micro-batch), not by a mean per rank: `global_targets` is the one all-reduce that needs, and the
trainer scales each micro-batch's mean by its share of that count. FSDP averages gradients over
the ranks (a sum divided by the world size: gloo has no pre-multiplied sum), so the trainer
multiplies by the world size to make that average a sum.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gemma2.distributed.tensor_parallel import backbone_of


def world() -> tuple[int, int]:
    """(rank, world size) of the default group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_for_training(model: nn.Module) -> nn.Module:
    """Wrap a model for FSDP2 training over the default group (in place; returns it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    _, size = world()
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (size,))
    for layer in backbone_of(model).layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if hasattr(model, "chunked_loss"):  # training's loss is a method of its own, not forward
        register_fsdp_forward_method(model, "chunked_loss")
    return model


def global_sum(value: float, device: torch.device | str = "cpu") -> float:
    """`value` summed over every rank (the value itself on one process); float64, so that counts of
    targets stay exact."""
    _, size = world()
    if size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())


def global_targets(count: int, device: torch.device | str = "cpu") -> int:
    """The number of targets summed over every rank (the count itself on one process)."""
    return int(global_sum(count, device))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors on rank 0 (empty on the others), gathered from the shards, on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return dict(get_model_state_dict(model, options=options))  # type: ignore[arg-type]


def save_training_state(directory: Any, model: nn.Module, optimizer: Any, extra: dict[str, Any]) -> None:
    """The sharded training state, written by every rank with torch.distributed.checkpoint (DCP):
    it loads again at any world size, one process included."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state, **extra}, checkpoint_id=str(directory))


def load_training_state(directory: Any, model: nn.Module, optimizer: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """Restore what save_training_state wrote (at this run's world size); returns `extra` as saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, **extra}
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is what we mean
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return {key: state[key] for key in extra}
