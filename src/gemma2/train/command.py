"""What `gemma2 train` runs: the dataset, the trainer, saving and resuming, for every task."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gemma2.cli import model_dir
from gemma2.distributed import launch
from gemma2.errors import Gemma2Error


def run(args: argparse.Namespace) -> int:
    """`gemma2 train`: fine-tune (full or LoRA) on a dataset and save the result."""
    import torch

    from gemma2.heads import Gemma2ForCausalLM
    from gemma2.tokenizer import Gemma2Tokenizer
    from gemma2.train.data import pack_documents
    from gemma2.train.datasets import read_text_documents
    from gemma2.train.trainer import perplexity_eval, train, train_causal_lm

    if args.lora_rank < 0:
        raise Gemma2Error(f"--lora-rank must be >= 1 (0 for full fine-tuning), got {args.lora_rank}")
    launch.init_from_env()  # under torchrun: FSDP2 over every rank
    if args.task not in ("causal-lm", "chat"):
        return _train_classifier(args)
    directory = model_dir(args)
    tok = Gemma2Tokenizer.from_pretrained(directory)
    train_rows: Any
    eval_rows: Any = None
    if args.task == "chat":
        from gemma2.train.chat import encode_conversations, read_conversations

        train_rows = encode_conversations(tok, read_conversations(args.data), args.seq_len, args.data)
        if args.eval_data:
            eval_rows = encode_conversations(tok, read_conversations(args.eval_data), args.seq_len, args.eval_data)
    else:
        encode = tok.backend.encode_batch
        train_rows = pack_documents(encode(read_text_documents(args.data)), args.seq_len, tok.bos_token_id)
        if args.eval_data:
            eval_rows = pack_documents(encode(read_text_documents(args.eval_data)), args.seq_len, tok.bos_token_id)
    model = Gemma2ForCausalLM.from_pretrained(directory, dtype=torch.float32, device=launch.device())
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.lora_rank:
        from gemma2.train.lora import apply_lora

        apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank)
    model = _shard(model)
    settings = _train_settings(args, len(train_rows))
    torch.manual_seed(args.seed)
    if args.task == "chat":
        from gemma2.train.chat import chat_loss
        from gemma2.train.trainer import causal_lm_targets

        evaluation = perplexity_eval(eval_rows, args.batch_size, chat_loss) if eval_rows is not None else None
        resume = _resume_args(args)
        result = train(model, train_rows, settings, chat_loss, evaluation, None, *resume, targets=causal_lm_targets)
    else:
        result = train_causal_lm(model, train_rows, settings, eval_rows, None, *_resume_args(args))
    stored = _save_trained(args, model, tok, directory)
    summary = f"trained {int(result['steps'])} steps, train loss {result['train_loss']:.3f}"
    if "eval_loss" in result:
        summary += f", eval loss {result['eval_loss']:.3f} (perplexity {result['eval_perplexity']:.1f})"
    if launch.is_main():
        print(f"{summary}; saved {stored} to {args.out}")
    launch.finish()
    return 0


def _shard(model: Any) -> Any:
    """Under torchrun: FSDP2 over every rank (gemma2.distributed.fsdp); the model itself otherwise."""
    if launch.world_size() == 1:
        return model
    from gemma2.distributed import fsdp

    cls = type(model)
    fsdp.shard_for_training(model)
    model.unsharded_class = cls  # what rank 0 rebuilds to write the export
    return model


def _gathered(model: Any, args: argparse.Namespace) -> Any:
    """A sharded model's whole weights in a plain model on rank 0 (None on the other ranks); the model
    itself on one process."""
    if getattr(model, "unsharded_class", None) is None:
        return model
    from gemma2.distributed import fsdp
    from gemma2.io.loading import skeleton_construction

    state = fsdp.full_state_dict(model)  # every rank takes part
    if not launch.is_main():
        return None
    with skeleton_construction():
        plain = model.unsharded_class(model.config)
        if args.lora_rank:
            from gemma2.train.lora import apply_lora

            apply_lora(plain, rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank)
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    return plain.eval()


def _train_settings(args: argparse.Namespace, examples: int) -> Any:
    """TrainSettings from the command line: --max-steps, else --epochs over `examples` rows."""
    import math

    from gemma2.train.trainer import TrainSettings

    per_epoch = max(1, math.ceil(examples / (args.batch_size * args.grad_accum)))
    steps = args.max_steps or max(1, math.ceil(args.epochs * per_epoch))
    return TrainSettings(
        max_steps=steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=min(args.warmup_steps, max(1, steps // 10)),
        bf16=args.bf16,
        seed=args.seed,
        save_every=args.save_every,
        eval_every=per_epoch if args.eval_data else 0,  # evaluate after every epoch
    )


def _resume_args(args: argparse.Namespace) -> tuple[Path, bool]:
    """Where the training state of --out is kept (a sibling directory), and whether to resume."""
    return Path(str(args.out).rstrip("/") + ".resume"), bool(args.resume)


def _save_trained(args: argparse.Namespace, model: Any, tok: Any, directory: Path) -> str:
    """Write the result of `gemma2 train` to --out (a PEFT adapter for LoRA without --merge, else
    the full weights) with the tokenizer, drop the saved training state; say what was written."""
    import shutil

    model = _gathered(model, args)
    if model is None:  # not rank 0: the export is rank 0's to write
        return ""
    stored = str(model.dtype).removeprefix("torch.") + " weights"
    if args.lora_rank and not args.merge:
        from gemma2.train.lora import save_adapter

        save_adapter(model, args.out, base_model=str(args.model or directory))
        stored = "LoRA adapter weights"
    else:
        if args.lora_rank:
            from gemma2.train.lora import merge_lora

            merge_lora(model)
        model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    shutil.rmtree(_resume_args(args)[0], ignore_errors=True)
    return stored


def _train_classifier(args: argparse.Namespace) -> int:

    import torch

    from gemma2.heads import Gemma2ForSequenceClassification, Gemma2ForTokenClassification
    from gemma2.tokenizer import Gemma2Tokenizer
    from gemma2.train import classification as cls_data
    from gemma2.train.trainer import train

    if args.lora_rank and not args.merge:
        raise Gemma2Error("LoRA on a classifier needs --merge (the new score layer is trained in full)")
    directory = model_dir(args)
    tok = Gemma2Tokenizer.from_pretrained(directory)
    sequence = args.task == "sequence-classification"

    def load(path: str) -> tuple[list, list]:
        if sequence:
            return cls_data.read_sequence_examples(path)
        return cls_data.read_token_examples(path)

    inputs, raw_labels = load(args.data)
    flat = raw_labels if sequence else [tag for tags in raw_labels for tag in tags]
    label_ids = cls_data.label_map(flat)

    def encode(inputs: list, raw: list) -> cls_data.PaddedExamples:
        try:
            if sequence:
                return cls_data.encode_sequence_examples(tok, inputs, [label_ids[x] for x in raw], args.seq_len)
            tags = [[label_ids[t] for t in row] for row in raw]
            return cls_data.encode_token_examples(tok, inputs, tags, args.seq_len)
        except KeyError as error:
            raise Gemma2Error(f"{args.eval_data}: label {error} does not occur in the training data") from None

    train_data = encode(inputs, raw_labels)
    eval_data = encode(*load(args.eval_data)) if args.eval_data else None
    head = Gemma2ForSequenceClassification if sequence else Gemma2ForTokenClassification
    id2label = {i: name for name, i in label_ids.items()}
    model = head.from_pretrained(
        directory, dtype=torch.float32, num_labels=len(id2label), id2label=id2label, ignore_mismatched_sizes=True
    )
    if args.lora_rank:
        from gemma2.train.lora import apply_lora

        apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank)
        for parameter in model.score.parameters():
            parameter.requires_grad_(True)
    model = _shard(model)
    settings = _train_settings(args, len(train_data))
    torch.manual_seed(args.seed)
    metrics = None
    if eval_data is not None:
        data = eval_data

        def metrics(m: torch.nn.Module, limit: int | None) -> dict[str, float]:
            return cls_data.classification_metrics(m, data, args.batch_size)

    from gemma2.train.trainer import examples

    targets = examples if sequence else cls_data.labelled_tokens
    loss = cls_data.classification_loss
    result = train(model, train_data, settings, loss, metrics, None, *_resume_args(args), targets=targets)
    _save_trained(args, model, tok, directory)
    summary = f"trained {int(result['steps'])} steps, train loss {result['train_loss']:.3f}"
    if "accuracy" in result:
        summary += f", eval accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}"
    if launch.is_main():
        print(f"{summary}; {len(id2label)} labels; saved to {args.out}")
    launch.finish()
    return 0
