"""The `gemma2` command: thin subcommands over the library, importing torch only when needed.

    gemma2 generate [--model M] [PROMPT]     stream a completion (prompt from stdin when absent)
    gemma2 chat     [--model M]              interactive multi-turn chat
    gemma2 info     [--model M]              config, parameters, dtype, weight and cache memory
    gemma2 logits   [--model M] [--ids ...]  one forward pass, summarised
    gemma2 convert  SOURCE --out DIR         original PyTorch / Flax checkpoint -> Hugging Face layout
    gemma2 train    --data FILE --out DIR    fine-tune (causal LM; full or LoRA)
    gemma2 quantize --out DIR --mode int4    save an int8 / int4 weight-only quantized copy
    gemma2 bench    [--layers N]             CPU speed: gemma2 (bf16, int8, int4) vs transformers

--model takes a checkpoint directory or a hub id. Without it the commands use the bundled
default model (see gemma2.io.default_model) and say so in one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemma2.errors import Gemma2Error
from gemma2.server.options import add_arguments as add_serve_arguments

if TYPE_CHECKING:
    from gemma2.heads import Gemma2ForCausalLM
    from gemma2.tokenizer import Gemma2Tokenizer


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ids must be comma-separated integers, got {text!r}") from None


def model_dir(args: argparse.Namespace) -> Path:
    from gemma2.io.checkpoint import resolve_checkpoint_dir

    if args.model is None:
        from gemma2.io.default_model import default_model

        directory, notice = default_model()
        if _is_main():
            print(notice, file=sys.stderr)
        return directory
    return resolve_checkpoint_dir(args.model)


def _load(args: argparse.Namespace, tokenizer: bool = True) -> tuple[Gemma2ForCausalLM, Gemma2Tokenizer | None]:
    import torch

    from gemma2.distributed import launch
    from gemma2.heads import Gemma2ForCausalLM
    from gemma2.tokenizer import Gemma2Tokenizer

    tp = launch.tensor_parallel_size(getattr(args, "tp", None))
    directory = model_dir(args)
    tok = Gemma2Tokenizer.from_pretrained(directory) if tokenizer else None
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    quantize = getattr(args, "quantize", None)
    if args.group_size is not None and quantize != "int4":
        raise Gemma2Error("--group-size applies only with --quantize int4")
    model = Gemma2ForCausalLM.from_pretrained(
        directory,
        dtype=dtype,
        quantize=quantize,
        group_size=args.group_size,
        tp_plan="auto" if tp > 1 else None,
        device=launch.device() if tp > 1 else "cpu",
    )
    return model, tok


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy unless asked to sample: --temperature > 0, or --top-p / --top-k / --min-p without
    a temperature (then sampling at temperature 1). An explicit --temperature 0 is always greedy."""
    if args.temperature is not None and args.temperature < 0:
        raise Gemma2Error(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    if args.temperature is not None:
        sampling = args.temperature > 0
    else:
        sampling = args.top_p is not None or args.top_k is not None or args.min_p is not None
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=sampling,
        temperature=args.temperature if args.temperature else 1.0,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _is_main() -> bool:
    """Rank 0 under torchrun (the one that reads stdin and prints), or the only process."""
    from gemma2.distributed import launch

    return launch.is_main()


def _print_stream(pieces: Any) -> str:
    """Every rank runs the generation in step; rank 0 prints it."""
    text = []
    shown = _is_main()
    for piece in pieces:
        if shown:
            sys.stdout.write(piece)
            sys.stdout.flush()
        text.append(piece)
    if shown:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    from gemma2.distributed import launch
    from gemma2.generation import stream

    kwargs = _sampling_kwargs(args)
    launch.tensor_parallel_size(args.tp)  # joins torchrun's group: rank 0 then hands stdin to the others
    # A piped prompt ends with the newline of its last line; that newline is not part of the prompt.
    prompt = args.prompt
    if prompt is None:
        prompt = launch.read_on_main(lambda: sys.stdin.read().removesuffix("\n"))
    if not prompt.strip():
        raise Gemma2Error("empty prompt: give PROMPT or pipe text on stdin")
    model, tok = _load(args)
    assert tok is not None
    if args.chat or args.system:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        _print_stream(stream(model, tok, messages, **kwargs))
    else:
        _print_stream(stream(model, tok, prompt, **kwargs))
    launch.finish()
    return 0


def _read_line(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def cmd_chat(args: argparse.Namespace) -> int:
    from gemma2.distributed import launch
    from gemma2.generation import stream

    kwargs = _sampling_kwargs(args)
    model, tok = _load(args)
    assert tok is not None
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty() and _is_main()
    if interactive:
        print("gemma2 chat: type a message; /reset clears the history; Ctrl-D or /exit quits.", file=sys.stderr)
    try:
        while True:
            # Rank 0 reads each line and hands it to the other ranks, which follow its turns.
            line = launch.read_on_main(lambda: _read_line("you> " if interactive else ""))
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line == "/exit":
                break
            if line == "/reset":
                history = history[:1] if args.system else []
                continue
            history.append({"role": "user", "content": line})
            if interactive:
                sys.stdout.write("model> ")
            reply = _print_stream(stream(model, tok, history, **kwargs))
            history.append({"role": "assistant", "content": reply})
    except KeyboardInterrupt:
        sys.stdout.write("\n")  # leave the terminal on a fresh line
        sys.stdout.flush()
        return 0
    launch.finish()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from gemma2.cache import cache_memory_bytes
    from gemma2.config import Gemma2Config
    from gemma2.io.checkpoint import CheckpointReader

    directory = model_dir(args)
    config = Gemma2Config.from_json_file(directory / "config.json")
    reader = CheckpointReader(directory)
    params = weight_bytes = 0
    dtypes: set[str] = set()
    for key in reader.keys():
        count = math.prod(reader.shape(key))
        params += count
        dtype = reader.dtype(key)
        weight_bytes += count * dtype.itemsize
        dtypes.add(str(dtype).removeprefix("torch."))
    length = config.max_position_embeddings
    cache = cache_memory_bytes(config, length, bytes_per_value=2)
    everything = cache_memory_bytes(config.replace(layer_types=["full_attention"] * config.num_hidden_layers), length)
    print(f"checkpoint: {directory}")
    print(f"files: {', '.join(sorted(set(reader.key_to_file.values())))}")
    print(f"parameters: {params:,} (tied LM head counted once)")
    print(f"stored dtype: {', '.join(sorted(dtypes))}; weights: {weight_bytes / 2**20:,.1f} MiB")
    quantized = config.extra.get("quantization_config")
    if quantized is not None:
        print(f"quantization: {json.dumps(quantized)}")
    print(
        f"KV cache at {length} tokens, batch 1, bf16: {cache / 2**20:,.1f} MiB "
        f"(sliding layers keep {config.sliding_window} slots; {everything / 2**20:,.1f} MiB if every layer kept all)"
    )
    if args.tp is not None:
        from gemma2.distributed.plan import describe

        tensors = {key: (reader.shape(key), reader.dtype(key).itemsize) for key in reader.keys()}
        print(describe(config, args.tp, tensors, length))
    import os

    from gemma2.backends.cpu import library, prefill

    kernels = library.variant()
    chosen = os.environ.get(library.VARIANT_ENV, "auto")
    print(f"cpu: {library.cpu_summary()}")
    print(f"kernels: {'native CPU (' + kernels + ')' if kernels else 'PyTorch ops'} ({library.VARIANT_ENV}={chosen})")
    print(f"prompts: {'float32' if prefill.enabled() else 'bf16'} products ({prefill.SETTING_ENV})")
    print(config.to_json_string(), end="")
    return 0


def cmd_logits(args: argparse.Namespace) -> int:
    import torch

    model, _ = _load(args, tokenizer=False)
    config = model.config
    ids = args.ids or [config.bos_token_id or 2, *range(10, 10 + 15)]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # [T, V]
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


def cmd_quantize(args: argparse.Namespace) -> int:
    """Load, quantize, and write the model with its tokenizer files to --out."""
    import torch

    from gemma2.heads import Gemma2ForCausalLM
    from gemma2.io.checkpoint import AtomicDirectory, check_new_output

    directory = model_dir(args)
    check_new_output(Path(args.out), args.force)
    model = Gemma2ForCausalLM.from_pretrained(
        directory, dtype=torch.bfloat16, quantize=args.mode, group_size=args.group_size
    )
    tokenizer = _tokenizer_if_present(directory)
    with AtomicDirectory(args.out, keep_other_files=False) as scratch:
        model.save_pretrained(scratch)
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch)
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(f"wrote {args.out}: {args.mode} weights, {size / 2**20:,.1f} MiB of safetensors")
    return 0


def _tokenizer_if_present(directory: Path) -> Any:
    from gemma2.tokenizer import Gemma2Tokenizer

    if not any((directory / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        return None
    return Gemma2Tokenizer.from_pretrained(directory)


def _benchmarks_dir() -> Path:
    """The checkout's benchmarks/ directory (it is not part of the package, nor of a wheel)."""
    import gemma2

    return Path(gemma2.__file__).resolve().parents[2] / "benchmarks"


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    directory = _benchmarks_dir()
    if not (directory / "cpu_speed.py").is_file():
        print(
            f"gemma2 bench: error: needs the source checkout (no {directory / 'cpu_speed.py'}); "
            "run it from a git clone of gemma2",
            file=sys.stderr,
        )
        return 2
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))  # the benchmark's modules import each other by name
    cpu_speed = importlib.import_module("cpu_speed")
    return int(cpu_speed.main(args.args))


def cmd_convert(args: argparse.Namespace) -> int:
    from gemma2.convert import convert_checkpoint

    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", None: None}[args.dtype]
    summary = convert_checkpoint(
        args.source,
        args.out,
        format=args.format,
        variant=args.variant,
        instruct=args.instruct,
        tokenizer=args.tokenizer,
        dtype=dtype,
        config=args.config,
        force=args.force,
        max_shard_size=args.max_shard_size,
        progress=not args.quiet,
    )
    print(summary.line())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from gemma2.server.command import serve
    except ImportError as error:
        raise Gemma2Error(
            f"gemma2 serve needs the web stack ({error.name} is missing): pip install 'gemma2[server]'"
        ) from None
    return serve(args)


def cmd_train(args: argparse.Namespace) -> int:
    from gemma2.train.command import run

    return run(args)


def _add_model_options(parser: argparse.ArgumentParser, quantize: bool = True) -> None:
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the bundled default model)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="compute dtype (default bf16)")
    parser.add_argument(
        "--tp", type=int, help="tensor-parallel size: run under torchrun with this many processes (default: all)"
    )
    if quantize:
        parser.add_argument(
            "--quantize",
            choices=["int8", "int4"],
            help="quantize the weights after loading (int4: the embedding and LM head stay int8)",
        )
    _add_group_size(parser)


