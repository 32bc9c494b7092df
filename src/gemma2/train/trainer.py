"""The training loop: AdamW, linear warmup then cosine decay, gradient accumulation, clipping,
optional bf16 autocast, evaluation perplexity, and a progress bar with loss, learning rate and tokens/s.

It works on any causal-LM rows (see data.PackedRows) and is usable from a user's own code:

    rows = pack_documents(docs, seq_len=512, bos_token_id=2)
    train_causal_lm(model, rows, TrainSettings(max_steps=1000), eval_rows=held_out)
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from gemma2.distributed import fsdp
from gemma2.errors import Gemma2Error, TrainingError, TrainingInterrupted  # noqa: F401 (raised here, importable from here too)
from gemma2.heads import Gemma2ForCausalLM
from gemma2.train.data import PackedRows


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
    save_every: int = 0  # with a checkpoint directory: save the training state every N steps
    progress: bool = True


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(1, settings.max_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    floor = settings.lr * settings.min_lr_ratio
    return floor + (settings.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def causal_lm_targets(batch: dict[str, torch.Tensor]) -> int:
    """Positions with a next token to predict (labels[t + 1] not -100): what the causal-LM loss averages over."""
    return int((batch["labels"][:, 1:] != -100).sum())


def examples(batch: dict[str, torch.Tensor]) -> int:
    """One target per example (a sequence classifier's)."""
    return int(batch["input_ids"].shape[0])


def causal_lm_loss(model: Gemma2ForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss of a packed batch, with the chunked (memory-lean) loss."""
    return model.chunked_loss(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
TargetsFn = Callable[[dict[str, torch.Tensor]], int]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Batches,
    batch_size: int,
    max_batches: int | None = None,
    loss_fn: LossFn | None = None,
) -> float:
    """Mean loss per target token over `data` (perplexity = exp of it); causal-LM loss by default."""
    loss_fn = loss_fn or cast(LossFn, causal_lm_loss)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for index, start in enumerate(range(0, len(data), batch_size)):
        if max_batches is not None and index >= max_batches:
            break
        batch = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += float(loss_fn(model, batch)) * tokens
        count += tokens
    model.train(was_training)
    return total / max(1, count)


def perplexity_eval(
    data: Batches, batch_size: int, loss_fn: LossFn | None = None
) -> Callable[[torch.nn.Module, int | None], dict[str, float]]:
    """An eval_fn for `train`: loss and perplexity of a language-modelling task on `data`."""

    def run(model: torch.nn.Module, max_batches: int | None) -> dict[str, float]:
        loss = evaluate(model, data, batch_size, max_batches, loss_fn)
        return {"eval_loss": loss, "eval_perplexity": math.exp(loss)}

    return run


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
    checkpoint: Path | None = None,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train a causal LM in place; returns the final train loss, eval loss / perplexity and tokens per second."""
    evaluation = perplexity_eval(eval_rows, settings.batch_size) if eval_rows is not None else None
    return train(
        model,
        rows,
        settings,
        cast(LossFn, causal_lm_loss),
        evaluation,
        log,
        checkpoint,
        resume,
        on_step,
        causal_lm_targets,
    )


STATE_FILE = "training_state.pt"
SHARDED_STATE = "training_state.dcp"  # a distributed run's, by torch.distributed.checkpoint


def _extra_state(generator: torch.Generator, state: _LoopState) -> dict[str, Any]:
    """What a sharded checkpoint holds beside the model and optimizer (the same on every rank)."""
    return {"generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "loop": state}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class _LoopState:
    """Everything that changes as training goes, so that a resumed run continues exactly."""

    order: torch.Tensor
    cursor: int = 0
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    loss_ema: float | None = None


class _DeferredInterrupt:
    """Turns the first SIGINT into a request checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def train(
    model: torch.nn.Module,
    data: Batches,
    settings: TrainSettings,
    loss_fn: LossFn,
    eval_fn: Callable[[torch.nn.Module, int | None], dict[str, float]] | None = None,
    log: Callable[[str], None] | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
    targets: TargetsFn = examples,
) -> dict[str, float]:
    """The loop for any head: loss_fn(model, batch) gives the loss, eval_fn(model, max_batches) the metrics.

    loss_fn returns a mean over the batch's targets (`targets(batch)` counts them); each step's
    loss is the mean over every target of its micro-batches, so that it does not depend on how
    they split. Under torch.distributed (a model wrapped by gemma2.distributed.fsdp), each batch
    is split over the ranks and the mean is over every rank's targets.

    With `checkpoint`, the whole training state (weights, optimizer, data order, random generators,
    step) is saved there every `settings.save_every` steps and when Ctrl-C interrupts the loop,
    which then raises TrainingInterrupted; `resume=True` continues from it with the same result as
    an uninterrupted run. `on_step(steps_done)` is called after every optimizer step.
    """
    rank, world_size = fsdp.world()
    log = log or (lambda text: print(text, file=sys.stderr) if rank == 0 else None)
    if settings.batch_size < world_size:
        raise TrainingError(f"batch size {settings.batch_size} is smaller than the {world_size} ranks that share it")
    generator = torch.Generator().manual_seed(settings.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": settings.weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=settings.lr,
        betas=settings.betas,
    )
    batch_size = min(settings.batch_size, len(data))
    state = _LoopState(order=torch.randperm(len(data), generator=generator))
    if resume:
        if checkpoint is None or not ((checkpoint / STATE_FILE).exists() or (checkpoint / SHARDED_STATE).exists()):
            raise TrainingError(f"{checkpoint}: no saved training state to resume from")
        if (checkpoint / SHARDED_STATE).exists():  # saved by a distributed run: loads at any world size
            saved = fsdp.load_training_state(
                checkpoint / SHARDED_STATE, model, optimizer, _extra_state(generator, state)
            )
        else:
            saved = torch.load(checkpoint / STATE_FILE, weights_only=False)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["loop"]
        log(f"resuming at step {state.step} of {settings.max_steps} from {checkpoint}")

    def save() -> None:
        assert checkpoint is not None
        if world_size > 1:
            fsdp.save_training_state(checkpoint / SHARDED_STATE, model, optimizer, _extra_state(generator, state))
            return
        checkpoint.mkdir(parents=True, exist_ok=True)
        saved = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "loop": state,
        }
        partial = checkpoint / (STATE_FILE + ".partial")
        torch.save(saved, partial)
        partial.replace(checkpoint / STATE_FILE)

    bar = None
    if settings.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=settings.max_steps, initial=state.step, desc="training", file=sys.stderr, dynamic_ncols=True)
    model.train()
    start, tokens_at_start = time.perf_counter(), state.tokens_seen
    # Ctrl-C never stops a step half-way (AdamW updates the weights one by one): the first one sets a
    # flag, the loop saves the state after the step in progress and stops; a second one stops at once.
    interrupt = _DeferredInterrupt() if checkpoint is not None else None
    try:
        while state.step < settings.max_steps:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state.step, settings)
            optimizer.zero_grad(set_to_none=True)
            batches = []
            for _ in range(settings.grad_accum):
                if state.cursor + batch_size > len(state.order):
                    state.order, state.cursor = torch.randperm(len(data), generator=generator), 0
                # This rank's share of the batch (all of it on one process).
                index = state.order[state.cursor : state.cursor + batch_size].tensor_split(world_size)[rank]
                batches.append(data.batch(index))
                state.cursor += batch_size
            # Each micro-batch's mean, weighted by its share of the step's targets on every rank; times
            # the world size, since FSDP averages the ranks' gradients.
            counts = [targets(batch) for batch in batches]
            total = max(1, fsdp.global_targets(sum(counts), _device(model)))
            step_loss = 0.0
            for batch, count in zip(batches, counts):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
                    loss = loss_fn(model, batch) * (count / total)
                (loss * world_size).backward()
                step_loss += float(loss.detach())
                counted = batch.get("attention_mask", batch["labels"] != -100)
                state.tokens_seen += int(counted.sum())
            step_loss = fsdp.global_sum(step_loss, _device(model))
            torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            optimizer.step()
            state.step += 1
            state.loss_ema = step_loss if state.loss_ema is None else 0.98 * state.loss_ema + 0.02 * step_loss
            elapsed = time.perf_counter() - start
            if bar is not None:
                rate = (state.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
                bar.update(1)
                bar.set_postfix_str(
                    f"loss {state.loss_ema:.3f} lr {optimizer.param_groups[0]['lr']:.2e} {rate:,.0f} tok/s"
                )
            if checkpoint is not None and settings.save_every and state.step % settings.save_every == 0:
                save()
            if settings.eval_every and eval_fn is not None and state.step % settings.eval_every == 0:
                metrics = eval_fn(model, settings.eval_batches)
                log(f"step {state.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            if on_step is not None:
                on_step(state.step)
            if interrupt is not None and interrupt.requested:
                raise KeyboardInterrupt
            if settings.max_seconds is not None and elapsed > settings.max_seconds:
                log(f"stopping at step {state.step} of {settings.max_steps}: the time budget is spent")
                break
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if checkpoint is None:
            raise
        save()  # the state after the last completed step
        if interrupt is not None:
            interrupt.restore()
        raise TrainingInterrupted(
            f"interrupted at step {state.step}: the training state is saved in {checkpoint}; continue with --resume"
        ) from None
    finally:
        if interrupt is not None:
            interrupt.restore()
    if bar is not None:
        bar.close()
    model.eval()
    result = {
        "steps": float(state.step),
        "train_loss": float(state.loss_ema or 0.0),
        "tokens_per_second": (state.tokens_seen - tokens_at_start) / max(1e-9, time.perf_counter() - start),
    }
    if eval_fn is not None:
        result.update(eval_fn(model, None))
    return result
