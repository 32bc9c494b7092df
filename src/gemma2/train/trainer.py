"""The training loop: AdamW, linear warmup then cosine decay, gradient accumulation, clipping,
optional bf16 autocast, evaluation perplexity, and a progress bar with loss, learning rate and tokens/s.

It works on any causal-LM rows (see data.PackedRows) and is usable from a user's own code:

    rows = pack_documents(docs, seq_len=512, bos_token_id=2)
    train_causal_lm(model, rows, TrainSettings(max_steps=1000), eval_rows=held_out)
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import torch

from gemma2.heads import Gemma2ForCausalLM
from gemma2.train.data import PackedRows
from gemma2.train.loss import chunked_causal_lm_loss


@dataclass
class TrainSettings:
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    bf16: bool = False
    seed: int = 0
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 20
    max_seconds: float | None = None  # stop early (and say so) after this much wall time
    progress: bool = True


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(1, settings.max_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    floor = settings.lr * settings.min_lr_ratio
    return floor + (settings.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def causal_lm_loss(model: Gemma2ForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss of a packed batch, with the chunked (memory-lean) loss."""
    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
    return chunked_causal_lm_loss(hidden, model.lm_head.weight, batch["labels"], model.config.final_logit_softcapping)


@torch.no_grad()
def evaluate(model: Gemma2ForCausalLM, rows: PackedRows, batch_size: int, max_batches: int | None = None) -> float:
    """Mean token loss over rows (perplexity = exp of it)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for index, start in enumerate(range(0, len(rows), batch_size)):
        if max_batches is not None and index >= max_batches:
            break
        batch = rows.batch(torch.arange(start, min(start + batch_size, len(rows))))
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += float(causal_lm_loss(model, batch)) * tokens
        count += tokens
    model.train(was_training)
    return total / max(1, count)


class Batches(Protocol):
    """Training data: a length and a way to build the batch of given example indices."""

    def __len__(self) -> int: ...

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]: ...


def train_causal_lm(
    model: Gemma2ForCausalLM,
    rows: PackedRows,
    settings: TrainSettings,
    eval_rows: PackedRows | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Train a causal LM in place; returns the final train loss, eval loss / perplexity and tokens per second."""

    def evaluate_rows(m: torch.nn.Module, limit: int | None) -> dict[str, float]:
        assert eval_rows is not None and isinstance(m, Gemma2ForCausalLM)
        loss = evaluate(m, eval_rows, settings.batch_size, limit)
        return {"eval_loss": loss, "eval_perplexity": math.exp(loss)}

    loss_fn = cast(Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor], causal_lm_loss)
    return train(model, rows, settings, loss_fn, evaluate_rows if eval_rows is not None else None, log)


def train(
    model: torch.nn.Module,
    data: Batches,
    settings: TrainSettings,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    eval_fn: Callable[[torch.nn.Module, int | None], dict[str, float]] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """The loop for any head: loss_fn(model, batch) gives the loss, eval_fn(model, max_batches) the metrics."""
    log = log or (lambda text: print(text, file=sys.stderr))
    generator = torch.Generator().manual_seed(settings.seed)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=settings.betas,
    )
    bar = None
    if settings.progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.max_steps, desc="training", file=sys.stderr, dynamic_ncols=True)
    model.train()
    batch_size = min(settings.batch_size, len(data))
    order = torch.randperm(len(data), generator=generator)
    cursor = 0
    start = time.perf_counter()
    tokens_seen = 0
    loss_ema = None
    step = 0
    for step in range(settings.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(settings.grad_accum):
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(data), generator=generator), 0
            batch = data.batch(order[cursor : cursor + batch_size])
            cursor += batch_size
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
                loss = loss_fn(model, batch) / settings.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
            counted = batch.get("attention_mask", batch["labels"] != -100)
            tokens_seen += int(counted.sum())
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], settings.max_grad_norm)
        optimizer.step()
        loss_ema = step_loss if loss_ema is None else 0.98 * loss_ema + 0.02 * step_loss
        elapsed = time.perf_counter() - start
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(
                f"loss {loss_ema:.3f} lr {optimizer.param_groups[0]['lr']:.2e} {tokens_seen / elapsed:,.0f} tok/s"
            )
        if settings.eval_every and eval_fn is not None and (step + 1) % settings.eval_every == 0:
            metrics = eval_fn(model, settings.eval_batches)
            log(f"step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if settings.max_seconds is not None and elapsed > settings.max_seconds:
            log(
                f"stopping at step {step + 1} of {settings.max_steps}: the {settings.max_seconds:.0f} s budget is spent"
            )
            break
    if bar is not None:
        bar.close()
    model.eval()
    result = {
        "steps": float(step + 1),
        "train_loss": float(loss_ema or 0.0),
        "tokens_per_second": tokens_seen / max(1e-9, time.perf_counter() - start),
    }
    if eval_fn is not None:
        result.update(eval_fn(model, None))
    return result