def _add_group_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group-size", type=int, help="int4 weights per scale: 64, 128 (default) or 256")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    parser.add_argument(
        "--temperature",
        type=float,
        help="sampling temperature; 0 means greedy (the default unless sampling flags are given)",
    )
    parser.add_argument("--top-p", type=float, help="nucleus sampling: keep the most likely tokens up to this mass")
    parser.add_argument("--top-k", type=int, help="sample among the K most likely tokens")
    parser.add_argument("--min-p", type=float, help="drop tokens below this fraction of the top probability")
    parser.add_argument("--repetition-penalty", type=float, help="penalise tokens already seen (e.g. 1.1)")
    parser.add_argument("--seed", type=int, help="random seed: the same seed gives the same sample")
    parser.add_argument("--system", help="a system instruction (prepended to the first user turn)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma2", description="Gemma 2 language models in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    generate = sub.add_parser("generate", help="stream a completion of PROMPT (or of stdin)")
    generate.add_argument("prompt", nargs="?", help="the prompt; read from stdin when absent")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat format")
    _add_model_options(generate)
    _add_sampling_options(generate)
    generate.set_defaults(run=cmd_generate)

    chat = sub.add_parser(
        "chat",
        help="interactive multi-turn chat (Ctrl-D or /exit quits, /reset clears)",
        description="Interactive multi-turn chat in the model's chat format. The history is kept across turns. "
        "Type /reset to clear it, /exit or Ctrl-D to quit; Ctrl-C also quits cleanly.",
    )
    _add_model_options(chat)
    _add_sampling_options(chat)
    chat.set_defaults(run=cmd_chat)

    info = sub.add_parser("info", help="config, parameter count, dtype, weight and KV-cache memory")
    info.add_argument("--model", help="checkpoint directory or hub id (default: the bundled default model)")
    info.add_argument("--tp", type=int, help="also show what each rank holds at this tensor-parallel size")
    info.set_defaults(run=cmd_info)

    convert = sub.add_parser(
        "convert",
        help="convert an original Gemma 2 checkpoint (PyTorch or Flax/Orbax) to the Hugging Face layout",
        description="Convert Google's original Gemma 2 checkpoint SOURCE (model.ckpt, a directory of *.bin "
        "shards, or an Orbax directory) into a Hugging Face checkpoint directory OUT. The format and variant "
        "are detected from the files and tensor shapes.",
    )
    convert.add_argument("source", help="model.ckpt, a directory of *.bin shards, or a Flax/Orbax directory")
    convert.add_argument("--out", required=True, help="the Hugging Face directory to write (must be new or empty)")
    convert.add_argument("--format", choices=["pytorch", "flax"], help="check the detected format")
    convert.add_argument("--variant", choices=["2b", "9b", "27b"], help="check the detected variant")
    convert.add_argument("--instruct", action="store_true", help="an instruction-tuned model: stop on <end_of_turn>")
    convert.add_argument(
        "--tokenizer", help="Gemma's tokenizer.model, written with tokenizer.json and the chat template"
    )
    convert.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="stored dtype (default: the checkpoint's)")
    convert.add_argument("--config", help="config.json for a checkpoint that is none of the official shapes")
    convert.add_argument("--force", action="store_true", help="replace a non-empty --out")
    convert.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(run=cmd_convert)

    train = sub.add_parser(
        "train",
        help="fine-tune a model on your data (causal LM; full or LoRA)",
        description="Fine-tune a Gemma 2 checkpoint. --task causal-lm reads a plain-text file (one document) or "
        'JSONL with one {"text": ...} document per line, packs documents with a <bos> each into --seq-len rows. '
        '--task sequence-classification reads JSONL {"text", "label"} or CSV text,label; --task '
        'token-classification reads JSONL {"tokens": [...], "tags": [...]}. AdamW, warmup and cosine decay. '
        "Writes the model and tokenizer to --out.",
    )
    train.add_argument("--model", help="checkpoint directory or hub id (default: the bundled default model)")
    train.add_argument(
        "--task", default="causal-lm", choices=["causal-lm", "chat", "sequence-classification", "token-classification"]
    )
    train.add_argument("--data", required=True, help="training data file")
    train.add_argument("--eval-data", help="held-out data file: reports loss and perplexity")
    train.add_argument("--out", required=True, help="directory to write the trained model to")
    train.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full)")
    train.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default 2 x rank)")
    train.add_argument("--merge", action="store_true", help="with LoRA: write merged weights, not the adapter")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--seq-len", type=int, default=512)
    train.add_argument("--bf16", action="store_true", help="bf16 autocast (weights and optimizer stay float32)")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--save-every", type=int, default=0, help="save the training state every N steps")
    train.add_argument(
        "--resume", action="store_true", help="continue from the state saved in OUT.resume (by Ctrl-C or --save-every)"
    )
    train.set_defaults(run=cmd_train)

    quantize = sub.add_parser(
        "quantize",
        help="write a weight-only int8 / int4 quantized copy of a model",
        description="Quantize a checkpoint's weights (int8 per output channel, or int4 in groups; the embedding "
        "and tied LM head stay int8) and write it, with its tokenizer, to --out. The result loads with "
        "--model OUT or Gemma2ForCausalLM.from_pretrained(OUT) without quantizing again.",
    )
    quantize.add_argument("--model", help="checkpoint directory or hub id (default: the bundled default model)")
    quantize.add_argument("--out", required=True, help="directory to write (must be new or empty)")
    quantize.add_argument("--mode", choices=["int8", "int4"], required=True)
    _add_group_size(quantize)
    quantize.add_argument("--force", action="store_true", help="replace a non-empty --out")
    quantize.set_defaults(run=cmd_quantize)

    # benchmarks/cpu_speed.py in the checkout parses the arguments (and --help) itself: everything
    # after "bench" is passed on. No prefix characters (NUL never occurs in argv), so that argparse
    # reads "--layers" as one of those arguments, not as an unknown option of this parser.
    bench_parser = sub.add_parser(
        "bench",
        help="CPU speed: gemma2 bf16 / int8 / int4 against transformers on random weights (source checkout)",
        add_help=False,
        prefix_chars="\0",
    )
    bench_parser.add_argument("args", nargs=argparse.REMAINDER)
    bench_parser.set_defaults(run=cmd_bench)

    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (chat, completions, streaming, metrics) with continuous batching",
        description="Serve the model over the OpenAI API: /v1/chat/completions, /v1/completions, /v1/models, "
        "/health, /metrics, /tokenize, /detokenize, /version. Loopback only unless --host says otherwise.",
    )
    add_serve_arguments(serve)
    serve.set_defaults(run=cmd_serve)

    logits = sub.add_parser("logits", help="run one forward pass and summarise the logits")
    logits.add_argument("--ids", type=_parse_ids, help="comma-separated token ids (default: <bos> 10..24)")
    _add_model_options(logits)
    logits.set_defaults(run=cmd_logits)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except Gemma2Error as error:
        print(f"gemma2: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"gemma2: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
