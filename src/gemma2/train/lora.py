"""LoRA: low-rank adapters on the attention and MLP projections, saved in PEFT's layout.

Each adapted Linear computes W x + (alpha / r) * B (A x) with A [r, in] initialised like the
reference (Kaiming-uniform) and B [out, r] at zero, so training starts from the base model. Only A
and B train. `save_adapter` writes adapter_config.json and adapter_model.safetensors with PEFT's key
names (base_model.model.<module>.lora_A.weight), which peft loads on transformers' Gemma2;
`merge_lora` folds the adapters into the weights, leaving a plain checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        base.weight.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # code that reads .weight sees the base weight
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def apply_lora(
    model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = DEFAULT_TARGETS
) -> list[str]:
    """Freeze the model and wrap every Linear named in `targets`; returns the wrapped module names."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no Linear named one of {targets} to adapt")
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under PEFT's key names."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            tensors[f"base_model.model.{name}.lora_A.weight"] = module.lora_A.weight.detach().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = module.lora_B.weight.detach().contiguous()
    return tensors


def save_adapter(model: nn.Module, directory: str | Path, base_model: str = "", task_type: str = "CAUSAL_LM") -> None:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's layout)."""
    from gemma2.io.checkpoint import AtomicDirectory

    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("the model has no LoRA adapters")
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear)})
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": layers[0].rank,
        "lora_alpha": layers[0].alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    with AtomicDirectory(directory) as scratch:
        save_file(lora_state_dict(model), str(scratch / "adapter_model.safetensors"), metadata={"format": "pt"})
        (scratch / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling * B A) and unwrap the Linear."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                delta = (child.lora_B.weight.float() @ child.lora_A.weight.float()) * child.scaling
                child.base.weight += delta.to(child.base.weight.dtype)
                setattr(module, child_name, child.base)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model
