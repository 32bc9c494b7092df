"""The `gemma2` command: thin subcommands over the library, importing torch only when needed.

    gemma2 info   --model DIR                 config, parameter count, dtype, files
    gemma2 logits [--model DIR] [--ids 2,651,...] [--dtype bf16|fp32]
                                              load a model, run one forward, summarise the logits

Without --model, `logits` builds a small random Gemma 2 (every architectural feature, seeded),
saves it as a Hugging Face checkpoint, loads it back and runs it: a self-contained check that the
install works, with no download.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from gemma2.errors import Gemma2Error

DEMO_CONFIG: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    query_pre_attn_scalar=24,
    sliding_window=8,
    max_position_embeddings=256,
)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ids must be comma-separated integers, got {text!r}") from None


def cmd_info(args: argparse.Namespace) -> int:
    from gemma2.checkpoint import CheckpointReader, resolve_checkpoint_dir
    from gemma2.config import Gemma2Config

    directory = resolve_checkpoint_dir(args.model)
    config = Gemma2Config.from_json_file(directory / "config.json")
    reader = CheckpointReader(directory)
    params = 0
    dtypes: set[str] = set()
    for key in reader.keys():
        shape = reader.shape(key)
        count = 1
        for n in shape:
            count *= n
        params += count
        dtypes.add(str(reader.dtype(key)).removeprefix("torch."))
    print(f"checkpoint: {directory}")
    print(f"files: {', '.join(sorted(set(reader.key_to_file.values())))}")
    print(f"parameters: {params:,} (tied LM head counted once)")
    print(f"stored dtype: {', '.join(sorted(dtypes))}")
    print(config.to_json_string(), end="")
    return 0


def cmd_logits(args: argparse.Namespace) -> int:
    import torch

    from gemma2 import Gemma2Config, Gemma2ForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    with tempfile.TemporaryDirectory() as scratch:
        model_path = args.model
        if model_path is None:
            torch.manual_seed(args.seed)
            demo = Gemma2ForCausalLM(Gemma2Config(**DEMO_CONFIG))
            model_path = Path(scratch) / "demo-gemma2"
            demo.save_pretrained(model_path)
            print(f"built a random demo Gemma 2 ({demo.num_parameters():,} parameters) at {model_path}")
        model = Gemma2ForCausalLM.from_pretrained(model_path, dtype=dtype)
    config = model.config
    ids = args.ids or [config.bos_token_id or 2, *range(10, 10 + 15)]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids).logits[0].float()  # [T, V]
    print(
        f"layers {config.num_hidden_layers}, d {config.hidden_size}, heads {config.num_attention_heads}/"
        f"{config.num_key_value_heads}, window {config.sliding_window}, dtype {args.dtype}"
    )
    print(f"input ids: {ids}")
    print(
        f"logits: shape {list(logits.shape)}, mean {logits.mean():.4f}, std {logits.std():.4f}, "
        f"min {logits.min():.4f}, max {logits.max():.4f} (soft-cap {config.final_logit_softcapping})"
    )
    top = logits[-1].topk(5)
    pairs = ", ".join(f"{i}:{v:.3f}" for v, i in zip(top.values.tolist(), top.indices.tolist()))
    print(f"last position top-5 (id:logit): {pairs}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma2", description="Gemma 2 language models in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="describe a checkpoint directory")
    info.add_argument("--model", required=True, help="checkpoint directory or hub id")
    info.set_defaults(run=cmd_info)

    logits = sub.add_parser("logits", help="run one forward pass and summarise the logits")
    logits.add_argument("--model", help="checkpoint directory or hub id (default: a random demo model)")
    logits.add_argument("--ids", type=_parse_ids, help="comma-separated token ids")
    logits.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    logits.add_argument("--seed", type=int, default=0, help="seed of the random demo model")
    logits.set_defaults(run=cmd_logits)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except Gemma2Error as error:
        print(f"gemma2: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
