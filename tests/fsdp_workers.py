"""What each rank of the FSDP2 tests runs; the single-process side runs the same functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import tp_workers

from gemma2.train.data import PackedRows
from gemma2.train.trainer import TrainSettings, causal_lm_loss, causal_lm_targets, train

FIELDS: dict[str, Any] = {**tp_workers.FIELDS_FOR_TRAINING}


def rows() -> PackedRows:
    """Six rows of 10 tokens, padded unequally at the end (labels -100), so ranks hold unequal targets."""
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(4, FIELDS["vocab_size"], (6, 10), generator=generator)
    labels = ids.clone()
    for row, kept in enumerate([10, 3, 7, 10, 2, 6]):
        labels[row, kept:] = -100
    positions = torch.arange(10).expand(6, 10).contiguous()
    return PackedRows(ids, positions, labels)


def trained(payload: dict[str, Any]) -> dict[str, Any]:
    """Train a fresh model (sharded when there is a process group) and return its whole weights."""
    import torch.distributed as dist

    from gemma2.distributed import fsdp

    model = tp_workers.build(FIELDS, seed=2)
    if payload.get("lora"):
        from gemma2.train.lora import apply_lora

        apply_lora(model, rank=4, alpha=8.0)
        # Both LoRA factors random: with one of them zero, the other's first gradient is ~0, and
        # AdamW's first step (about lr times its sign) would turn rounding noise into +-lr.
        generator = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for name, parameter in sorted(model.named_parameters()):
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if dist.is_initialized():
        fsdp.shard_for_training(model)
    settings = TrainSettings(
        max_steps=payload["steps"],
        batch_size=payload["batch"],
        lr=1e-2,
        warmup_steps=1,
        progress=False,
        save_every=payload.get("save_every", 0),
    )
    checkpoint = Path(payload["checkpoint"]) if payload.get("checkpoint") else None
    result = train(
        model,
        rows(),
        settings,
        causal_lm_loss,
        None,
        lambda _: None,
        checkpoint,
        payload.get("resume", False),
        targets=causal_lm_targets,
    )
    state = (
        fsdp.full_state_dict(model)
        if dist.is_initialized()
        else {k: v.detach().clone() for k, v in model.state_dict().items()}
    )
    return {"loss": result["train_loss"], "state": state, "initial": initial}
